"""The package's layers: each subpackage imports only from its own layer and the layers below.

Read statically (``ast``) from the source, function-local imports included, so that an import
moved into a function to hide a cycle is still seen. The order is the one ``flsplit``'s
docstring lists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flsplit

ROOT = Path(flsplit.__file__).parent
# Lowest first. A module may import from its own layer and any layer before it.
LAYERS = ["model", "sim", "wire", "data", "planes", "runtime", "planners", "strategies", "cli"]
# Beside the layers: optional dependencies (importable from anywhere) and the public facade.
ANYWHERE = {"extras"}


def _modules() -> dict[str, Path]:
    out = {}
    # rglob does not enter the strategies link (a symlink to the repository's strategies/): read it too
    for path in sorted([*ROOT.rglob("*.py"), *(ROOT / "strategies").glob("*.py")]):
        rel = path.relative_to(ROOT)
        name = ".".join(("flsplit", *rel.with_suffix("").parts)).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """``(imported flsplit module, inside a function)`` for every import of ``name``."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from flsplit.wire import protocol` imports the module flsplit.wire.protocol
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        out += [(t, id(node) in local) for t in targets if t == "flsplit" or t.startswith("flsplit.")]
    return out


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_sits_in_a_layer():
    loose = [m for m in MODULES if _layer(m) not in LAYERS and _layer(m) not in ANYWHERE and m != "flsplit"]
    assert not loose, f"modules outside the layers: {loose}"


def test_imports_flow_down_the_layers():
    upward = []
    for name, path in MODULES.items():
        own = _layer(name)
        if own not in LAYERS:
            continue
        for target, _ in _imports(name, path):
            other = _layer(target)
            if other in ANYWHERE or target == "flsplit":
                continue
            if LAYERS.index(other) > LAYERS.index(own):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_the_library_never_imports_the_strategies():
    found = [f"{name} -> {t}" for name, path in MODULES.items() if _layer(name) not in ("strategies", "cli")
             for t, _ in _imports(name, path) if _layer(t) == "strategies"]
    assert not found, found


def test_no_import_cycle_between_modules():
    """Module-level and function-local imports together form no cycle (a local import does not hide one)."""
    graph = {name: {t for t, _ in _imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}
    # A package's own submodules importing the package's __init__ is how Python resolves
    # `from flsplit.x import y`; that edge is the parent package, not a cycle of code.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_layer_test_sees_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a model module importing the runtime is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from flsplit.runtime import server\n\ndef f():\n    import flsplit.cli\n")
    found = _imports("flsplit.model.bad", fake)
    assert ("flsplit.runtime.server", False) in found and ("flsplit.cli", True) in found
    assert LAYERS.index(_layer("flsplit.runtime.server")) > LAYERS.index(_layer("flsplit.model.bad"))


def _runtime_imports_of_torch(path: Path) -> list[int]:
    """Lines that import torch when the module runs (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}
    lines = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if id(node) not in typing_only and any(n == "torch" or n.startswith("torch.") for n in names):
            lines.append(node.lineno)
    return lines


def test_the_simulator_and_the_analytic_planners_never_import_torch():
    """What the sim and planner docstrings promise ("the simulator never imports torch"): pricing
    and planning run on numpy; only the CCC agent (a Double-DQN) trains with torch."""
    allowed = {"flsplit.planners.ccc_agent"}
    assert _runtime_imports_of_torch(MODULES["flsplit.planners.ccc_agent"])  # the check sees an import
    found = {name: lines for name, path in MODULES.items() if _layer(name) in ("sim", "planners") and name not in allowed
             and (lines := _runtime_imports_of_torch(path))}
    assert not found, found
