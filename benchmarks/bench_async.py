"""Loss-triggered async SL with FP8 against synchronous SL (all A, fp32), in one run.

Every configuration runs the project's real ServerApp and ClientApps on an in-process grid
(scikit-learn digits, ``digits-cnn`` cut 2, same seed and number of epochs). Reported per
configuration, against the synchronous run with the same number of clients:

- communication reduction: all bytes up and down (``bytes_up + bytes_down`` of the history);
- client-compute reduction: client FLOPs actually executed, from the measured per-cut profile
  (state A: forward twice, since the stateless client recomputes it, plus backward; state
  B: forward once; state C: nothing) times the samples of each client's window;
- accuracy difference of the final round, in percentage points.

Run: ``python benchmarks/bench_async.py [--rounds 10] [--thresholds 0.02,0.05,0.1]``
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER

from apps.client_app import app as client_app
from apps.server_app import app as server_app
from flsplit.data import load_partition
from flsplit.inprocess import InProcessGrid
from flsplit.profile import profile_model
from flsplit.zoo import build_model


def run(out: Path, clients: int, **run_config) -> dict:
    config = {"output-dir": str(out), "strategy": "async", "cut-layer": "2", "cost-scenario": "none", **run_config}
    grid = InProcessGrid(client_app, clients, run_config=config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (history,) = out.glob("*/history.json")
    return json.loads(history.read_text())


def client_flops(history: dict, clients: int, cut: int = 2) -> float:
    """Client FLOPs executed over the run, from each round's states and window sizes."""
    profile = profile_model(build_model("digits-cnn", 10, 1, 8), (1, 8, 8)).cut(cut)
    per_state = {
        "A": 2 * profile.client_forward_flops + profile.client_backward_flops,
        "B": profile.client_forward_flops,
        "C": 0.0,
    }
    sizes = [len(load_partition("digits", i, clients)) for i in range(clients)]
    nodes = sorted(int(n) for n in history["rounds"][0]["async"])  # node i has partition i
    total = 0.0
    for entry in history["rounds"]:
        for i, node in enumerate(nodes):
            total += sizes[i] * per_state[entry["async"][str(node)]["state"]]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", default="1,5")
    parser.add_argument("--thresholds", default="0.02,0.05,0.1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (int(c) for c in args.clients.split(",")):
            base = {"num-server-rounds": args.rounds, "min-available-nodes": 1}
            sync = run(Path(tmp) / f"sync-{clients}", clients, **base, **{"loss-threshold": 0.0, "codec-up": "fp32", "codec-down": "fp32"})
            sync_bytes = sum(r["bytes_up"] + r["bytes_down"] for r in sync["rounds"])
            sync_flops = client_flops(sync, clients)
            sync_acc = sync["rounds"][-1]["test_accuracy"]
            rows.append((clients, "sync fp32 (all A)", 1.0, 1.0, sync_acc, 0.0, ""))
            for thr in (float(t) for t in args.thresholds.split(",")):
                h = run(Path(tmp) / f"async-{clients}-{thr}", clients, **base, **{"loss-threshold": thr})
                b = sum(r["bytes_up"] + r["bytes_down"] for r in h["rounds"])
                acc = h["rounds"][-1]["test_accuracy"]
                states = " ".join("".join(v["state"] for _, v in sorted(r["async"].items())) for r in h["rounds"])
                rows.append((clients, f"async fp8 thr={thr}", sync_bytes / b, sync_flops / client_flops(h, clients), acc, 100 * (acc - sync_acc), states))

    print(f"digits, digits-cnn cut 2, batch 32, lr 0.1 momentum 0.9, {args.rounds} rounds of one epoch, 1 torch thread")
    print(f"{'clients':>7s} {'config':22s} {'comm x':>8s} {'client FLOPs x':>15s} {'final acc':>10s} {'diff pp':>8s}  states per round")
    for clients, name, comm, comp, acc, diff, states in rows:
        print(f"{clients:7d} {name:22s} {comm:8.2f} {comp:15.2f} {acc:10.4f} {diff:+8.2f}  {states}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
