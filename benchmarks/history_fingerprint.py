"""Fingerprint of the default run's history, per scheme and planner (issue 21's check).

Runs this repository's ServerApp on an in-process grid (4 nodes, the embedded digits) for 3
rounds for SL, SFL-V1, SFL-V2, PSL, EPSL, SFL-GA and async SL, and for each planner in the
loop (EdgeSplit and OPEN with PSL, the EPSL planner with EPSL, CCC with SFL-GA and a small
agent trained with a fixed seed), and keeps every history field but the ones that measure
wall time or name paths. A restructure that changes no arithmetic leaves it bit-identical:

    python benchmarks/history_fingerprint.py --out before.json        # on the old commit
    python benchmarks/history_fingerprint.py --check before.json      # on the new one

``--check`` prints each differing field and exits 1 if any differs. The fingerprint of the
tree before issue 21's renovation is ``benchmarks/history_fingerprint.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Fields that measure wall time or name the run's files: not part of the fingerprint.
VOLATILE = {"wall_seconds", "planning_seconds", "planning_s", "final_model", "run_id", "output-dir", "planner-agent",
            "noop_exchange_seconds"}

COMMON = {"num-server-rounds": 3, "max-steps": 4, "batch-size": 16}
RUNS = {
    "sl": {"strategy": "sl"},
    "sflv1": {"strategy": "sflv1"},
    "sflv2": {"strategy": "sflv2"},
    "psl": {"strategy": "psl"},
    "epsl": {"strategy": "epsl"},
    "sflga": {"strategy": "sflga"},
    "async": {"strategy": "async", "state-window": "4"},
    "psl+edgesplit": {"strategy": "psl", "planner": "edgesplit", "cost-scenario": "edge-diverse"},
    "psl+asl": {"strategy": "psl", "planner": "asl", "cost-scenario": "edge-diverse"},
    "epsl+epsl": {"strategy": "epsl", "planner": "epsl", "cost-scenario": "edge-diverse"},
    "sflga+ccc": {"strategy": "sflga", "planner": "ccc", "cost-scenario": "edge-diverse"},
}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _agent(path: Path) -> Path:
    """A small CCC agent for 4 clients of edge-diverse (fixed seed), as tests/test_adaptive.py trains."""
    from apps.task import RunSettings, make_model_fn
    from flsplit.planners import CCCEnvironment, PlanningProblem, train_ccc_agent
    from flsplit.model.profile import profile_model
    from flsplit.sim.scenario_files import load_scenario

    profile = profile_model(make_model_fn(RunSettings({}))(), (1, 8, 8))
    problem = PlanningProblem.build(profile, load_scenario("edge-diverse"),
                                    samples=[COMMON["max-steps"] * COMMON["batch-size"]] * 4, client_ids=[0, 1, 2, 3])
    agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=5), episodes=15, seed=0)
    agent.save(path)
    return path


def run(name: str, config: dict, work: Path) -> dict:
    from flwr.app import Context, RecordDict

    from apps.client_app import app as client_app
    from apps.server_app import app as server_app
    from flsplit.planes.inprocess import InProcessGrid

    out = work / name
    run_config = {"output-dir": str(out), "data-plane": "message", **COMMON, **config}
    if config.get("planner") == "ccc":
        run_config["planner-agent"] = str(_agent(work / "ccc.pt"))
    grid = InProcessGrid(client_app, 4, run_config=run_config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    (history,) = out.glob("*/history.json")
    return _strip(json.loads(history.read_text()))


def _diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{path}.{k}: only in {'new' if k in b else 'old'}"
            else:
                yield from _diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {a!r} -> {b!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the fingerprint here")
    parser.add_argument("--check", type=Path, help="compare with a fingerprint written before")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prints = {name: run(name, cfg, Path(tmp)) for name, cfg in RUNS.items() if not args.only or name in args.only}
    if args.out:
        args.out.write_text(json.dumps(prints, indent=1, sort_keys=True))
        print(f"wrote {args.out} ({len(prints)} runs)")
    if args.check:
        old = json.loads(args.check.read_text())
        diffs = [d for name in prints for d in _diff(old.get(name), prints[name], name)]
        for d in diffs[:200]:
            print(d)
        print(f"{len(prints)} runs compared, {len(diffs)} differing fields")
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
