"""Loss-triggered async SL with FP8 against synchronous SL (all A, fp32), in one run.

Every configuration runs the project's real ServerApp and ClientApps on an in-process grid
(scikit-learn digits with ``digits-cnn`` by default, or real MNIST with ``--dataset mnist``:
the t10k files split by ``mnist_data.mnist_partitions`` into ``--train`` training images in
iid per-node partitions and the rest held out for the server's test; same seed, cut and number
of windows). One window = one round (``state-window`` "epoch": one local epoch, or
``--max-steps`` batches). Reported per configuration, against the synchronous run with the
same number of clients:

- communication reduction: all bytes up and down (``bytes_up + bytes_down`` of the history);
- client-compute reduction: client FLOPs actually executed, from the measured per-cut profile
  of the model (state A: forward twice, since the stateless client recomputes it, plus
  backward; state B: forward once; state C: nothing) times the examples of each client's window
  (``examples_per_node`` of the history);
- accuracy difference of the final round, and of the mean of the last ``--last`` rounds, in
  percentage points;
- the number of A/B/C client-windows, and the bytes spent in each state.

``--plot`` draws each async run's per-client state timeline (A/B/C per window).
``--json`` is rewritten after every run, so a long sweep leaves its finished rows.

Run: ``python benchmarks/bench_async.py [--rounds 10] [--thresholds 0.02,0.05,0.1]``
or e.g. ``python benchmarks/bench_async.py --dataset mnist --model lenet --clients 5,10
--rounds 50 --thresholds 0.02,0.05 --json out.json --plot benchmarks/plots/async.png``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common.logger import FLOWER_LOGGER

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mnist_data, when run as a script

from apps.client_app import app as client_app
from apps.server_app import app as server_app
from flsplit.data.datasets import dataset_info
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.profile import profile_model
from flsplit.model.zoo import build_model

STATES = "ABC"


def run(out: Path, clients: int, node_configs: list[dict] | None = None, **run_config) -> dict:
    config = {"output-dir": str(out), "strategy": "async", "cut-layer": "2", "cost-scenario": "none", **run_config}
    grid = InProcessGrid(client_app, clients, run_config=config, node_configs=node_configs)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (history,) = out.glob("*/history.json")
    return json.loads(history.read_text())


def state_flops(model: str, dataset: str, cut: int) -> dict[str, float]:
    """Client FLOPs per sample in each state, from the measured profile of ``model`` cut at ``cut``."""
    info = dataset_info(dataset)
    net = build_model(model, info.num_classes, info.in_channels, info.image_size)
    profile = profile_model(net, (info.in_channels, info.image_size, info.image_size)).cut(cut)
    return {
        "A": 2 * profile.client_forward_flops + profile.client_backward_flops,
        "B": profile.client_forward_flops,
        "C": 0.0,
    }


def client_flops(history: dict, per_state: dict[str, float]) -> float:
    """Client FLOPs executed over the run, from each round's states and window sizes."""
    total = 0.0
    for entry in history["rounds"]:
        for node, info in entry["async"].items():
            if info["state"] != "C":  # a client in C sends no reply, so it has no examples_per_node entry
                total += entry["examples_per_node"][node] * per_state[info["state"]]
    return total


def summary(history: dict, last: int) -> dict:
    """Bytes, accuracy and state counts of a run's history."""
    rounds = history["rounds"]
    nodes = sorted(rounds[0]["async"], key=int)
    by_state = {s: {"windows": 0, "bytes": 0} for s in STATES}
    for entry in rounds:
        for node in nodes:
            state = entry["async"][node]["state"]
            per = entry["bytes_per_node"].get(node, {"up": 0, "down": 0})
            by_state[state]["windows"] += 1
            by_state[state]["bytes"] += per["up"] + per["down"]
    return {
        "bytes": sum(r["bytes_up"] + r["bytes_down"] for r in rounds),
        "split_bytes": sum(r["split_bytes_up"] + r["split_bytes_down"] for r in rounds),
        "broadcast_bytes": sum(r["broadcast_bytes_down"] for r in rounds),
        "by_state": by_state,
        "final_acc": rounds[-1]["test_accuracy"],
        "last_acc": sum(r["test_accuracy"] for r in rounds[-last:]) / len(rounds[-last:]),
        "accuracy": [r["test_accuracy"] for r in rounds],
        "timeline": ["".join(r["async"][n]["state"] for n in nodes) for r in rounds],
        "wall_s": sum(r["wall_seconds"] for r in rounds),
    }


def plot_timelines(rows: list[dict], path: Path, title: str) -> None:
    """One panel per async run: clients (rows) by windows (columns), coloured by state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    runs = [r for r in rows if r["threshold"] > 0]
    if not runs:
        return
    colours = ["#d62728", "#ff7f0e", "#2ca02c"]  # A red (full SL), B orange (upload only), C green (idle)
    heights = [max(r["clients"], 2) * 0.28 + 0.7 for r in runs]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, sum(heights) + 0.8), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, r in zip(axes[:, 0], runs):
        grid = [[STATES.index(s) for s in column] for column in r["timeline"]]  # windows x clients
        image = torch.tensor(grid).T.numpy()
        ax.imshow(image, aspect="auto", cmap=ListedColormap(colours), vmin=0, vmax=2, interpolation="nearest",
                  extent=(0.5, image.shape[1] + 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_yticks(range(r["clients"]))
        ax.set_yticklabels([f"client {i}" for i in range(r["clients"])], fontsize=7)
        c = r["by_state"]
        ax.set_title(f"{r['model']}, {r['clients']} clients, threshold {r['threshold']}: comm {r['comm_x']:.1f}x, "
                     f"client FLOPs {r['flops_x']:.1f}x, final acc {r['diff_pp']:+.2f} pp; "
                     f"A/B/C windows {c['A']['windows']}/{c['B']['windows']}/{c['C']['windows']}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("window (round)")
    fig.legend(handles=[Patch(color=colours[i], label=f"{s}: {d}") for i, (s, d) in enumerate(
        zip(STATES, ("split training (up + down)", "upload only", "idle (server uses cache)")))],
        loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--model", help="zoo model (default digits-cnn on digits, lenet on mnist)")
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="windows (one round each)")
    parser.add_argument("--clients", default="1,5")
    parser.add_argument("--thresholds", default="0.02,0.05,0.1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=0, help="batches per window (0: one epoch)")
    parser.add_argument("--train", type=int, default=8000, help="mnist: training images (the rest is held out)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (and, on mnist, the split/partition seed)")
    parser.add_argument("--last", type=int, default=5, help="rounds averaged for the mean-accuracy column")
    parser.add_argument("--no-sync", action="store_true", help="skip the sync baseline (its rows must be in --json)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs-dir", type=Path, help="keep each run's output (history.json) here instead of a temp dir")
    parser.add_argument("--plot", type=Path, help="PNG of the per-client state timelines")
    args = parser.parse_args()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    model = args.model or ("lenet" if args.dataset == "mnist" else "digits-cnn")
    dataset = "ylecun/mnist" if args.dataset == "mnist" else "digits"
    per_state = state_flops(model, dataset, args.cut)
    rows: list[dict] = json.loads(args.json.read_text()) if args.no_sync and args.json and args.json.exists() else []
    setting = (f"{args.dataset}, {model} cut {args.cut}, batch {args.batch_size}, lr {args.learning_rate} momentum 0.9, "
               f"seed {args.seed}, {args.rounds} windows of {f'{args.max_steps} steps' if args.max_steps else 'one epoch'}, 1 torch thread")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.runs_dir or tmp
        for clients in (int(c) for c in args.clients.split(",")):
            base = {"num-server-rounds": args.rounds, "min-available-nodes": 1, "model": model,
                    "cut-layer": str(args.cut), "batch-size": args.batch_size,
                    "learning-rate": args.learning_rate, "max-steps": args.max_steps, "seed": args.seed}
            node_configs = None
            if args.dataset == "mnist":
                from mnist_data import DATASET, mnist_partitions

                node_configs, test_path = mnist_partitions(Path(tmp) / f"mnist-{clients}", clients, train=args.train,
                                                         seed=args.seed)
                base.update({"dataset": DATASET, "test-data-path": test_path})
            configs = [] if args.no_sync else [(0.0, {"loss-threshold": 0.0, "codec-up": "fp32", "codec-down": "fp32"})]
            configs += [(float(t), {"loss-threshold": float(t)}) for t in args.thresholds.split(",")]
            for thr, extra in configs:
                t0 = time.perf_counter()
                h = run(Path(tmp) / f"{clients}-{thr}", clients, node_configs, **base, **extra)
                row = {"dataset": args.dataset, "model": model, "cut": args.cut, "clients": clients, "threshold": thr,
                       "rounds": args.rounds, "seed": args.seed, "batch_size": args.batch_size, "max_steps": args.max_steps,
                       "config": "sync fp32 (all A)" if thr == 0 else f"async fp8 thr={thr}",
                       "client_flops": client_flops(h, per_state), **summary(h, args.last),
                       "bench_seconds": time.perf_counter() - t0}
                sync = row if thr == 0 else next(r for r in rows if r["clients"] == clients and r["threshold"] == 0
                                                   and r["model"] == model and r["rounds"] == args.rounds
                                                   and r["cut"] == args.cut and r.get("seed", 0) == args.seed)
                row["comm_x"] = sync["bytes"] / row["bytes"]
                row["flops_x"] = sync["client_flops"] / row["client_flops"]
                row["diff_pp"] = 100 * (row["final_acc"] - sync["final_acc"])
                row["last_diff_pp"] = 100 * (row["last_acc"] - sync["last_acc"])
                rows.append(row)
                c = row["by_state"]
                print(f"[{time.strftime('%H:%M:%S')}] {clients} clients {row['config']}: comm {row['comm_x']:.2f}x "
                      f"FLOPs {row['flops_x']:.2f}x acc {row['final_acc']:.4f} ({row['diff_pp']:+.2f} pp) "
                      f"A/B/C {c['A']['windows']}/{c['B']['windows']}/{c['C']['windows']} "
                      f"{row['bench_seconds']:.0f} s", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
                if args.plot:
                    plot_timelines(rows, args.plot, setting)

    print(setting)
    print(f"{'clients':>7s} {'config':22s} {'comm x':>8s} {'client FLOPs x':>15s} {'final acc':>10s} {'diff pp':>8s} "
          f"{'last-' + str(args.last) + ' pp':>10s} {'A/B/C':>12s}  states per round")
    for r in rows:
        c = r["by_state"]
        abc = f"{c['A']['windows']}/{c['B']['windows']}/{c['C']['windows']}"
        print(f"{r['clients']:7d} {r['config']:22s} {r['comm_x']:8.2f} {r['flops_x']:15.2f} {r['final_acc']:10.4f} "
              f"{r['diff_pp']:+8.2f} {r['last_diff_pp']:+10.2f} {abc:>12s}  {' '.join(r['timeline'])}")


if __name__ == "__main__":
    main()
