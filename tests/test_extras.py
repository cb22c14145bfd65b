"""Optional dependencies (flsplit/extras.py): importing flsplit and the apps loads neither cvxpy
nor matplotlib, the default run needs no cvxpy, ``flsplit report`` tables need no matplotlib,
and a feature that needs a missing one names the extra that installs it.

Each check that needs a package to be missing runs in a fresh interpreter whose imports of it
fail as if it were not installed (a ``sys.meta_path`` finder that refuses it), so the test
environment, which has every extra, can check what a base install does.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from flsplit.extras import EXTRAS, MissingExtra, install_command, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = tuple(EXTRAS)  # cvxpy, matplotlib

BLOCKER = """
import sys

class _NotInstalled:
    # Imports of these packages fail as if they were not installed.
    blocked = {blocked!r}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def run_python(code: str, blocked=(), cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (repository root on sys.path) with ``blocked`` missing."""
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _optional_loaded() -> str:
    return f"sorted(m for m in sys.modules if m.partition('.')[0] in {OPTIONAL!r})"


# ------------------------------------------------------------------ (a) nothing optional at import
def test_imports_and_the_default_apps_do_not_import_cvxpy_or_matplotlib():
    proc = run_python(f"""
        import json
        import flsplit, flsplit.strategies, flsplit.planners, flsplit.cli, flsplit.cli.report, flsplit.cli.plan
        import apps.client_app, apps.server_app
        print(json.dumps({_optional_loaded()}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """One short round of the default Flower app (pyproject's run config) with cvxpy missing:
    its run directory. (matplotlib cannot be missing here: flwr-datasets, whose partitioners
    split the default digits, imports it at its own import and requires it.)"""
    runs = tmp_path_factory.mktemp("default") / "runs"
    config = {**PYPROJECT["tool"]["flwr"]["app"]["config"], "num-server-rounds": 1, "max-steps": 2,
              "output-dir": str(runs)}
    proc = run_python(f"""
        import json
        from flwr.app import Context, RecordDict
        from apps.client_app import app as client_app
        from apps.server_app import app as server_app
        from flsplit.planes.inprocess import InProcessGrid

        config = {config!r}
        grid = InProcessGrid(client_app, 2, run_config=config)
        server_app(grid, Context(run_id=1, node_id=0, node_config={{}}, state=RecordDict(), run_config=config))
        print(json.dumps({_optional_loaded()}))
    """, blocked=["cvxpy"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cvxpy" not in json.loads(proc.stdout.splitlines()[-1])
    (run_dir,) = runs.iterdir()
    return run_dir


def test_the_default_app_trains_without_cvxpy(default_run):
    history = json.loads((default_run / "history.json").read_text())
    assert [r["errors"] for r in history["rounds"]] == [[]]
    assert sorted(history["rounds"][0]["examples_per_node"].values()) == [64, 64]  # both nodes trained 2 steps


def test_report_without_matplotlib_writes_the_table_and_says_why_no_plots(default_run, tmp_path):
    out = tmp_path / "report"
    proc = run_python(f"""
        import sys
        from flsplit import cli
        code = cli.main(["report", {str(default_run)!r}, "--out", {str(out)!r}])
        print("exit", code, "matplotlib" in sys.modules)
    """, blocked=["matplotlib"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "exit 0 False"
    message = 'flsplit report\'s plots needs matplotlib: pip install "flsplit[reports]"'
    assert f"flsplit report: no plots: {message}" in proc.stderr
    assert "| label" in proc.stdout  # the table
    assert (out / "summary.csv").exists()
    assert message in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


# ------------------------------------------------------------------ (b) a missing extra is named
def test_epsl_with_energy_budgets_names_the_planners_extra():
    proc = run_python("""
        import sys
        from flsplit import cli
        sys.exit(cli.main(["plan", "--model", "digits-cnn", "--scenario", "heterogeneous", "--method", "epsl",
                           "--clients", "4", "--energy-budget", "0.002"]))
    """, blocked=["cvxpy"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "flsplit plan: error: EPSL planning with energy budgets (flsplit plan --method epsl --energy-budget, "
        'or planner epsl with planner-energy-budget) needs cvxpy: pip install "flsplit[planners]"')


def test_epsl_without_budgets_and_the_other_planners_need_no_cvxpy():
    proc = run_python("""
        import sys
        from flsplit import cli
        for method in ("epsl", "edgesplit", "asl", "fixed"):
            code = cli.main(["plan", "--model", "digits-cnn", "--scenario", "heterogeneous", "--method", method,
                             "--clients", "3", "--json"])
            assert code == 0, method
        print("ok", "cvxpy" in sys.modules)
    """, blocked=["cvxpy"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "ok False"


def test_sflga_cvxpy_solver_names_the_planners_extra():
    proc = run_python("""
        from flsplit.extras import MissingExtra
        from flsplit.cli.plan import model_profile
        from flsplit.planners import PlanningProblem
        from flsplit.planners.sflga_allocation import allocate_sflga
        from flsplit.sim.scenario_files import load_scenario

        problem = PlanningProblem.build(model_profile("digits-cnn"), load_scenario("heterogeneous"), samples=[64] * 3)
        allocate_sflga(problem, cut=1)  # the exact solver: no cvxpy
        try:
            allocate_sflga(problem, cut=1, solver="cvxpy")
        except MissingExtra as err:
            print(type(err).__mro__[1].__name__, err.name, err)
    """, blocked=["cvxpy"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == (
        "ImportError cvxpy allocate_sflga(solver='cvxpy') needs cvxpy: pip install \"flsplit[planners]\"")


def test_report_plots_name_the_reports_extra():
    proc = run_python("""
        from flsplit.cli import report_plots
        try:
            report_plots._matplotlib()
        except ImportError as err:
            print(err)
    """, blocked=["matplotlib"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == 'flsplit report\'s plots needs matplotlib: pip install "flsplit[reports]"'


def test_require_names_the_feature_and_keeps_other_import_errors(tmp_path, monkeypatch):
    message = 'a feature needs no_such_pkg_xyz: pip install "flsplit[planners]"'
    with pytest.raises(MissingExtra, match=re.escape(message)):
        require("no_such_pkg_xyz.sub", "planners", "a feature")
    # An installed package that fails on one of its own imports is not reported as a missing extra.
    (tmp_path / "broken_pkg_xyz.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("broken_pkg_xyz", "reports", "a feature")
    assert not isinstance(err.value, MissingExtra) and err.value.name == "no_such_dependency_xyz"
    assert require("json", "reports", "a feature") is json
    assert install_command("all") == 'pip install "flsplit[all]"'


# ------------------------------------------------------------------ (c) pyproject covers them
def _names(requirements) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _extra_closure(extra: str, extras: dict) -> set[str]:
    """The distributions an extra installs, following ``flsplit[...]`` references."""
    names = set()
    for req in extras[extra]:
        m = re.fullmatch(r"flsplit\[([^\]]+)\]", req.replace(" ", ""))
        if m:
            for inner in m.group(1).split(","):
                names |= _extra_closure(inner, extras)
        else:
            names |= _names([req])
    return names


def test_pyproject_extras_cover_every_optional_module():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    base = _names(project["dependencies"])
    for module, extra in EXTRAS.items():
        assert module in _extra_closure(extra, extras), (module, extra)
        assert module not in base, f"{module} is optional: it must not be a base dependency"
    every = set().union(*(_extra_closure(e, extras) for e in set(EXTRAS.values())))
    assert every <= _extra_closure("all", extras)
    assert every | {"pytest"} <= _extra_closure("dev", extras)  # the README's test install has everything
    # The default run's data and partitioners stay in the base install.
    assert {"scikit-learn", "flwr-datasets", "torch", "torchvision"} <= base


def test_optional_modules_are_imported_only_through_require():
    """No plain ``import cvxpy`` / ``from matplotlib... import`` in the package or the app:
    each import site goes through ``flsplit.extras.require``."""
    offenders = []
    for path in [*(ROOT / "flsplit").rglob("*.py"), *(ROOT / "apps").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.partition(".")[0] in EXTRAS]
    assert offenders == []
