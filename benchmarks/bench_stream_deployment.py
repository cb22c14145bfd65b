"""Stream data plane vs Flower messages in a real deployment: SuperLink + 2 SuperNodes on loopback.

What it does
    1. Starts ``flower-superlink --insecure`` and two ``flower-supernode --insecure`` (node
       configs ``partition-id=i num-partitions=2``) as separate processes on free loopback
       ports, with a private ``FLWR_HOME`` whose ``config.toml`` names the SuperLink
       (connection ``deploy``) and Flower's offline settings in the environment.
    2. (a) ``flwr run benchmarks/stream_bench_app deploy --stream --run-config
       'output="<tmp>/bench.json" stream-rounds=5 stream-steps=1000 message-steps=5
       array-elements=65536 small-steps=200 small-elements=16'``: the bench app
       (``benchmarks/stream_bench_app``) times lockstep steps with both nodes, 256 KiB each
       way per node (one float32 array of 65536 elements, echoed), over
       ``StreamDataPlane(grid, timeout, mode="stream")`` (TLS, ephemeral pinned certificate)
       and over ``MessageDataPlane`` in the same deployment; and, per stream round, the time
       to open the round's sessions (carriers pushed -> both first replies) and to close them
       (last reply -> END -> carriers answered). In each stream round, after its 200 timed
       steps, 40 more with 64 bytes each way on the same sessions (the plane's floor without
       the payload). Also: the ServerApp process's Flower-serde cost of one 256 KiB request,
       the clients' build+encode+send time per reply (each reports it in its next reply), and
       the plane's grid polls (``pull_messages`` for the carriers) that fall inside a step.
       The bench ClientApp imports flsplit (and so torch) only for a session: a message-plane
       step costs what Flower's per-message ClientApp process costs, without a torch import.
    3. (b) The project's real app, once per plane: ``flwr run <repo> deploy --stream
       --run-config 'strategy="psl" num-server-rounds=1 max-steps=20 data-plane="stream"
       output-dir="<tmp>/runs-stream"'`` and the same with ``data-plane="message"`` and
       ``max-steps=2`` (``--max-steps-message``: there every exchange starts a ClientApp
       process per node, which imports torch and loads the data: tens of seconds here);
       seconds per split step = ``wall_seconds / server_steps`` of history.json's round 1
       (``wall_seconds`` also holds the round's configure, aggregation and central
       evaluation and, on the stream plane, opening the sessions: starting the ClientApp
       processes, which load torch and the data; the plane logs that time, which is also
       reported, with the seconds per step without it; a PSL round of S server steps is S + 1
       exchanges).
    4. Stops exactly the processes it started (and their leftover children) by PID,
       reports any survivors, greps the logs for errors/warnings, prints a markdown table.

Run:  .venv/bin/python benchmarks/bench_stream_deployment.py [--json out.json]
      (about 3-5 minutes on 2 cores; most of it is the message plane, seconds per step)
Goal it reports against: stream median step <= 2 ms and > 1000x under the message plane.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_APP = REPO / "benchmarks" / "stream_bench_app"
BINDIR = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import alive, cmdline, code_version, descendants, free_ports, kill_pid, machine, wait_listening  # noqa: E402


# ---------------------------------------------------------------------------- processes


class Deployment:
    """SuperLink + SuperNodes started here, stopped by PID (with their leftover children)."""

    def __init__(self, tmp: Path, nodes: int = 2) -> None:
        self.tmp, self.nodes = tmp, nodes
        self.flwr_home = tmp / "flwr-home"
        self.flwr_home.mkdir(parents=True)
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _start(self, name: str, *args: str) -> None:
        out = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([str(BINDIR / args[0]), *args[1:]], cwd=self.tmp, env=self.env,
                                           stdout=out, stderr=subprocess.STDOUT))

    def start(self) -> None:
        link, *node_ports = free_ports(1 + self.nodes)  # the SuperLink serves all its APIs on one port
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
        )
        self._start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                    "--database", str(self.tmp / "state.db"))
        wait_listening(link)
        for i, port in enumerate(node_ports):
            self._start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                        "--port", str(port), "--node-config", f"partition-id={i} num-partitions={self.nodes}")

    def flwr_run(self, app: Path, run_config: str, log_name: str, timeout: float) -> tuple[int, float, str]:
        cmd = [str(BINDIR / "flwr"), "run", str(app), "deploy", "--stream", "--run-config", run_config]
        print("$ " + " ".join(repr(c) if " " in c or '"' in c else c for c in cmd), flush=True)
        t = time.perf_counter()
        with open(self.logs / log_name, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = -1
        return rc, time.perf_counter() - t, " ".join(cmd)

    def stop(self) -> list[str]:
        notes = []
        kids = {p.pid: descendants(p.pid) for p in self.procs}
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                notes.append(f"PID {p.pid} ({p.args[0]}) ignored SIGTERM for 20 s: killed")
        time.sleep(1.0)
        for parent, pids in kids.items():
            for pid in pids:
                if alive(pid):
                    notes.append(f"leftover child PID {pid} of {parent} killed: {cmdline(pid)[:120]}")
                    kill_pid(pid, grace=5.0)
        return notes


def log_findings(logs: Path, limit: int = 12) -> dict[str, list[str]]:
    """Error/warning/traceback lines per log (the first ``limit`` distinct ones)."""
    pattern = re.compile(r"ERROR|Traceback|Exception|WARNING|refused|did not|broke|timed out", re.I)
    found = {}
    for path in sorted(logs.glob("*.log")):
        lines, seen = [], set()
        for line in path.read_text(errors="replace").splitlines():
            key = re.sub(r"\d+", "#", line.strip())[:160]
            if pattern.search(line) and key not in seen:
                seen.add(key)
                lines.append(line.strip()[:300])
        if lines:
            found[path.name] = lines[:limit] + ([f"... {len(lines) - limit} more distinct"] if len(lines) > limit else [])
    return found


# ---------------------------------------------------------------------------- statistics
def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "p10": pct(values, 10), "p90": pct(values, 90),
            "p99": pct(values, 99), "max": max(values), "min": min(values), "mean": statistics.fmean(values)}


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream-steps", type=int, default=1000)
    ap.add_argument("--stream-rounds", type=int, default=5)
    ap.add_argument("--message-steps", type=int, default=5)
    ap.add_argument("--array-elements", type=int, default=65536, help="float32 elements each way (65536: 256 KiB)")
    ap.add_argument("--small-steps", type=int, default=200, help="stream steps with a small payload (0: none)")
    ap.add_argument("--small-elements", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=20, help="real app, stream plane: PSL server steps of its one round")
    ap.add_argument("--max-steps-message", type=int, default=2, help="real app, message plane: PSL server steps")
    ap.add_argument("--skip-real-app", action="store_true")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per flwr run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, histories)")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="flsplit-bench-stream-dep-"))
    dep = Deployment(tmp)
    load_before = os.getloadavg()
    results: dict = {"machine": machine(), "args": vars(args), "tmp": str(tmp), "code_before": code_version()}
    ok = True
    try:
        dep.start()
        # (a) the bench app
        out = tmp / "bench.json"
        config = (f'output="{out}" stream-rounds={args.stream_rounds} stream-steps={args.stream_steps} '
                  f'message-steps={args.message_steps} array-elements={args.array_elements} '
                  f'small-steps={args.small_steps} small-elements={args.small_elements}')
        rc, seconds, cmd = dep.flwr_run(BENCH_APP, config, "flwr-run-bench.log", args.timeout)
        print(f"bench app: exit {rc}, {seconds:.1f} s", flush=True)
        results["bench_cmd"] = cmd
        if rc != 0 or not out.exists():
            print((dep.logs / "flwr-run-bench.log").read_text()[-5000:], file=sys.stderr)
            ok = False
        else:
            results["bench"] = json.loads(out.read_text())
            results["bench"]["flwr_run_seconds"] = seconds
        # (b) the project's real app, once per plane
        results["real_app"] = {}
        for plane in ([] if args.skip_real_app else ["stream", "message"]):
            runs = tmp / f"runs-{plane}"
            steps = args.max_steps if plane == "stream" else args.max_steps_message
            config = f'strategy="psl" num-server-rounds=1 max-steps={steps} data-plane="{plane}" output-dir="{runs}"'
            rc, seconds, cmd = dep.flwr_run(REPO, config, f"flwr-run-app-{plane}.log", args.timeout)
            print(f"real app, data-plane={plane}: exit {rc}, {seconds:.1f} s", flush=True)
            histories = sorted(runs.glob("*/history.json"))
            entry: dict = {"cmd": cmd, "rc": rc, "flwr_run_seconds": seconds}
            if rc != 0 or not histories:
                print((dep.logs / f"flwr-run-app-{plane}.log").read_text()[-5000:], file=sys.stderr)
                ok = False
            else:
                (r,) = json.loads(histories[-1].read_text())["rounds"]
                entry.update({k: r.get(k) for k in ("server_steps", "wall_seconds", "messages", "errors",
                                                    "data_plane", "num_examples", "test_accuracy")})
                entry["seconds_per_step"] = r["wall_seconds"] / max(r["server_steps"], 1)
                opened = re.findall(r"sessions open and first replies in ([0-9.]+) s",
                                    (dep.logs / f"flwr-run-app-{plane}.log").read_text(errors="replace"))
                if opened:  # the stream plane logs it (offer -> first reply of the slowest node)
                    entry["open_s"] = float(opened[0])
                    entry["seconds_per_step_after_open"] = (r["wall_seconds"] - entry["open_s"]) / max(r["server_steps"], 1)
                entry["seconds_per_exchange"] = r["wall_seconds"] / (r["server_steps"] + 1)
            results["real_app"][plane] = entry
    finally:
        results["stop_notes"] = dep.stop()
        results["log_findings"] = log_findings(dep.logs)
        if args.keep or not ok:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    results["code_after"] = code_version()

    # ------------------------------------------------------------------ report
    lines = [f"### Deployment (SuperLink + 2 SuperNodes, loopback), {results['machine']['cpu']}, "
             f"{results['machine']['cores']} cores", ""]
    bench = results.get("bench")
    if bench:
        s = bench["stream"]
        st = summary(s["steps"])
        mt = summary(bench["message"]["steps"])
        big = s["rounds"]
        opens = [r["open_s"] for r in big]
        closes = [r["close_s"] for r in big]
        ends = [r["end_round_s"] for r in big]
        ratio = mt["median"] / st["median"]
        results["summary"] = {"stream_step": st, "message_step": mt, "open": summary(opens), "close": summary(closes),
                              "end_round": summary(ends), "ratio_message_over_stream": ratio}
        kb = bench["request_bytes"] / 1024
        lines += [f"(a) bench app: lockstep step with both nodes, {kb:.1f} KiB each way per node (echo)", "",
                  "| plane | steps | median ms | p10 ms | p90 ms | p99 ms | max ms |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| stream (TLS session) | {st['n']} | {st['median'] * 1e3:.3f} | {st['p10'] * 1e3:.3f} | "
                  f"{st['p90'] * 1e3:.3f} | {st['p99'] * 1e3:.3f} | {st['max'] * 1e3:.3f} |",
                  f"| message (Flower) | {mt['n']} | {mt['median'] * 1e3:.1f} | {mt['p10'] * 1e3:.1f} | "
                  f"{mt['p90'] * 1e3:.1f} | {mt['p99'] * 1e3:.1f} | {mt['max'] * 1e3:.1f} |"]
        if s["small"]["steps"]:
            sm = summary(s["small"]["steps"])
            results["summary"]["stream_small_step"] = sm
            small_bytes = 4 * args.small_elements
            lines.append(f"| stream, {small_bytes} B array each way | {sm['n']} | {sm['median'] * 1e3:.3f} | "
                         f"{sm['p10'] * 1e3:.3f} | {sm['p90'] * 1e3:.3f} | {sm['p99'] * 1e3:.3f} | {sm['max'] * 1e3:.3f} |")
        serde = bench["serde"]
        cr = summary(s["client_reply_s"])
        results["summary"]["client_reply"] = cr
        def client_cpu(part: dict) -> list[float]:
            """Per step, the two clients' process CPU between consecutive replies, summed."""
            out = []
            for series in part.get("client_cpu_s", {}).values():
                out += [sum(b) - sum(a) for a, b in zip(series, series[1:])]
            return out

        cpu_rows = []
        for label, part in (("256 KiB", s), (f"{4 * args.small_elements} B", s["small"])):
            if part.get("server_cpu_s"):
                sc, cc = statistics.median(part["server_cpu_s"]), client_cpu(part)
                cc = statistics.median(cc) if cc else float("nan")
                cpu_rows.append({"payload": label, "server_cpu_ms": sc * 1e3, "clients_cpu_ms": cc * 1e3,
                                 "total_cpu_ms": (sc + cc) * 1e3})
        results["summary"]["cpu_per_step"] = cpu_rows
        lines += ["", "CPU time per step (median; ServerApp process incl. its session threads, and the two "
                  "ClientApp processes together) - on 2 cores a step cannot take less than total/2:", "",
                  "| payload | ServerApp CPU ms | 2 ClientApps CPU ms | total CPU ms | total/2 ms |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['payload']} | {r['server_cpu_ms']:.2f} | {r['clients_cpu_ms']:.2f} | {r['total_cpu_ms']:.2f} | "
                  f"{r['total_cpu_ms'] / 2:.2f} |" for r in cpu_rows]
        lines += ["", f"inside a stream step (256 KiB): ServerApp encodes a request in {serde['encode_s'] * 1e3:.3f} ms "
                  f"and decodes one in {serde['decode_s'] * 1e3:.3f} ms (Flower serde; x2 nodes each way per step, "
                  f"on one thread); building one takes {serde['build_s'] * 1e3:.3f} ms (outside the timed step); "
                  f"a client builds+encodes+sends its reply in {cr['median'] * 1e3:.3f} ms median "
                  f"(p90 {cr['p90'] * 1e3:.3f})", "",
                  f"message / stream median: {ratio:,.0f}x", "",
                  "| per stream round (both nodes) | " + " | ".join(f"r{r['round']}" for r in big) + " | median |",
                  "|---|" + "---:|" * (len(big) + 1),
                  "| open: carriers pushed -> both first replies, s | " + " | ".join(f"{v:.3f}" for v in opens)
                  + f" | {statistics.median(opens):.3f} |",
                  "| close: last step + END + carriers answered, s | " + " | ".join(f"{v:.3f}" for v in closes)
                  + f" | {statistics.median(closes):.3f} |",
                  "| end_round() after that, ms | " + " | ".join(f"{v * 1e3:.2f}" for v in ends)
                  + f" | {statistics.median(ends) * 1e3:.2f} |", "",
                  f"per-round cost of the stream plane (open + close - 2 steps, median): "
                  f"{statistics.median(o + c for o, c in zip(opens, closes)) - 2 * st['median']:.3f} s "
                  f"= {(statistics.median(o + c for o, c in zip(opens, closes)) - 2 * st['median']) / mt['median']:.2f} "
                  f"message-plane steps", "",
                  f"planes per round: {[r['planes'] for r in s['rounds']]}; listener refusals: {len(s['refusals'])}; "
                  f"threads left after plane.close(): {s['threads_after_close'] or 'none'}", ""]
        pulls = s.get("grid_pulls", [])
        polled = [any(ps < t + d and ps + pd > t for ps, pd in pulls) for t, d in zip(s["steps_start"], s["steps"])]
        with_poll = [d for d, hit in zip(s["steps"], polled) if hit]
        without = [d for d, hit in zip(s["steps"], polled) if not hit]
        if pulls:
            results["summary"]["grid_poll"] = {"pull_messages": summary([pd for _, pd in pulls]),
                                               "steps_with_poll": summary(with_poll) if with_poll else None,
                                               "steps_without_poll": summary(without) if without else None}
            lines += [f"grid polls by the stream plane (carriers' answers, ~1/s while sessions are open): "
                      f"{len(pulls)} pull_messages calls, median {statistics.median(pd for _, pd in pulls) * 1e3:.2f} ms, "
                      f"max {max(pd for _, pd in pulls) * 1e3:.2f} ms; {len(with_poll)} of {len(s['steps'])} timed steps "
                      f"contain one: median {statistics.median(with_poll) * 1e3 if with_poll else float('nan'):.3f} ms "
                      f"vs {statistics.median(without) * 1e3 if without else float('nan'):.3f} ms without", ""]
        slow = [(i, r, v) for i, (r, v) in enumerate(zip(s["steps_round"], s["steps"])) if v > 10 * st["median"]]
        results["summary"]["spikes_over_10x_median"] = slow
        lines += [f"stream steps > 10x median: {len(slow)}"
                  + (": " + ", ".join(f"#{i} (round {r}) {v * 1e3:.1f} ms" for i, r, v in slow[:10]) if slow else ""), ""]
        goal = st["median"] <= 0.002 and ratio > 1000
        lines += [f"goal (stream median <= 2 ms and > 1000x under messages): {'MET' if goal else 'NOT MET'}", ""]
    ra = results.get("real_app") or {}
    if ra:
        lines += [f"(b) project app: PSL, 1 round, max-steps={args.max_steps} (stream) / {args.max_steps_message} "
                  f"(message), 2 nodes", "",
                  "| data-plane | server_steps | wall s | s/step (wall/steps) | s/exchange (wall/(steps+1)) | "
                  "sessions open s (log) | s/step after open | data_plane per node | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for plane, e in ra.items():
            if "seconds_per_step" in e:
                after = (f"{e['open_s']:.2f} | {e['seconds_per_step_after_open']:.4f}" if "open_s" in e else "- | -")
                lines.append(f"| {plane} | {e['server_steps']} | {e['wall_seconds']:.2f} | {e['seconds_per_step']:.4f} "
                             f"| {e['seconds_per_exchange']:.4f} | {after} | {e['data_plane']} | {len(e['errors'])} |")
            else:
                lines.append(f"| {plane} | failed (exit {e['rc']}) | | | | | | | |")
        if all("seconds_per_step" in e for e in ra.values()) and len(ra) == 2:
            r = ra["message"]["seconds_per_step"] / ra["stream"]["seconds_per_step"]
            results["real_app_ratio"] = r
            lines += ["", f"message / stream seconds per step: {r:.1f}x"]
            if "seconds_per_step_after_open" in ra["stream"]:
                r2 = ra["message"]["seconds_per_step"] / ra["stream"]["seconds_per_step_after_open"]
                results["real_app_ratio_after_open"] = r2
                lines += [f"message / stream seconds per step, the stream's session opening left out: {r2:.0f}x"]
        lines.append("")
    lb, la = results["load_average"]["before"], results["load_average"]["after"]
    lines += [f"load average before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; "
              f"python {results['machine']['python']}, torch {results['machine']['torch']}, "
              f"flwr {results['machine']['flwr']}; code {results['code_before']['head']} "
              f"(dirty: {results['code_before']['dirty'] or 'no'}) -> {results['code_after']['head']} "
              f"(dirty: {results['code_after']['dirty'] or 'no'})", ""]
    lines.append("process stop: " + ("; ".join(results["stop_notes"]) or "all started processes ended on SIGTERM, "
                                     "no leftover children"))
    if results["log_findings"]:
        lines += ["", "log lines matching ERROR/WARNING/Traceback/refused/...:"]
        for name, found in results["log_findings"].items():
            lines += [f"  {name}:"] + [f"    {l}" for l in found]
    report = "\n".join(lines)
    print("\n" + report)
    results["report_markdown"] = report
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
