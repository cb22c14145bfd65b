"""Flower simulation: seconds per split step in ``flwr run`` with 4 nodes, next to a no-op
exchange measured in the same run.

What it does
    1. ``flwr run . --stream --federation-config "num-supernodes=4" --run-config
       'noop-exchanges=20 num-server-rounds=3 output-dir="<tmp>" ...'`` from the repository
       root, with ``FLWR_HOME`` set to a fresh temporary directory (the managed local SuperLink
       on ports 39091/39093 starts there), offline settings in the environment. ``--runs N``
       submits N runs to that SuperLink, one after the other (``--noop-exchanges 20,200``:
       the first run is exactly the command above, the second has 200 no-op exchanges).
    2. Stops the managed SuperLink afterwards: the process whose command line contains
       ``<FLWR_HOME>/local-superlink`` (found in /proc, killed by PID), then any of its
       children still alive (also by PID). Nothing is killed by name.
    3. Reads each run's ``history.json`` and reports, per round after round 1 (round 1
       holds the Ray/worker warm-up and is reported separately):

       exchange (= split step)
           one lockstep request/reply with all 4 nodes. A PSL round of S server steps is
           S + 1 exchanges (the first only fetches the first smashed batches; the last only
           returns gradients and collects the client parts), so
           ``seconds per split step = wall_seconds / (server_steps + 1)``; it also carries the
           round's configure/aggregate/evaluate work spread over the exchanges.
       no-op floor
           ``noop_exchange_seconds``: mean of ``noop-exchanges`` empty exchanges with all
           nodes, measured by the ServerApp before round 1 of the same run. The first of them
           also load the ClientApp (torch, flsplit) in the Ray workers, which only the mean
           shows; so the default is two runs, with 20 (the plain command) and 200 no-op
           exchanges, and the warm floor is the difference quotient
           ``(200 * mean_200 - 20 * mean_20) / 180`` (the warm-up cancels out if equal).
    4. Estimates the compute of a split step by running the same strategy, model, data and
       settings in-process (``InProcessGrid`` + ``apps.client_app.app``, no Flower engine, no
       Ray) after the simulation has ended: ``wall / (server_steps + 1)`` of rounds 2..R. That
       is every client's and the server's work of an exchange (forward, recompute, backward,
       encoding, checks), run one after another as the simulation's single Ray actor does
       (Flower's default client resources, 2 CPUs, leave room for one actor on 2 cores). With
       ``--threads 1,2`` it is measured at both torch thread counts (the actor gets
       ``OMP_NUM_THREADS=2`` from Ray by default).

The judgement printed at the end: split step <= no-op floor + in-process step?

Run:  python benchmarks/bench_flwr_sim.py        (about 2.5-4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PORTS = (39091, 39093)


# ---------------------------------------------------------------------------- processes
def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs whose command line contains ``<FLWR_HOME>/local-superlink`` (ours only)."""
    needle = f"{flwr_home}/local-superlink"
    return [pid for pid in _pids() if pid != os.getpid() and needle in _cmdline(pid)]


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        children.setdefault(_ppid(pid), []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = ""
    try:
        state = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "zombie" not in state


def _kill(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_superlink(flwr_home: Path) -> list[str]:
    """Kill our managed SuperLink by PID, then its leftover children by PID."""
    notes = []
    for pid in superlink_pids(flwr_home):
        kids = descendants(pid)
        _kill(pid)
        notes.append(f"killed SuperLink PID {pid}")
        time.sleep(1.0)
        for kid in kids:
            if _alive(kid):
                notes.append(f"killed leftover child PID {kid}: {_cmdline(kid)[:80]}")
                _kill(kid, grace=5.0)
    return notes


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------- the flwr run
def flwr_run(args, noop_exchanges: int, flwr_home: Path, out_dir: Path, log_path: Path) -> tuple[int, float]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        PATH=f"{Path(sys.executable).parent}:/work/venv/bin:{env.get('PATH', '')}",
    )
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    run_config = (
        f'noop-exchanges={noop_exchanges} num-server-rounds={args.rounds} output-dir="{out_dir}"'
        + (f" {args.extra_run_config}" if args.extra_run_config else "")
    )
    cmd = ["flwr", "run", ".", "--stream", "--federation-config", args.federation_config, "--run-config", run_config]
    print("$ " + " ".join(repr(c) if " " in c else c for c in cmd), flush=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
    return proc.returncode, time.perf_counter() - t


class RunFailed(RuntimeError):
    pass


def per_step(rounds: list[dict]) -> list[dict]:
    """Per-round step timings; a round with errors or without server steps is a failed run."""
    out = []
    for r in rounds:
        if r.get("errors") or r["server_steps"] == 0:
            first = (r.get("errors") or [{"error": "no server steps"}])[0]
            raise RunFailed(f"round {r['round']}: {len(r.get('errors') or [])} node errors, "
                            f"{r['server_steps']} server steps; first: {str(first.get('error'))[-600:]}")
        exchanges = r["server_steps"] + 1
        nodes = len(r["nodes"])
        out.append({
            "round": r["round"],
            "server_steps": r["server_steps"],
            "exchanges": exchanges,
            "messages": r["messages"],
            "messages_expected": 2 * nodes * exchanges,
            "wall_seconds": r["wall_seconds"],
            "seconds_per_step": r["wall_seconds"] / exchanges,
            "test_accuracy": r.get("test_accuracy"),
        })
    return out


# ---------------------------------------------------------------------------- in-process estimate
def parse_run_config(text: str) -> dict:
    """``'k1=v1 k2="v 2"'`` as flwr parses it (TOML values)."""
    import shlex
    import tomllib

    return tomllib.loads("\n".join(f"{k} = {v}" for k, _, v in (i.partition("=") for i in shlex.split(text, posix=False))))


def inprocess_estimate(args, threads: list[int]) -> dict:
    """Per thread count: seconds per exchange of the same run in-process, and pure model compute."""
    import torch
    from flwr.app import ArrayRecord

    from apps.client_app import app as client_app
    from apps.server_app import build_strategy
    from apps.task import RunSettings, make_evaluate_fn, make_model_fn
    from flsplit.data.datasets import load_partition
    from flsplit.planes.dataplane import MessageDataPlane, time_noop_exchanges
    from flsplit.runtime.history import RunHistory
    from flsplit.planes.inprocess import InProcessGrid
    from flsplit.wire.protocol import NOOP

    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = {"num-server-rounds": args.rounds, **parse_run_config(args.extra_run_config)}
    settings = RunSettings(overrides)
    model_fn = make_model_fn(settings)

    # pure model compute of a PSL step: the unsplit model on the union batch (nodes x batch)
    model = model_fn().blocks
    bs = int(settings["batch-size"])
    x = torch.cat([load_partition(settings["dataset"], i, args.nodes).x[:bs] for i in range(args.nodes)])
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def central_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    out = {n: {"rounds": [], "noop": [], "central": []} for n in threads}
    for _ in range(args.inprocess_repeats):
        for n in threads:  # interleaved
            torch.set_num_threads(n)
            strategy = build_strategy(settings, RunHistory())
            grid = InProcessGrid(client_app, args.nodes, run_config=dict(overrides))
            out[n]["noop"].append(time_noop_exchanges(MessageDataPlane(grid), list(grid.node_ids), 20, NOOP))
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()),
                           num_rounds=args.rounds, evaluate_fn=make_evaluate_fn(settings, model_fn))
            out[n]["rounds"] += per_step(strategy.history.rounds)[1:]
            for _ in range(5):
                central_step()
            t = time.perf_counter()
            for _ in range(50):
                central_step()
            out[n]["central"].append((time.perf_counter() - t) / 50)
    return {
        "settings": {k: settings[k] for k in ("strategy", "model", "dataset", "batch-size", "cut-layer", "momentum")},
        "by_threads": {
            n: {"rounds": v["rounds"],
                "seconds_per_step_median": statistics.median(r["seconds_per_step"] for r in v["rounds"]),
                "noop_seconds_median": statistics.median(v["noop"]),
                "central_union_step_seconds": statistics.median(v["central"])}
            for n, v in out.items()
        },
    }


# ---------------------------------------------------------------------------- main
def machine() -> dict:
    import flwr
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="flwr runs submitted to the same managed SuperLink")
    ap.add_argument("--rounds", type=int, default=3, help="num-server-rounds (round 1 is warm-up)")
    ap.add_argument("--noop-exchanges", default="20,200",
                    help="noop-exchanges per run, comma-separated, cycled over the runs; two different values "
                         "give the warm floor (the first exchanges include loading the ClientApp in the workers)")
    ap.add_argument("--nodes", type=int, default=4, help="only for the in-process estimate; see --federation-config")
    ap.add_argument("--federation-config", default="num-supernodes=4")
    ap.add_argument("--extra-run-config", default="", help="more run-config pairs, e.g. 'strategy=\"psl\"'")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per flwr run")
    ap.add_argument("--wait-ports", type=float, default=300, help="wait this long for ports 39091/39093 to be free")
    ap.add_argument("--threads", default="1,2",
                    help="torch thread counts for the in-process estimate (2 = what the simulation uses here: "
                         "Ray sets OMP_NUM_THREADS to the actor's num_cpus, 2 by default; torch's default is 2)")
    ap.add_argument("--omp-threads", type=int, default=0,
                    help="set OMP_NUM_THREADS for the flwr run (0 = leave unset: Flower/Ray defaults)")
    ap.add_argument("--inprocess-repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)
    noops = [int(v) for v in str(args.noop_exchanges).split(",") if v.strip()]

    deadline = time.monotonic() + args.wait_ports
    while any(port_busy(p) for p in PORTS):
        if time.monotonic() > deadline:
            print(f"ports {PORTS} are in use (another SuperLink?): not starting a second one", file=sys.stderr)
            return 2
        time.sleep(5)

    tmp = Path(tempfile.mkdtemp(prefix="flsplit-bench-flwr-"))
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    runs = []
    load_before = os.getloadavg()
    try:
        for i in range(args.runs):
            out_dir = tmp / f"out-{i}"
            log_path = tmp / f"flwr-run-{i}.log"
            n_noop = noops[i % len(noops)]
            rc, seconds = flwr_run(args, n_noop, flwr_home, out_dir, log_path)
            histories = sorted(out_dir.glob("*/history.json"))
            print(f"run {i + 1}/{args.runs}: exit {rc}, {seconds:.1f} s, log {log_path}", flush=True)
            if rc != 0 or not histories:
                print(log_path.read_text()[-4000:], file=sys.stderr)
                return 1
            history = json.loads(histories[-1].read_text())
            runs.append({
                "noop_exchanges": n_noop,
                "seconds_total": seconds,
                "noop_exchange_seconds": history.get("noop_exchange_seconds"),
                "rounds": per_step(history["rounds"]),
            })
    except RunFailed as err:
        print(f"run failed: {err}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        for note in stop_superlink(flwr_home):
            print(note)
        left = superlink_pids(flwr_home)
        if left:
            print(f"WARNING: SuperLink PIDs still alive: {left}", file=sys.stderr)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("in-process estimate (same strategy/model/data, no Flower engine) ...", flush=True)
    threads = [int(v) for v in str(args.threads).split(",") if v.strip()]
    est = inprocess_estimate(args, threads)
    load_after = os.getloadavg()

    later = [r for run in runs for r in run["rounds"][1:]]
    first = [run["rounds"][0] for run in runs]
    step_med = statistics.median(r["seconds_per_step"] for r in later)
    noop_raw = statistics.median(run["noop_exchange_seconds"] for run in runs if run["noop_exchanges"] == noops[0])
    # Warm floor: total no-op time = warm-up + N * floor; two N give both.
    warm = None
    by_n = {}
    for run in runs:
        by_n.setdefault(run["noop_exchanges"], []).append(run["noop_exchange_seconds"] * run["noop_exchanges"])
    if len(by_n) >= 2:
        items = sorted((n, statistics.median(t)) for n, t in by_n.items())
        (n1, t1), (n2, t2) = items[0], items[-1]
        warm = {"floor": (t2 - t1) / (n2 - n1), "warm_up": t1 - n1 * (t2 - t1) / (n2 - n1), "from": [n1, n2]}
    print(f"\nflwr run, {args.federation_config}, num-server-rounds={args.rounds} {args.extra_run_config}"
          + (f", OMP_NUM_THREADS={args.omp_threads}" if args.omp_threads else "") + f"; {est['settings']}")
    print("run round steps exch msgs  wall_s  s/step")
    for i, run in enumerate(runs):
        for r in run["rounds"]:
            tag = "  (warm-up)" if r["round"] == 1 else ""
            print(f"{i + 1:3d} {r['round']:5d} {r['server_steps']:5d} {r['exchanges']:4d} {r['messages']:4d} "
                  f"{r['wall_seconds']:7.3f} {r['seconds_per_step']:7.4f}{tag}")
        print(f"{i + 1:3d} no-op exchange, mean of {run['noop_exchanges']}: {run['noop_exchange_seconds']:.4f} s")
    print(f"\nseconds per split step (rounds 2..{args.rounds}, median over {len(later)} rounds):   {step_med:.4f}")
    print(f"no-op exchange, mean of the first {noops[0]} (includes ClientApp loading):    {noop_raw:.4f}")
    if warm:
        print(f"no-op exchange floor, warm (from runs with {warm['from'][0]} and {warm['from'][1]}):          "
              f"{warm['floor']:.4f}   (warm-up {warm['warm_up']:.1f} s)")
    floor = warm["floor"] if warm else noop_raw
    verdicts = {}
    for n, e in est["by_threads"].items():
        compute = e["seconds_per_step_median"]
        bound = floor + compute
        verdicts[n] = {"compute": compute, "bound": bound, "within": step_med <= bound, "excess": step_med - bound}
        print(f"in-process, torch threads {n}: split step {compute:.4f} s (model compute alone "
              f"{e['central_union_step_seconds']:.4f}, no-op exchange {e['noop_seconds_median'] * 1e3:.3f} ms)")
        print(f"  split step <= floor + in-process step ({floor:.4f} + {compute:.4f} = {bound:.4f})?  "
              f"{'yes' if step_med <= bound else 'NO'}  (excess {step_med - bound:+.4f} s)")
    print(f"split step / floor = {step_med / floor:.2f}")
    print("round 1 (warm-up): " + ", ".join(f"{r['wall_seconds']:.2f} s" for r in first))
    print(f"# load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")

    results = {"machine": machine(), "args": vars(args), "runs": runs, "inprocess": est,
               "seconds_per_step_median": step_med, "noop_first_mean": noop_raw, "noop_warm": warm,
               "floor": floor, "verdicts": verdicts, "load_average": [load_before, load_after]}
    print(f"# {results['machine']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
