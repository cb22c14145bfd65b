"""Wire codecs: bytes per step and accuracy, fp8 against fp32, measured side by side.

1. Bytes of smashed data per step for a VGG-style cut at batch 32: one real exchange through
   ``SplitClient.train_step`` per codec, counting the ``split.*`` arrays of the reply
   (payload + scale + labels, as serialized into the Flower message).
2. Accuracy with fp8-e4m3 up / fp8-e5m2 down against fp32 both ways, same seed and schedule:
   PSL with 4 in-process clients, on the MNIST test set split 8,000 train / 2,000 test
   (``--data mnist``, needs ``../shared/data/mnist``) or on scikit-learn's digits.

Run: ``python benchmarks/bench_codecs.py [--data mnist|digits] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import FLOWER_LOGGER
from flwr.supercore.task_identity import TaskIdentity

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.data.datasets import TensorData, load_centralized
from flsplit.planes.dataplane import payload_bytes
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.zoo import build_model
from flsplit.strategies import PSL

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def smashed_bytes_per_step(codec: str, cut: int = 3, batch: int = 32) -> int:
    """Bytes of the ``split.*`` records of one real reply of a VGG11 client at ``cut``."""
    torch.manual_seed(0)
    model_fn = lambda: build_model("vgg11", 10, 3, 32)  # noqa: E731
    data = TensorData(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,)))
    client = SplitClient(model_fn, data)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = p.SplitConfig(server_round=1, cut=cut, batch_size=batch, codec_up=codec).to_record()
    content = RecordDict({p.CONFIG: config, p.CLIENT_PART: ArrayRecord(model_fn().client_part(cut).state_dict())})
    message = Message(content, 1, p.TRAIN_STEP)
    message.metadata.__dict__["_message_id"] = "bench"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client.train_step(message, context)
    return payload_bytes(reply.content, "split.")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(name: str) -> tuple[TensorData, TensorData, str, tuple[int, int, int]]:
    """Train and test data, the model name and the input shape."""
    if name == "digits":
        return load_centralized("digits", "train"), load_centralized("digits", "test"), "digits-cnn", (1, 8, 8)
    x = torch.from_numpy(_idx(MNIST / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(_idx(MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:8000], order[8000:]
    return TensorData(x[train], y[train]), TensorData(x[test], y[test]), "lenet", (1, 28, 28)


def train_accuracy(data: str, codec_up: str, codec_down: str, rounds: int, clients: int, cut: int, seed: int = 0) -> dict:
    """PSL in-process; test accuracy of the composed model after each round."""
    train, test, model_name, shape = load(data)

    def model_fn():
        torch.manual_seed(seed)
        return build_model(model_name, 10, shape[0], shape[1])

    parts = [train.subset(slice(i, None, clients)) for i in range(clients)]
    split_clients = [SplitClient(model_fn, d, salt=i) for i, d in enumerate(parts)]
    app = ClientApp()

    @app.train("split_step")
    def _step(msg, ctx):
        return split_clients[int(ctx.node_config["partition-id"])].train_step(msg, ctx)

    model = model_fn()

    def evaluate(server_round, arrays):
        model.blocks.load_state_dict(arrays.to_torch_state_dict())
        model.blocks.eval()
        with torch.no_grad():
            correct = sum(int((model.blocks(test.x[i : i + 1000]).argmax(1) == test.y[i : i + 1000]).sum()) for i in range(0, len(test), 1000))
        from flwr.app import MetricRecord

        return MetricRecord({"accuracy": correct / len(test)})

    strategy = PSL(
        model_fn=model_fn, input_shape=shape, num_classes=10, cut_layer=cut, batch_size=32,
        learning_rate=0.05, momentum=0.9, seed=seed, codec_up=codec_up, codec_down=codec_down,
    )
    t0 = time.perf_counter()
    result = strategy.start(
        grid=InProcessGrid(app, clients), initial_arrays=ArrayRecord(model_fn().blocks.state_dict()),
        num_rounds=rounds, evaluate_fn=evaluate,
    )
    rounds_acc = [float(result.evaluate_metrics_serverapp[r]["accuracy"]) for r in range(1, rounds + 1)]
    split_up = sum(r["split_bytes_up"] for r in strategy.history.rounds)
    split_down = sum(r["split_bytes_down"] for r in strategy.history.rounds)
    return {"accuracy": rounds_acc, "split_bytes_up": split_up, "split_bytes_down": split_down, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["mnist", "digits"], default="mnist" if MNIST.exists() else "digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--cut", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="repeat both runs with seeds 0..N-1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    torch.set_num_threads(2)

    sizes = {c: smashed_bytes_per_step(c) for c in ("fp32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "int8")}
    print("bytes of smashed data per step, VGG11 cut 3 (64x32x32 per sample), batch 32:")
    for codec, n in sizes.items():
        print(f"  {codec:9s} {n:>9d} B   ratio to fp32 {n / sizes['fp32']:.4f}")

    print(f"\naccuracy, PSL {args.clients} clients, {args.data}, {args.rounds} rounds, seeds {args.seeds}:")
    runs: dict[str, list[dict]] = {"fp32/fp32": [], "fp8-e4m3/fp8-e5m2": []}
    for seed in range(args.seeds):
        for name, (up, down) in (("fp32/fp32", ("fp32", "fp32")), ("fp8-e4m3/fp8-e5m2", ("fp8-e4m3", "fp8-e5m2"))):
            run = train_accuracy(args.data, up, down, args.rounds, args.clients, args.cut, seed)
            runs[name].append(run)
            accs = " ".join(f"{a:.4f}" for a in run["accuracy"])
            print(f"  seed {seed} {name:18s} acc per round {accs} | split MB up {run['split_bytes_up'] / 1e6:.2f} down {run['split_bytes_down'] / 1e6:.2f} | {run['seconds']:.1f} s")
    final = {name: [r["accuracy"][-1] for r in rs] for name, rs in runs.items()}
    mean = {name: sum(v) / len(v) for name, v in final.items()}
    diffs = [100 * (a - b) for a, b in zip(final["fp8-e4m3/fp8-e5m2"], final["fp32/fp32"])]
    print(f"  mean final accuracy: fp32 {mean['fp32/fp32']:.4f}, fp8 {mean['fp8-e4m3/fp8-e5m2']:.4f}")
    print(f"  difference fp8 - fp32 (percentage points): mean {sum(diffs) / len(diffs):+.2f}, per seed {' '.join(f'{d:+.2f}' for d in diffs)}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps({"bytes_per_step": sizes, "runs": runs, "data": args.data}, indent=1))


if __name__ == "__main__":
    main()
