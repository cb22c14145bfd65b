"""The README's main command, timed end to end, for one or more code versions (issue 23, item 3).

What it does
    For each ``--code LABEL=DIR`` (default: this checkout as ``this``), runs in ``DIR``::

        flwr run . --stream --federation-config "num-supernodes=4 client-resources-num-cpus=1"

    with ``PYTHONPATH=DIR`` (so Flower's simulation process imports that version's ``flsplit``),
    a fresh ``FLWR_HOME`` (a fresh managed SuperLink, stopped by its PID afterwards) and
    Flower's offline settings, and reads from its log the wall time of the whole command, each
    round's seconds (``[flsplit] round r/10 | ... | X s``), the plane each round used
    (``[flsplit] data plane: ...``) and the last round's test accuracy and loss. Versions run
    back to back, ``--repeats`` times each, interleaved, in the same invocation.

Run:  .venv/bin/python benchmarks/bench_main_job.py --code before=/tmp/wt-old --code after=. [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import code_version, kill_pid, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BINDIR = Path(sys.executable).parent
_ROUND = re.compile(r"\[flsplit\] round (\d+)/(\d+) \| test acc ([0-9.]+) \| test loss ([0-9.]+) .*\| ([0-9.]+) s")
_PLANE = re.compile(r"\[flsplit\] data plane: stream for (\d+) node\(s\) \[[^\]]*\](?: \(([^)]*)\))?, messages for (\d+)")


def run_once(label: str, code: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"flsplit-main-{label}-") as tmp:
        home = Path(tmp) / "flwr-home"
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(code),
               "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(BINDIR / "flwr"), "run", ".", "--stream", "--federation-config",
               "num-supernodes=4 client-resources-num-cpus=1"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        out = proc.stdout + proc.stderr
        for pid in subprocess.run(["pgrep", "-f", f"{home}/local-superlink"], capture_output=True,
                                  text=True).stdout.split():
            kill_pid(int(pid))
        rounds = [{"round": int(m[0]), "test_acc": float(m[2]), "test_loss": float(m[3]), "seconds": float(m[4])}
                  for m in _ROUND.findall(out)]
        planes = [{"stream": int(m[0]), "note": m[1], "messages": int(m[2])} for m in _PLANE.findall(out)]
        return {"label": label, "rc": proc.returncode, "wall_s": wall, "rounds": rounds, "planes": planes,
                "log_tail": out[-3000:] if proc.returncode else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", action="append", default=[], help="LABEL=DIR (repeatable)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    versions = [c.split("=", 1) for c in args.code] or [["this", str(REPO)]]
    runs: list[dict] = []
    for repeat in range(args.repeats):
        for label, code in versions:
            run = run_once(label, Path(code).resolve(), args.timeout)
            run["repeat"] = repeat
            runs.append(run)
            r = run["rounds"]
            print(f"{label} #{repeat}: rc {run['rc']}, {run['wall_s']:.1f} s whole command; round 1 "
                  f"{r[0]['seconds'] if r else float('nan'):.2f} s, rounds 2-{len(r)} "
                  f"{sum(x['seconds'] for x in r[1:]):.2f} s; final acc {r[-1]['test_acc'] if r else float('nan')}; "
                  f"stream rounds {sum(1 for p in run['planes'] if p['stream'] and not p['messages'])}/{len(r)}",
                  flush=True)
    print("\n| version | whole command s (median) | round 1 s | rounds 2-10 s | planes | final test acc / loss |")
    print("|---|---:|---:|---:|---|---|")
    for label, _ in versions:
        mine = [r for r in runs if r["label"] == label and r["rounds"]]
        if not mine:
            print(f"| {label} | failed | | | | |")
            continue
        med = statistics.median
        plane = "stream" if all(p["stream"] and not p["messages"] for r in mine for p in r["planes"]) and \
            all(r["planes"] for r in mine) else "messages (or mixed)"
        last = mine[0]["rounds"][-1]
        print(f"| {label} | {med(r['wall_s'] for r in mine):.1f} | {med(r['rounds'][0]['seconds'] for r in mine):.2f} | "
              f"{med(sum(x['seconds'] for x in r['rounds'][1:]) for r in mine):.2f} | {plane} | "
              f"{last['test_acc']:.4f} / {last['test_loss']:.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "code": code_version(), "runs": runs}, indent=1))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
