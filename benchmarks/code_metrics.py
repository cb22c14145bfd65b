"""Size metrics of the product code (issue 21's before/after measures).

Counts, over ``flsplit/``, ``strategies/`` and ``apps/`` (``.py`` files): lines, files over
500 lines, functions over 80 lines, and the strategy base's methods, attributes and
constructor arguments (``SplitStrategy`` and everything it inherits from flsplit code).

    python benchmarks/code_metrics.py [--json] [--root PATH]

Run it on a checkout of another commit to compare (``git worktree add /tmp/old REV``).
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PRODUCT = ("flsplit", "strategies", "apps")


def _files(root: Path) -> list[Path]:
    return sorted(p for d in PRODUCT for p in (root / d).rglob("*.py") if not p.is_symlink() and "__pycache__" not in p.parts)


def _functions(tree: ast.AST) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node.end_lineno - node.lineno + 1))
    return out


def _class_facts(root: Path, name: str, module: Path) -> dict:
    """Methods, ``self.`` attributes and constructor arguments of a class and its flsplit bases."""
    classes: dict[str, ast.ClassDef] = {}
    for path in _files(root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, node)
    methods, attributes, args = set(), set(), []
    todo, seen = [name], set()
    while todo:
        cls = classes.get(todo.pop())
        if cls is None or cls.name in seen:
            continue
        seen.add(cls.name)
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
        for item in cls.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                methods.add(item.name)
                if item.name == "__init__" and cls.name == name:
                    a = item.args
                    args = [x.arg for x in (a.posonlyargs + a.args)[1:] + a.kwonlyargs]
                    args += [f"**{a.kwarg.arg}"] if a.kwarg else []
                for sub in ast.walk(item):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self" \
                            and isinstance(sub.ctx, ast.Store):
                        attributes.add(sub.attr)
    return {"classes": sorted(seen), "methods": len(methods), "attributes": len(attributes),
            "constructor_arguments": len(args)}


def metrics(root: Path) -> dict:
    lines, long_files, long_functions = 0, [], []
    for path in _files(root):
        text = path.read_text()
        n = text.count("\n")
        lines += n
        rel = str(path.relative_to(root))
        if n > 500:
            long_files.append((rel, n))
        long_functions += [(f"{rel}:{fn}", k) for fn, k in _functions(ast.parse(text)) if k > 80]
    return {
        "product_lines": lines,
        "files": len(_files(root)),
        "files_over_500_lines": sorted(long_files, key=lambda t: -t[1]),
        "functions_over_80_lines": sorted(long_functions, key=lambda t: -t[1]),
        "strategy_base": _class_facts(root, "SplitStrategy", root / "strategies" / "base.py"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m = metrics(args.root)
    if args.json:
        print(json.dumps(m, indent=1))
        return
    print(f"product lines: {m['product_lines']} in {m['files']} files")
    print(f"files over 500 lines: {len(m['files_over_500_lines'])}")
    for name, n in m["files_over_500_lines"]:
        print(f"  {n:5d}  {name}")
    print(f"functions over 80 lines: {len(m['functions_over_80_lines'])}")
    for name, n in m["functions_over_80_lines"]:
        print(f"  {n:5d}  {name}")
    base = m["strategy_base"]
    print(f"strategy base ({', '.join(base['classes'])}): {base['methods']} methods, {base['attributes']} attributes, "
          f"{base['constructor_arguments']} constructor arguments")


if __name__ == "__main__":
    main()
