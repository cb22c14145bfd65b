"""Stream data plane in Flower's simulation engine: seconds per PSL split step, 4 nodes, against
the in-process cost of the same step.

What it does
    1. ``flwr run <repo> --stream --federation-config "num-supernodes=4
       client-resources-num-cpus=1" (--federation changes it) --run-config 'strategy="psl"
       num-server-rounds=2 data-plane="stream" output-dir="<tmp>/sim-stream"'``, then the same
       with ``data-plane="message"``, from the repository root, with a private ``FLWR_HOME``
       (the managed local SuperLink starts there, on free loopback ports passed through
       ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT`` so that a
       SuperLink of someone else's on 39091/39093 is never used) and Flower's offline settings.
       Flower's default actor pool is enough: since issue 23 a ClientApp answers its message
       once its session is open and serves the session from its Ray worker (until then this
       benchmark used ``init-args-num-cpus=4``, so that 4 ClientApps could hold 4 sessions).
       Afterwards the managed SuperLink (the process whose command line holds
       ``<FLWR_HOME>/local-superlink``) and every descendant it had (Ray included) are
       stopped by PID.
    2. Seconds per split step = ``wall_seconds / server_steps`` per round of history.json
       (round 1 also loads the ClientApps in the Ray workers and opens the sessions; round 2
       is the one compared); ``wall_seconds`` includes the round's configure, aggregation and
       central evaluation, the same in every row. Checks ``data_plane`` is ``stream`` for all
       4 nodes.
    3. In-process references (``flsplit.planes.inprocess.InProcessGrid`` + the project's ServerApp and
       ClientApp objects, same run config, no Flower engine, no Ray): ``data-plane="message"``
       on the serial grid (each node's request handled inside the push: the message plane's
       per-step client state save/restore, no transport), and ``data-plane="stream"`` on
       ``InProcessGrid(threaded=True)`` (real TLS sessions, clients on threads of this process).
       Both also with 3 local epochs (3x the steps): the difference quotient of round 2 is the
       per-step cost without the round's fixed work.
    4. Compute only: one PSL step of the model alone (4 clients' forward on 32 samples each
       up to the cut, the server part on the 4 smashed batches, backward through both,
       optimizer steps), torch threads 1 (what a one-CPU Ray actor gets) and 2.

Goal it reports against: stream per-step time (simulation, round 2) <= in-process step + 2 ms.

Run:  .venv/bin/python benchmarks/bench_stream_sim.py [--json out.json]   (about 3-5 minutes)
      ``--omp-threads 1``: the same with OMP_NUM_THREADS=1 for the flwr runs (the ServerApp's
      torch then uses one thread, as the ClientApp actors do) and torch threads 1 in-process.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BINDIR = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import alive, cmdline, code_version, descendants, free_ports, kill_pid, machine, pids  # noqa: E402
# The README's federation: since issue 23 sessions are detached, so Flower's default actor pool
# (two here) streams a lockstep round; --federation changes it.
FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"


# ---------------------------------------------------------------------------- processes


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs whose command line contains ``<FLWR_HOME>/local-superlink`` (ours only)."""
    needle = f"{flwr_home}/local-superlink"
    return [pid for pid in pids() if pid != os.getpid() and needle in cmdline(pid)]


class Watch:
    """Remembers every descendant the managed SuperLink ever had (sampled), to stop leftovers."""

    def __init__(self, flwr_home: Path) -> None:
        self.flwr_home = flwr_home
        self.seen: dict[int, str] = {}

    def sample(self) -> None:
        for root in superlink_pids(self.flwr_home):
            for pid in [root, *descendants(root)]:
                self.seen.setdefault(pid, cmdline(pid)[:160])

    def stop(self) -> list[str]:
        self.sample()
        notes = []
        roots = superlink_pids(self.flwr_home)
        for pid in roots:
            kill_pid(pid)
            notes.append(f"stopped managed SuperLink PID {pid}")
        time.sleep(1.0)
        for pid, cmd in self.seen.items():
            if pid not in roots and alive(pid) and cmdline(pid)[:160] == cmd:  # same process, not a reused PID
                notes.append(f"leftover PID {pid} killed: {cmd[:120]}")
                kill_pid(pid, grace=5.0)
        return notes


def flwr_run(plane: str, env: dict, out_dir: Path, log_path: Path, watch: Watch, timeout: float,
             extra: str) -> tuple[int, float, str]:
    run_config = f'strategy="psl" num-server-rounds=2 data-plane="{plane}" output-dir="{out_dir}"' + (f" {extra}" if extra else "")
    cmd = [str(BINDIR / "flwr"), "run", str(REPO), "--stream", "--federation-config", FEDERATION, "--run-config", run_config]
    shown = "flwr run " + str(REPO) + f" --stream --federation-config \"{FEDERATION}\" --run-config '{run_config}'"
    print("$ " + shown, flush=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            watch.sample()
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return -1, time.perf_counter() - t, shown
            time.sleep(1.0)
    return proc.returncode, time.perf_counter() - t, shown


def rounds_of(history: dict) -> list[dict]:
    out = []
    for r in history["rounds"]:
        out.append({"round": r["round"], "server_steps": r["server_steps"], "wall_seconds": r["wall_seconds"],
                    "seconds_per_step": r["wall_seconds"] / max(r["server_steps"], 1),
                    "seconds_per_exchange": r["wall_seconds"] / (r["server_steps"] + 1),
                    "messages": r["messages"], "errors": len(r["errors"]), "data_plane": r.get("data_plane", {}),
                    "test_accuracy": r.get("test_accuracy")})
    return out


# ---------------------------------------------------------------------------- in-process
def inprocess(plane: str, threaded: bool, extra: dict, tmp: Path) -> list[dict]:
    from flwr.app import Context, RecordDict

    from apps.client_app import app as client_app
    from apps.server_app import app as server_app
    from flsplit.planes.inprocess import InProcessGrid

    out_dir = tmp / f"inproc-{plane}-{'threaded' if threaded else 'serial'}"
    run_config = {"strategy": "psl", "num-server-rounds": 2, "data-plane": plane, "output-dir": str(out_dir), **extra}
    grid = InProcessGrid(client_app, 4, run_config=run_config, threaded=threaded)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    (history_file,) = out_dir.glob("*/history.json")
    return rounds_of(json.loads(history_file.read_text()))


def compute_only(threads: int, repeats: int = 200) -> dict:
    """Seconds of one PSL step of the model alone (default settings: digits-cnn, cut 2, batch 32, 4 nodes)."""
    import torch

    from apps.task import RunSettings, make_model_fn
    from flsplit.data.datasets import load_partition

    settings = RunSettings({})
    torch.set_num_threads(threads)
    model = make_model_fn(settings)()
    cut, bs, nodes = int(settings["cut-layer"]), int(settings["batch-size"]), 4
    clients = [copy.deepcopy(torch.nn.Sequential(*list(model.blocks)[:cut])) for _ in range(nodes)]  # one per node
    server = torch.nn.Sequential(*list(model.blocks)[cut:])
    data = [load_partition(settings["dataset"], i, nodes) for i in range(nodes)]
    xs = [d.x[:bs] for d in data]
    ys = [d.y[:bs] for d in data]
    opts = [torch.optim.SGD(c.parameters(), lr=0.1, momentum=0.9) for c in clients]
    sopt = torch.optim.SGD(server.parameters(), lr=0.1, momentum=0.9)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        smashed = [c(x) for c, x in zip(clients, xs)]  # the clients' forward
        t1 = time.perf_counter()
        leaves = [s.detach().requires_grad_(True) for s in smashed]
        sopt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(server(torch.cat(leaves)), torch.cat(ys))
        loss.backward()
        sopt.step()
        t2 = time.perf_counter()
        for o, s, leaf in zip(opts, smashed, leaves):  # the clients' backward
            o.zero_grad(set_to_none=True)
            s.backward(leaf.grad)
            o.step()
        t3 = time.perf_counter()
        return t3 - t0, t2 - t1

    for _ in range(20):
        step()
    total, srv = zip(*(step() for _ in range(repeats)))
    return {"threads": threads, "step_s": statistics.median(total), "server_s": statistics.median(srv),
            "clients_s": statistics.median(t - s for t, s in zip(total, srv))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planes", default="stream,message", help="data planes to run in the simulation, in order")
    ap.add_argument("--extra-run-config", default="", help="more run-config pairs for every run (and in-process)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per flwr run")
    ap.add_argument("--federation", default=FEDERATION, help="the flwr run --federation-config")
    ap.add_argument("--omp-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for the flwr runs (the ServerApp's torch threads; 0 = unset: torch uses "
                         "every core; Ray gives each one-CPU ClientApp actor 1 either way)")
    ap.add_argument("--retries", type=int, default=2,
                    help="rerun a stream run refused because Ray's actor pool was not up in time (see the log)")
    ap.add_argument("--inprocess-repeats", type=int, default=3)
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)
    globals()["FEDERATION"] = args.federation  # read by flwr_run and the report
    extra_cfg: dict = {}
    if args.extra_run_config:
        import shlex
        import tomllib

        extra_cfg = tomllib.loads("\n".join(f"{k} = {v}" for k, _, v in
                                            (i.partition("=") for i in shlex.split(args.extra_run_config, posix=False))))

    tmp = Path(tempfile.mkdtemp(prefix="flsplit-bench-stream-sim-"))
    flwr_home = tmp / "flwr-home"
    flwr_home.mkdir()
    http_port, control_port = free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    watch = Watch(flwr_home)
    load_before = os.getloadavg()
    results: dict = {"machine": machine(), "federation_config": FEDERATION, "sim": {}, "tmp": str(tmp),
                     "code_before": code_version(),
                     "ports": [http_port, control_port]}
    ok = True
    try:
        for plane in [p.strip() for p in args.planes.split(",") if p.strip()]:
            failures = []
            for attempt in range(1 + args.retries):
                out_dir = tmp / f"sim-{plane}-{attempt}"
                log_path = tmp / f"flwr-run-{plane}-{attempt}.log"
                rc, seconds, shown = flwr_run(plane, env, out_dir, log_path, watch, args.timeout, args.extra_run_config)
                print(f"simulation, data-plane={plane}: exit {rc}, {seconds:.1f} s", flush=True)
                log_text = log_path.read_text(errors="replace")
                race = "runs 0 ClientApps at a time" in log_text  # (flwr run exits 0 even then)
                if not race:
                    break
                # flsplit.planes.stream.simulation looks for Ray's actor pool for 2 s at the first lockstep
                # round; when Ray starts slower than that, 'stream' refuses the run: retry, and say so
                line = next(l for l in log_text.splitlines() if "runs 0 ClientApps at a time" in l)
                failures.append({"attempt": attempt + 1, "rc": rc, "error": line.strip()[:400]})
                print(f"  attempt {attempt + 1} refused: the actor pool was not found in time; retrying", flush=True)
            histories = sorted(out_dir.glob("*/history.json"))
            entry: dict = {"cmd": shown, "rc": rc, "flwr_run_seconds": seconds, "failed_attempts": failures}
            crashed = "An unhandled exception occurred" in log_text
            entry["crashed"] = crashed
            if rc != 0 or not histories or race or crashed:
                print(log_text[-5000:], file=sys.stderr)
                ok = False
            else:
                entry["rounds"] = rounds_of(json.loads(histories[-1].read_text()))
            entry["log_flsplit_lines"] = [l.strip()[:300] for l in log_text.splitlines()
                                          if "[flsplit]" in l and ("data plane" in l or "stream" in l)][:20]
            entry["log_problem_lines"] = [l.strip()[:300] for l in log_text.splitlines()
                                          if any(k in l for k in ("ERROR", "Traceback", "WARNING", "refused"))][:20]
            results["sim"][plane] = entry
    finally:
        results["stop_notes"] = watch.stop()
        left = superlink_pids(flwr_home)
        if left:
            results["stop_notes"].append(f"SuperLink PIDs still alive: {left}")
        sl_log = flwr_home / "local-superlink" / "superlink.log"
        if sl_log.exists():
            results["superlink_log_problems"] = [l.strip()[:300] for l in sl_log.read_text(errors="replace").splitlines()
                                                 if any(k in l for k in ("ERROR", "Traceback", "refused"))][:20]

    if not args.skip_inprocess:
        print("in-process references ...", flush=True)
        logging.getLogger("flwr").setLevel(logging.WARNING)
        import torch

        if args.omp_threads:
            torch.set_num_threads(args.omp_threads)
        results["inprocess_torch_threads"] = torch.get_num_threads()
        # each run also with 3 local epochs (3x the steps): the difference quotient of round 2 is
        # the per-step cost without the round's fixed work (configure, aggregation, evaluation);
        # repeated, interleaved, medians reported (the round-2 numbers move a lot on a busy machine)
        epochs = int(extra_cfg.get("local-epochs", 1))
        results["inprocess"], results["inprocess_marginal"] = {}, {}
        samples: dict = {}
        for rep in range(args.inprocess_repeats):
            for name, plane, threaded in (("message_serial", "message", False), ("stream_threaded", "stream", True)):
                short = inprocess(plane, threaded, extra_cfg, tmp / f"r{rep}")
                longer = inprocess(plane, threaded, {**extra_cfg, "local-epochs": 3 * epochs}, tmp / f"r{rep}x3")
                samples.setdefault(name, []).append((short, longer))
        for name, reps in samples.items():
            results["inprocess"][name] = reps[0][0]  # the rows of the first repeat, for the table
            per_step = [short[1]["seconds_per_step"] for short, _ in reps]
            marginal = [(longer[1]["wall_seconds"] - short[1]["wall_seconds"])
                        / max(longer[1]["server_steps"] - short[1]["server_steps"], 1) for short, longer in reps]
            results["inprocess_marginal"][name] = {
                "steps": [reps[0][0][1]["server_steps"], reps[0][1][1]["server_steps"]],
                "round2_seconds_per_step_all": per_step, "round2_seconds_per_step": statistics.median(per_step),
                "marginal_all": marginal, "seconds_per_step": statistics.median(marginal)}
        results["compute_only"] = [compute_only(1), compute_only(2)]
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["code_after"] = code_version()
    if args.keep or not ok:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ report
    omp = f", OMP_NUM_THREADS={args.omp_threads}" if args.omp_threads else ", OMP_NUM_THREADS unset"
    lines = [f"### Flower simulation, `{FEDERATION}`, PSL, 2 rounds, 4 nodes{omp}", "",
             "| run | round | server_steps | wall s | ms/step (wall/steps) | ms/exchange (wall/(steps+1)) | data_plane |",
             "|---|---:|---:|---:|---:|---:|---|"]

    def row(name: str, r: dict) -> str:
        planes = sorted(set(r["data_plane"].values()))
        errors = f", {r['errors']} errors" if r["errors"] else ""
        return (f"| {name} | {r['round']} | {r['server_steps']} | {r['wall_seconds']:.3f} | "
                f"{r['seconds_per_step'] * 1e3:.2f} | {r['seconds_per_exchange'] * 1e3:.2f} | "
                f"{len(r['data_plane'])} x {'/'.join(planes) or '-'}{errors} |")

    for plane, e in results["sim"].items():
        for r in e.get("rounds", []):
            lines.append(row(f"simulation, {plane}", r))
    for name, rounds in (results.get("inprocess") or {}).items():
        for r in rounds:
            lines.append(row(f"in-process, {name.replace('_', ', ')}", r))
    lines.append("")
    for name, m in (results.get("inprocess_marginal") or {}).items():
        lines.append(f"in-process, {name.replace('_', ', ')}, {len(m['marginal_all'])} repeats: round 2 "
                     f"{m['round2_seconds_per_step'] * 1e3:.2f} ms/step median "
                     f"({', '.join(f'{v * 1e3:.1f}' for v in m['round2_seconds_per_step_all'])}); marginal "
                     f"{m['seconds_per_step'] * 1e3:.2f} ms per step median "
                     f"({', '.join(f'{v * 1e3:.1f}' for v in m['marginal_all'])}; round 2 with {m['steps'][0]} vs "
                     f"{m['steps'][1]} steps, the round's fixed work cancels out)")
    if "inprocess_torch_threads" in results:
        lines.append(f"in-process runs: torch threads {results['inprocess_torch_threads']}")
    for c in results.get("compute_only", []):
        lines.append(f"compute only (model alone), torch threads {c['threads']}: {c['step_s'] * 1e3:.2f} ms per step "
                     f"(server part {c['server_s'] * 1e3:.2f} ms, 4 clients {c['clients_s'] * 1e3:.2f} ms)")
    sim_stream = results["sim"].get("stream", {}).get("rounds")
    verdict = {}
    if sim_stream and len(sim_stream) >= 2:
        s2 = sim_stream[1]
        nodes_ok = len(s2["data_plane"]) == 4 and set(s2["data_plane"].values()) == {"stream"}
        lines += ["", f"simulation, stream, round 2: data_plane stream for all 4 nodes: {'yes' if nodes_ok else 'NO'} "
                  f"({s2['data_plane']})"]
        refs = {}
        if results.get("inprocess"):
            marg = results["inprocess_marginal"]
            refs["in-process stream (threaded grid), round 2, median"] = marg["stream_threaded"]["round2_seconds_per_step"]
            refs["in-process message (serial grid), round 2, median"] = marg["message_serial"]["round2_seconds_per_step"]
        for name, m in (results.get("inprocess_marginal") or {}).items():
            refs[f"in-process {name.replace('_', ', ')}, marginal per step"] = m["seconds_per_step"]
        for c in results.get("compute_only", []):
            refs[f"compute only, torch threads {c['threads']}"] = c["step_s"]
        for name, ref in refs.items():
            met = s2["seconds_per_step"] <= ref + 0.002
            verdict[name] = {"reference_s": ref, "sim_s": s2["seconds_per_step"], "met": met,
                             "excess_ms": (s2["seconds_per_step"] - ref - 0.002) * 1e3}
            lines.append(f"goal: sim stream {s2['seconds_per_step'] * 1e3:.2f} ms/step <= {name} "
                         f"{ref * 1e3:.2f} + 2 ms? {'MET' if met else 'NOT MET'} "
                         f"({s2['seconds_per_step'] * 1e3 - ref * 1e3 - 2:+.2f} ms)")
        msg = results["sim"].get("message", {}).get("rounds")
        if msg and len(msg) >= 2:
            lines.append(f"simulation message / stream, round 2: {msg[1]['seconds_per_step'] / s2['seconds_per_step']:.1f}x")
    results["verdict"] = verdict
    lb, la = results["load_average"]["before"], results["load_average"]["after"]
    lines += ["", f"load average before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; "
              f"{results['machine']}", f"code {results['code_before']['head']} (dirty: {results['code_before']['dirty'] or 'no'})"
              f" -> {results['code_after']['head']} (dirty: {results['code_after']['dirty'] or 'no'})",
              "", "process stop: " + ("; ".join(results["stop_notes"]) or "nothing to stop")]
    for plane, e in results["sim"].items():
        for f in e.get("failed_attempts", []):
            lines.append(f"simulation, {plane}: attempt {f['attempt']} failed (exit {f['rc']}): {f['error']}")
        if e.get("log_flsplit_lines"):
            lines += [f"flwr run log ({plane}), [flsplit] data-plane lines:"] + [f"    {l}" for l in e["log_flsplit_lines"]]
        if e.get("log_problem_lines"):
            lines += [f"flwr run log ({plane}), ERROR/WARNING lines:"] + [f"    {l}" for l in e["log_problem_lines"]]
    if results.get("superlink_log_problems"):
        lines += ["managed SuperLink log, ERROR/Traceback lines:"] + [f"    {l}" for l in results["superlink_log_problems"]]
    report = "\n".join(lines)
    print("\n" + report)
    results["report_markdown"] = report
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
