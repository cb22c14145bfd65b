"""ServerApp: lockstep steps with every node over the stream plane, then over Flower messages.

Stream plane (``StreamDataPlane(grid, timeout, mode="stream")``), ``stream-rounds`` rounds:
    open    the round's first exchange: the two carriers (Flower messages with the session
            offer) pushed, each ClientApp started, TLS session opened, first echo received;
    steps   ``stream-steps / stream-rounds`` lockstep exchanges, each timed alone (only
            ``plane.exchange``; building the requests and checking the replies is outside);
    close   the round's last exchange: its replies say done, the plane sends END and hands
            the done replies over once each carrier's Flower answer has come;
    end     ``plane.end_round()`` (nothing left to wait for by then).
In each round, after those, ``small-steps / stream-rounds`` steps with ``small-elements`` float32
values each way on the same sessions: the plane's floor without the payload's serialization
and TLS costs.
Message plane (``MessageDataPlane``): ``message-steps`` lockstep exchanges, one Flower message
per node each (in a deployment every message starts a ClientApp process).
Also: the ServerApp process's own cost of encoding and decoding one request (Flower serde),
and each client's build+encode+send time of its replies (it reports the previous one's).

Every request carries ``array-elements`` float32 values (65536: 256 KiB + the .npy header) and
every reply the same array back; each reply's bytes are checked against the request's.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from flsplit.planes.dataplane import MessageDataPlane
from flsplit.planes.stream.frames import decode_content, encode_content
from flsplit.planes.stream.plane import StreamDataPlane

TRAIN_STEP = "train.split_step"
CLIENT_PART = "client.part"  # the plane offers a session only with a round's first request
DATA, CONTROL, STATUS, TIMING = "split.data", "bench.ctl", "split.status", "bench.client"

app = ServerApp()


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 180.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {n} nodes connected after {timeout} s")
        time.sleep(0.5)


class TimedGrid:
    """The grid, with the start and duration of every ``pull_messages`` call recorded (the
    stream plane polls the grid for its carriers' answers while sessions are open)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.pulls: list[tuple[float, float]] = []

    def pull_messages(self, message_ids):
        t = time.perf_counter()
        try:
            return self._grid.pull_messages(message_ids)
        finally:
            self.pulls.append((t, time.perf_counter() - t))

    def __getattr__(self, name):
        return getattr(self._grid, name)


class Requests:
    """Fresh request contents (a new Array per node and step, as a server's gradients are)."""

    def __init__(self, elements: int) -> None:
        self.base = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
        self.count = 0

    def make(self, nodes: list[int], last: bool = False, first: bool = False) -> dict[int, RecordDict]:
        out = {}
        for n in nodes:
            self.count += 1
            self.base[0] = float(self.count)  # every request differs
            content = RecordDict({DATA: ArrayRecord({"x": Array(self.base)}), CONTROL: ConfigRecord({"last": last})})
            if first:
                content[CLIENT_PART] = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
            out[n] = content
        return out


def _check(requests: dict[int, RecordDict], replies: dict, expect_done: bool, nodes: list[int]) -> None:
    """Every node answered, with its request's array, done exactly when it was the last."""
    if sorted(replies) != nodes:
        raise RuntimeError(f"replies from {sorted(replies)}, expected {nodes}")
    for n, reply in replies.items():
        if reply.error is not None:
            raise RuntimeError(f"node {n}: {reply.error}")
        sent = requests[n].array_records[DATA]["x"].data
        got = reply.content.array_records[DATA]["x"].data
        if got != sent:
            raise RuntimeError(f"node {n}: the echoed array differs from the request's")
        done = bool(reply.content.config_records[STATUS].get("done", False))
        if done != expect_done:
            raise RuntimeError(f"node {n}: done={done}, expected {expect_done}")


def _stream_phase(grid: Grid, nodes: list[int], cfg: dict, make: Requests, small: Requests) -> dict:
    """``stream-rounds`` rounds on one plane; each: open, its share of ``stream-steps`` with the
    full payload, its share of ``small-steps`` with the small one (same sessions), close."""
    timeout, rounds = float(cfg["timeout"]), int(cfg["stream-rounds"])
    per_round, small_per_round = max(1, int(cfg["stream-steps"]) // rounds), int(cfg["small-steps"]) // rounds
    threads_before = sorted(t.name for t in threading.enumerate())
    timed = TimedGrid(grid)
    plane = StreamDataPlane(timed, timeout, mode="stream")
    out: dict = {"rounds": [], "steps": [], "steps_round": [], "steps_start": [], "client_reply_s": [],
                 "small": {"steps": [], "steps_start": [], "client_reply_s": []}}

    def step(source: Requests, last: bool, into: Optional[dict], round_no: int) -> float:
        reqs = source.make(nodes, last=last)
        cpu = time.process_time()
        t = time.perf_counter()
        replies = plane.exchange(reqs, TRAIN_STEP, f"stream-{round_no}")
        dt = time.perf_counter() - t
        cpu = time.process_time() - cpu  # this process, all threads (the sessions' included)
        _check(reqs, replies, last, nodes)
        if into is not None:
            into["steps"].append(dt)
            into["steps_start"].append(t)
            into.setdefault("server_cpu_s", []).append(cpu)
            into["client_reply_s"] += [float(rep.content.config_records[TIMING]["prev_reply_s"]) for rep in replies.values()]
            into.setdefault("client_cpu_s", {}).setdefault(round_no, []).append(
                [float(replies[n].content.config_records[TIMING]["cpu_s"]) for n in nodes])
        return dt

    try:
        for r in range(1, rounds + 1):
            reqs = make.make(nodes, first=True)
            t = time.perf_counter()
            replies = plane.exchange(reqs, TRAIN_STEP, f"stream-{r}")
            open_s = time.perf_counter() - t
            _check(reqs, replies, False, nodes)
            for _ in range(per_round):
                step(make, False, out, r)
                out["steps_round"].append(r)
            for _ in range(small_per_round):
                step(small, False, out["small"], r)
            close_s = step(make, True, None, r)  # done: END, then the carriers' answers
            t = time.perf_counter()
            planes = plane.end_round()
            end_s = time.perf_counter() - t
            out["rounds"].append({"round": r, "open_s": open_s, "close_s": close_s, "end_round_s": end_s,
                                  "timed_steps": per_round, "small_steps": small_per_round,
                                  "planes": {str(n): k for n, k in planes.items()}})
        out["traffic"] = {"bytes_down": sum(plane.traffic.down.values()), "bytes_up": sum(plane.traffic.up.values()),
                          "frames_and_messages": plane.traffic.messages}
        out["refusals"] = list(plane.listener.refusals)
        out["grid_pulls"] = timed.pulls
    finally:
        plane.close()
    time.sleep(0.5)
    out["threads_after_close"] = sorted(t.name for t in threading.enumerate() if t.name not in threads_before
                                        or t.name.startswith("flsplit"))
    return out


def _message_phase(grid: Grid, nodes: list[int], cfg: dict, make: Requests) -> dict:
    plane = MessageDataPlane(grid, float(cfg["timeout"]))
    steps = []
    for i in range(int(cfg["message-steps"])):
        reqs = make.make(nodes)
        t = time.perf_counter()
        replies = plane.exchange(reqs, TRAIN_STEP, f"message-{i + 1}")
        steps.append(time.perf_counter() - t)
        _check(reqs, replies, False, nodes)
    plane.end_round()
    return {"steps": steps, "bytes_down": sum(plane.traffic.down.values()), "bytes_up": sum(plane.traffic.up.values())}


def _serde(make: Requests, nodes: list[int], repeats: int = 50) -> dict:
    """Seconds to encode and decode one request in this process (median)."""
    enc, dec, build = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        content = make.make(nodes[:1])[nodes[0]]
        build.append(time.perf_counter() - t)
        t = time.perf_counter()
        payload = encode_content(content)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        decode_content(payload)
        dec.append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {"build_s": med(build), "encode_s": med(enc), "decode_s": med(dec), "payload_bytes": len(payload)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    if not cfg.get("output"):
        raise ValueError("run-config 'output' (a JSON path) is required")
    nodes = _wait_for_nodes(grid, int(cfg["num-nodes"]))
    make = Requests(int(cfg["array-elements"]))
    result = {"config": cfg, "nodes": nodes,
              "request_bytes": len(make.make(nodes[:1])[nodes[0]].array_records[DATA]["x"].data)}
    result["serde"] = _serde(Requests(int(cfg["array-elements"])), nodes)
    t = time.perf_counter()
    result["stream"] = _stream_phase(grid, nodes, cfg, make, Requests(int(cfg["small-elements"])))
    result["stream"]["phase_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result["message"] = _message_phase(grid, nodes, cfg, make)
    result["message"]["phase_s"] = time.perf_counter() - t
    Path(str(cfg["output"])).write_text(json.dumps(result, indent=1))
