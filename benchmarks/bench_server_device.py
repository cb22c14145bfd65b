"""Server-step throughput of the server part on the CPU and on CUDA (``server-device``), one run.

VGG11 (CIFAR-style, 3x32x32 inputs, batch norm) cut at block 4 (after the first conv block and
its pooling: 64x16x16 smashed data per sample), 8 clients, each with ``--batch`` samples per
step. One server step is PSL's ``ServerPart.step_union``: the union of the 8 batches forward,
backward, SGD step, and the 8 clients' cut-layer gradients back on the CPU. The smashed
batches start on the CPU every step, as decoded from the wire, so the host-to-device copy is
counted. Every device runs the same steps from the same weights; the last step's loss is
printed per device (they agree to float tolerance, not bit for bit).

Reported per device: median seconds per server step over ``--steps`` timed steps (after
``--warmup`` untimed ones) and samples per second (8 x batch / median). With CUDA the clock
is read after ``torch.cuda.synchronize()``; the gradients' copy back to the CPU synchronises
anyway.

Run: ``python benchmarks/bench_server_device.py [--batch 32] [--steps 30] [--json out.json]``.
On a machine without CUDA only the CPU row is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flsplit.wire.protocol import SmashedBatch
from flsplit.runtime.server import ServerPart
from flsplit.model.zoo import build_model

CUT, CLIENTS = 4, 8


def smashed_batches(batch: int, seed: int = 0) -> list[tuple[int, SmashedBatch]]:
    """The 8 clients' smashed batches at cut 4: the client blocks applied to random images."""
    torch.manual_seed(seed)
    client = build_model("vgg11", 10, 3, 32).blocks[:CUT]
    with torch.no_grad():
        return [(CUT, SmashedBatch(client(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,))))
                for _ in range(CLIENTS)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure(device: str, batches, steps: int, warmup: int) -> dict:
    torch.manual_seed(1)
    model = build_model("vgg11", 10, 3, 32)
    model.blocks.to(device)
    part = ServerPart(model, CUT, learning_rate=0.01, momentum=0.9)
    times = []
    for k in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        grads = part.step_union(batches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
        assert all(g.device.type == "cpu" for g in grads)
    median = statistics.median(times)
    rows = sum(b.y.shape[0] for _, b in batches)
    return {"device": device, "name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
            "median_s_per_step": median, "samples_per_s": rows / median, "last_step_loss": part.stats.loss,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples per client per step (default 32)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = smashed_batches(args.batch)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [measure(d, batches, args.steps, args.warmup) for d in devices]
    print(f"VGG11 cut {CUT}, {CLIENTS} clients x {args.batch} samples per server step, torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(f"{'device':8s} {'name':40s} {'s/step (median)':>16s} {'samples/s':>10s} {'last loss':>10s}")
    for r in rows:
        print(f"{r['device']:8s} {r['name'][:40]:40s} {r['median_s_per_step']:16.4f} {r['samples_per_s']:10.0f} "
              f"{r['last_step_loss']:10.4f}")
    if len(rows) == 2:
        print(f"GPU / CPU throughput: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.1f}x")
    else:
        print("no CUDA device: only the CPU row")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
