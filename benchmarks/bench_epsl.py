"""PSL versus EPSL at several phi, and SFL versus SFL-GA downlink bytes, in one run.

Every configuration runs the project's real ServerApp and ClientApps on an in-process grid
(8 clients, scikit-learn digits, the heterogeneous wireless scenario, same seed and
schedule) and reads its history: simulated round latency and energy, wall seconds per
round, final test accuracy, and bytes down per round (unicast split bytes + broadcast).

Run: ``python benchmarks/bench_epsl.py [--rounds 5] [--clients 8]``; ``--mechanism`` (repeatable)
and ``--scaling`` pick EPSL's aggregation mechanisms (``epsl-mechanism``, ``epsl-scaling``),
``--phi`` the ratios, and ``--only-epsl`` leaves out SFL-V2 and SFL-GA.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER

from apps.client_app import app as client_app
from apps.server_app import app as server_app
from flsplit.planes.inprocess import InProcessGrid


def run(tmp: Path, clients: int, node_configs: list[dict] | None = None, **run_config) -> dict:
    """One run of the app (``node_configs``: each node's ``data-path`` on real MNIST); its history."""
    out = tmp / "-".join(f"{k}={v}" for k, v in run_config.items() if k != "test-data-path")
    config = {"output-dir": str(out), "cost-scenario": "heterogeneous", **run_config}
    grid = InProcessGrid(client_app, clients, run_config=config, node_configs=node_configs)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (history,) = out.glob("*/history.json")
    return json.loads(history.read_text())


def summary(history: dict) -> dict:
    rounds = history["rounds"]
    return {
        "sim_latency_s": statistics.mean(r["sim"]["round_latency_s"] for r in rounds),
        "sim_energy_j": statistics.mean(r["sim"]["energy_j"] for r in rounds),
        "wall_s": statistics.median(r["wall_seconds"] for r in rounds[1:] or rounds),
        "accuracy": rounds[-1]["test_accuracy"],
        "down_split_mb": statistics.mean(r["split_bytes_down"] for r in rounds) / 1e6,
        "down_broadcast_mb": statistics.mean(r["broadcast_bytes_down"] for r in rounds) / 1e6,
        "down_total_mb": statistics.mean(r["bytes_down"] for r in rounds) / 1e6,
        "accuracy_per_round": [r["test_accuracy"] for r in rounds],
        "server_backward_rows": sum(w["backward"] for r in rounds for w in r["server_rows"].values()),
        "sim_latency_per_round_s": [r["sim"]["round_latency_s"] for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits",
                        help="digits (embedded) or real MNIST from ../shared/data/mnist (benchmarks/mnist_data.py)")
    parser.add_argument("--model", help="zoo model (default digits-cnn on digits, lenet on mnist)")
    parser.add_argument("--cut", help="cut layer (default 2 on digits, 3 on mnist)")
    parser.add_argument("--train", type=int, default=8000, help="mnist: training images (the rest is held out)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (model, sampling; MNIST's split)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--mechanism", action="append", help="EPSL mechanism (repeatable; default mean-activation)")
    parser.add_argument("--scaling", default="sum", help="EPSL scaling: sum or mean")
    parser.add_argument("--positions", action="append",
                        help="EPSL aggregated-positions (repeatable: first, random, matched; default first)")
    parser.add_argument("--phi", type=float, action="append", help="phi (repeatable; default 0, 0.25, 0.5, 0.75, 1)")
    parser.add_argument("--only-epsl", action="store_true", help="PSL and EPSL only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    mnist = args.dataset == "mnist"
    model = args.model or ("lenet" if mnist else "digits-cnn")
    cut = args.cut or ("3" if mnist else "2")
    common = {"num-server-rounds": args.rounds, "cut-layer": cut, "batch-size": args.batch_size, "learning-rate": args.lr,
              "model": model, "seed": args.seed}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if mnist:
            from mnist_data import DATASET, mnist_partitions

            common["node_configs"], test_path = mnist_partitions(Path(tmp) / "mnist", args.clients, train=args.train,
                                                      seed=args.seed)
            common.update({"dataset": DATASET, "test-data-path": test_path})
        results["psl"] = summary(run(Path(tmp), args.clients, strategy="psl", **common))
        mechanisms = args.mechanism or ["mean-activation"]
        for positions in args.positions or ["first"]:
            for mechanism in mechanisms:
                for phi in args.phi or (0.0, 0.25, 0.5, 0.75, 1.0):
                    name = f"{mechanism} {phi}" if positions == "first" else f"{mechanism} {positions} {phi}"
                    if len(mechanisms) == 1 and mechanism == "mean-activation" and positions == "first":
                        name = f"epsl phi={phi}"
                    results[name] = summary(run(Path(tmp), args.clients, strategy="epsl", phi=phi, **common,
                                                **{"epsl-mechanism": mechanism, "epsl-scaling": args.scaling,
                                                   "aggregated-positions": positions}))
        if not args.only_epsl:
            results["sflv2"] = summary(run(Path(tmp), args.clients, strategy="sflv2", **common))
            results["sflga"] = summary(run(Path(tmp), args.clients, strategy="sflga", **common))

    data = f"real MNIST ({args.train} training images)" if mnist else "digits"
    print(f"{args.clients} clients, {data}, {model}, heterogeneous scenario, cut {cut}, batch {args.batch_size}, lr {args.lr}, momentum 0.9, "
          f"{args.rounds} rounds, EPSL scaling {args.scaling}, seed {args.seed}, 1 torch thread")
    print(f"{'scheme':24s} {'sim latency s/round':>20s} {'sim energy J/round':>19s} {'wall s/round':>13s} "
          f"{'final acc':>10s} {'down MB/round (unicast+bcast)':>30s}")
    for name, r in results.items():
        down = f"{r['down_split_mb']:.3f} + {r['down_broadcast_mb']:.3f}"
        print(f"{name:24s} {r['sim_latency_s']:20.3f} {r['sim_energy_j']:19.4f} {r['wall_s']:13.3f} {r['accuracy']:10.4f} {down:>30s}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
