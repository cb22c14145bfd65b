"""An installed flsplit adds nothing at top level but ``flsplit`` (issue 13).

The wheel is built from this checkout, installed into a fresh virtual environment, and
imported from a Flower-style project that has its own ``apps`` and ``strategies`` modules:
the project's modules and ``flsplit.strategies`` must both import, each the right one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    version = wheel.name.split("-")[1]
    assert top == {"flsplit", f"flsplit-{version}.dist-info"}, top
    assert "flsplit/strategies/psl.py" in names and not any(n.startswith(("apps/", "strategies/")) for n in names)

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
