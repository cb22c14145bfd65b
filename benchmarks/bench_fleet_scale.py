"""Fleet scale: ``flwr run`` with 10, 100 and 1000 simulated SuperNodes, 10 sampled per round.

What it does, for each fleet size N (``--sizes 10,100,1000``):
    1. ``flwr run . --stream --federation-config "num-supernodes=N client-resources-num-cpus=1"
       --run-config 'fraction-train=10/N max-steps=2 num-server-rounds=R cost-scenario="none"
       output-dir="<tmp>"'`` from the repository root, with a fresh ``FLWR_HOME`` per N (so the
       managed SuperLink, and everything it starts, belongs to this N alone) and offline settings.
    2. While it runs, every 0.25 s: the process tree under the managed SuperLink (the process
       whose command line holds ``<FLWR_HOME>/local-superlink``; under it the ServerApp and the
       simulation with its Ray processes and workers), found in /proc. Memory of the tree is
       summed two ways: RSS (counts pages shared between processes once per process, so an
       upper bound) and PSS from ``/proc/<pid>/smaps_rollup`` (shared pages split between
       their sharers: what the tree costs the machine). The peaks are reported.
    3. Stops the SuperLink and its tree by PID (nothing by name), reads ``history.json``:
       seconds per round (round 1 holds the Ray and worker start-up and is shown apart; the
       mean of rounds 2..R), nodes that trained per round, errors, final test accuracy.

Run:  python benchmarks/bench_fleet_scale.py            (about 5 minutes on 2 cores)
      python benchmarks/bench_fleet_scale.py --sizes 10,100 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import REPO, alive, cmdline, code_version, descendants, kill_pid, machine, pids  # noqa: E402

SAMPLED = 10


def _kib(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeMemory:
    """Samples the RSS and PSS of a process tree in a thread; keeps the peaks (MiB)."""

    def __init__(self, find_root, period: float = 0.25) -> None:
        self.find_root, self.period = find_root, period
        self.peak_rss = self.peak_pss = 0.0
        self.peak_procs = 0
        self.commands: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            root = self.find_root()
            if root is None:
                continue
            tree = [root, *descendants(root)]
            rss = sum(_kib(Path(f"/proc/{p}/status"), "VmRSS") for p in tree) / 1024
            pss = sum(_kib(Path(f"/proc/{p}/smaps_rollup"), "Pss") for p in tree) / 1024
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(tree))
            self.commands |= {" ".join(cmdline(p).split()[:2])[:80] for p in tree}


def superlink_pids(flwr_home: Path) -> list[int]:
    marker = str(flwr_home / "local-superlink")
    return [p for p in pids() if marker in cmdline(p)]


def run_fleet(n: int, rounds: int, timeout: float, workdir: Path) -> dict:
    flwr_home, runs = workdir / f"flwr-home-{n}", workdir / f"runs-{n}"
    flwr_home.mkdir(parents=True)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    fraction = SAMPLED / n
    run_config = (f'fraction-train={fraction} max-steps=2 num-server-rounds={rounds} cost-scenario="none" '
                  f'output-dir="{runs}"')
    federation = f"num-supernodes={n} client-resources-num-cpus=1"
    cmd = ["flwr", "run", ".", "--stream", "--federation-config", federation, "--run-config", run_config]
    find_root = lambda: next(iter(superlink_pids(flwr_home)), None)  # noqa: E731
    t0 = time.perf_counter()
    try:
        with TreeMemory(find_root) as memory:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        for root in superlink_pids(flwr_home):
            tree = descendants(root)
            kill_pid(root)
            for pid in tree:
                if alive(pid):
                    kill_pid(pid, grace=2.0)
    wall = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run with {n} nodes failed:\n{output[-3000:]}")
    (history_file,) = runs.glob("*/history.json")
    history = json.loads(history_file.read_text())["rounds"]
    later = [r["wall_seconds"] for r in history[1:]]
    return {
        "supernodes": n, "fraction_train": fraction, "rounds": len(history),
        "round1_s": history[0]["wall_seconds"], "round_s_mean_2_on": statistics.mean(later) if later else None,
        "round_s_each": [round(r["wall_seconds"], 2) for r in history],
        "trained_per_round": [sum(1 for v in r["examples_per_node"].values() if v > 0) for r in history],
        "errors": sum(len(r["errors"]) for r in history),
        "test_accuracy": [round(r["test_accuracy"], 4) for r in history],
        "peak_rss_mib": round(memory.peak_rss), "peak_pss_mib": round(memory.peak_pss),
        "peak_processes": memory.peak_procs, "flwr_run_wall_s": round(wall, 1),
        "process_kinds": sorted(memory.commands),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000", help="fleet sizes, comma list (default 10,100,1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per flwr run (default 900)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        for n in sizes:
            print(f"[fleet] {n} SuperNodes, {SAMPLED} sampled per round ...", flush=True)
            results.append(run_fleet(n, args.rounds, args.timeout, Path(tmp)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "process_kinds"}), flush=True)
    print()
    print("| SuperNodes | sampled | round 1 (s) | rounds 2.. mean (s) | nodes trained per round | errors "
          "| peak PSS (MiB) | peak RSS sum (MiB) | processes | test acc per round |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        mean = f"{r['round_s_mean_2_on']:.2f}" if r["round_s_mean_2_on"] is not None else "-"
        print(f"| {r['supernodes']} | {SAMPLED} | {r['round1_s']:.2f} | {mean} | {r['trained_per_round']} | "
              f"{r['errors']} | {r['peak_pss_mib']} | {r['peak_rss_mib']} | {r['peak_processes']} | "
              f"{r['test_accuracy']} |")
    record = {"results": results, "machine": machine(), "code": code_version(), "argv": sys.argv}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    print("\nprocess kinds seen (first two words of each command line):")
    for kind in sorted({k for r in results for k in r["process_kinds"]}):
        print("  ", kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
