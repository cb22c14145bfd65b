"""Run-long sessions against per-round sessions in a real deployment (issue 23, item 1).

What it does
    For each code version named (``--code LABEL=DIR``, default: this checkout as ``warm``),
    starts a fresh SuperLink + 2 SuperNodes on loopback (``bench_stream_deployment.Deployment``)
    with ``PYTHONPATH=DIR`` for every process it starts (so the SuperLink's ServerApp process
    and the SuperNodes' ClientApp processes import that version's ``flsplit``), runs the
    project's app from ``DIR``::

        flwr run DIR deploy --stream --run-config 'strategy="psl" num-server-rounds=5
            max-steps=20 data-plane="stream" output-dir="<tmp>/runs"'

    and reads, per round, ``wall_seconds`` from history.json and the plane's log line
    (``sessions open and first replies in X s`` on per-round sessions; on run-long sessions
    ``N opened, first replies in X s`` in round 1 and ``N on sessions open since an earlier
    round`` after it). The opening of a round is the time from its carriers' push to the
    first replies, as the plane logs it; for a round on sessions already open there is no
    carrier, and its opening is the round's first step, included in its wall time.
    The versions run one after the other in the same invocation (same machine, same load
    window); the table puts them side by side.

Run:  .venv/bin/python benchmarks/bench_warm_deployment.py --code per-round=/tmp/wt-old --code warm=.
      [--rounds 5] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stream_deployment import Deployment, log_findings  # noqa: E402
from procs import code_version, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_OPENED = re.compile(r"data plane: stream for (\d+) node\(s\) \[[^\]]*\] \(([^)]*)\)")
_SECONDS = re.compile(r"first replies in ([0-9.]+) s")


def run_version(label: str, code: Path, rounds: int, steps: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"flsplit-warm-{label}-") as tmp_dir:
        tmp = Path(tmp_dir)
        deployment = Deployment(tmp)
        deployment.env["PYTHONPATH"] = str(code)
        runs = tmp / "runs"
        config = (f'strategy="psl" num-server-rounds={rounds} max-steps={steps} data-plane="stream" '
                  f'output-dir="{runs}"')
        deployment.start()
        try:
            time.sleep(3.0)  # the SuperNodes register
            rc, wall, cmd = deployment.flwr_run(code, config, "run.log", timeout)
        finally:
            notes = deployment.stop()
        text = (deployment.logs / "run.log").read_text(errors="replace")
        history = [json.loads(p.read_text()) for p in runs.glob("*/history.json")]
        per_round = []
        lines = _OPENED.findall(text)
        for i, record in enumerate(history[0]["rounds"] if history else []):
            opened = None
            if i < len(lines):
                found = _SECONDS.search(lines[i][1])
                opened = float(found.group(1)) if found else None
            per_round.append({"round": i + 1, "wall_s": record["wall_seconds"], "opened_s": opened,
                              "plane_note": lines[i][1] if i < len(lines) else None,
                              "server_steps": record.get("server_steps"), "errors": record.get("errors"),
                              "test_accuracy": record.get("test_accuracy")})
        return {"label": label, "code": str(code), "rc": rc, "flwr_run_s": wall, "command": cmd,
                "rounds": per_round, "stop_notes": notes, "log_findings": log_findings(deployment.logs)}


def table(results: list[dict]) -> str:
    rounds = max(len(r["rounds"]) for r in results)
    head = "| version | " + " | ".join(f"r{i + 1} wall s (open s)" for i in range(rounds)) + " | rounds 2+ wall s | flwr run s |"
    rows = [head, "|---|" + "---:|" * (rounds + 2)]
    for r in results:
        cells = []
        for rec in r["rounds"]:
            opened = f" ({rec['opened_s']:.2f})" if rec["opened_s"] is not None else ""
            cells.append(f"{rec['wall_s']:.2f}{opened}")
        later = sum(rec["wall_s"] for rec in r["rounds"][1:])
        rows.append(f"| {r['label']} | " + " | ".join(cells) + f" | {later:.2f} | {r['flwr_run_s']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=[], help="LABEL=DIR of a checkout to run (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    versions = [c.split("=", 1) for c in args.code] or [["warm", str(REPO)]]
    results = []
    for label, code in versions:
        print(f"== {label}: {code}", flush=True)
        results.append(run_version(label, Path(code).resolve(), args.rounds, args.steps, args.timeout))
        print(json.dumps(results[-1]["rounds"], indent=1), flush=True)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "code": code_version(), "results": results}, indent=1))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
