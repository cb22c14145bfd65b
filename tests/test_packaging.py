"""An installed flsplit adds nothing at top level but ``flsplit`` (issue 13), and
``flsplit.strategies`` is a plain directory that static tools follow (issue 21).

The wheel is built from this checkout, installed into a fresh virtual environment, and
imported from a Flower-style project that has its own ``apps`` and ``strategies`` modules:
the project's modules and ``flsplit.strategies`` must both import, each the right one. In the
checkout, ``flsplit/strategies`` is a relative symlink to the repository's ``strategies/``:
no import hook, so the module finder alone (without importing flsplit) and a type checker
find every ``flsplit.strategies`` module, and an editable install finds them too. A Flower FAB
drops symlinks; there flsplit's ``__init__`` extends its package path to ``strategies/``.
"""

from __future__ import annotations

import os
import io
import subprocess
import sys
import sysconfig
import stat
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGY_MODULES = sorted(p.stem for p in (ROOT / "strategies").glob("*.py") if p.stem != "__init__")


def _run(*args: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_only_flsplit_and_shadows_no_project_module(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(ROOT))
    (wheel,) = dist.glob("flsplit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/", 1)[0] for name in archive.namelist()}
        names = set(archive.namelist())
        # the symlink's target packed as plain files, not as a link
        modes = {i.filename: i.external_attr >> 16 for i in archive.infolist() if i.filename.startswith("flsplit/strategies/")}
    version = wheel.name.split("-")[1]
    assert top == {"flsplit", f"flsplit-{version}.dist-info"}, top
    assert not any(n.startswith(("apps/", "strategies/")) for n in names)
    assert set(modes) == {f"flsplit/strategies/{m}.py" for m in [*STRATEGY_MODULES, "__init__"]}, sorted(modes)
    assert all(stat.S_ISREG(mode) for mode in modes.values()), modes

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel))
    # flsplit's dependencies (torch, flwr, ...) come from this environment's site-packages,
    # after the fresh environment's own: a plain path line, so the checkout's editable
    # install (a .pth file there) is not processed and the checkout is not on the path
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    project = tmp_path / "project"
    for module in ("apps", "strategies"):
        (project / module).mkdir(parents=True)
        (project / module / "__init__.py").write_text(f'WHOSE = "the project\'s {module}"\n')
    script = textwrap.dedent(
        """
        import apps, strategies, flsplit
        from flsplit.strategies import PSL, STRATEGIES
        print(apps.WHOSE, strategies.WHOSE, flsplit.__file__, PSL.__module__, sorted(STRATEGIES), sep="|")
        """
    )
    apps_whose, strategies_whose, flsplit_file, psl_module, schemes = _run(str(python), "-c", script, cwd=project).strip().split("|")
    assert apps_whose == "the project's apps" and strategies_whose == "the project's strategies"
    assert Path(flsplit_file).is_relative_to(venv), flsplit_file  # the wheel's flsplit, not the checkout's
    assert psl_module == "flsplit.strategies.psl"
    assert "psl" in schemes and "sl" in schemes


def test_checkout_has_no_import_hook_and_the_symlink_is_relative():
    link = ROOT / "flsplit" / "strategies"
    assert link.is_symlink() and os.readlink(link) == "../strategies"
    assert not (ROOT / "flsplit" / "_checkout.py").exists()


def test_static_resolution_finds_every_strategies_module():
    """The path finder alone, as an IDE resolves a name: no flsplit code runs."""
    script = textwrap.dedent(
        """
        import sys
        from importlib.machinery import PathFinder
        names = sys.argv[1:]
        found = {}
        for name in names:
            path = None
            for depth in range(1, name.count(".") + 2):
                spec = PathFinder.find_spec(".".join(name.split(".")[:depth]), path)
                assert spec is not None, name
                path = spec.submodule_search_locations
            found[name] = spec.origin
        assert not any(m == "flsplit" or m.startswith("flsplit.") for m in sys.modules), "flsplit was imported"
        print("\\n".join(f"{n}|{o}" for n, o in found.items()))
        """
    )
    names = ["flsplit.strategies", *(f"flsplit.strategies.{m}" for m in STRATEGY_MODULES)]
    out = _run(sys.executable, "-c", script, *names, cwd=ROOT)
    origins = dict(line.split("|", 1) for line in out.splitlines())
    assert set(origins) == set(names)
    for name, origin in origins.items():
        leaf = "__init__" if name == "flsplit.strategies" else name.rsplit(".", 1)[1]
        assert Path(origin) == ROOT / "flsplit" / "strategies" / f"{leaf}.py", (name, origin)


def test_type_checker_follows_flsplit_strategies(tmp_path):
    """mypy (when installed) resolves every flsplit.strategies module from the checkout."""
    pytest.importorskip("mypy", reason="mypy is not installed")
    snippet = tmp_path / "snippet.py"
    snippet.write_text("".join(f"import flsplit.strategies.{m}\n" for m in STRATEGY_MODULES)
                       + "from flsplit.strategies import PSL, STRATEGIES\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MYPYPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=skip", "--no-site-packages",
                           "--no-incremental", "--cache-dir", os.devnull, str(snippet)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Cannot find implementation" not in done.stdout, done.stdout + done.stderr


def test_editable_install_imports_the_checkouts_strategies(tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "-e", str(ROOT))
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    project = tmp_path / "project"
    project.mkdir()
    script = "import flsplit.strategies.accounting as a, flsplit.strategies as s; print(a.__file__, s.PSL.__module__, sep='|')"
    accounting_file, psl_module = _run(str(python), "-c", script, cwd=project).strip().split("|")
    assert Path(accounting_file) == ROOT / "flsplit" / "strategies" / "accounting.py"
    assert psl_module == "flsplit.strategies.psl"


def test_a_fab_without_the_symlink_imports_flsplit_strategies(tmp_path):
    """Flower's FAB builder (``flwr run .``) drops symlinks: the FAB has strategies/ beside
    flsplit/ and flsplit's __init__ extends the package path to it."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        names = set(fab.namelist())
        fab.extractall(tmp_path / "fab")
    assert "strategies/psl.py" in names and not any(n.startswith("flsplit/strategies/") for n in names)
    script = "import flsplit.strategies as s, flsplit.strategies.psl as p; print(s.__file__, p.PSL.__module__, sep='|')"
    init_file, psl_module = _run(sys.executable, "-c", script, cwd=tmp_path / "fab").strip().split("|")
    assert Path(init_file) == tmp_path / "fab" / "strategies" / "__init__.py"
    assert psl_module == "flsplit.strategies.psl"


def test_the_directory_is_not_importable_as_a_top_level_strategies():
    """With the repository root on sys.path (as `flwr run .` puts it), ``import strategies`` is
    refused (strategies/__init__.py's guard): one name, one copy of each class."""
    done = subprocess.run([sys.executable, "-c", "import strategies"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "imported as flsplit.strategies" in done.stderr, done.stderr
