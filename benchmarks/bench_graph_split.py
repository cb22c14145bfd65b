"""What crosses each cut of a graph-split model, its bytes, and what splitting costs.

For torchvision ResNet-18 (CIFAR-sized input) at every residual-stage boundary and inside
stages where a skip crosses, a U-Net-like model with a long skip, and a residual MLP: per cut,
the crossing tensors and their per-sample elements, the smashed bytes per sample on the wire
(fp32, bf16, fp8-e4m3: measured from the encoded Flower array, scale excluded), the largest
forward/gradient difference to the unsplit model (``SplitModel.verify``; float32, the models'
own dtype, batch 4), and the seconds splitting takes: tracing in train and eval mode with
shape propagation, and the verify ``as_split_model`` runs by default.

    python benchmarks/bench_graph_split.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flsplit.wire.codecs import get_codec  # noqa: E402
from flsplit.wire.protocol import SmashedBatch, encode_batches  # noqa: E402
from flsplit.model.splitting import as_split_model  # noqa: E402
from tests.test_graph_split import ResMLP, TinyUNet  # noqa: E402

CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32),
                 ["layer1", "layer2", "layer3", "layer4", "avgpool", "layer1.0.conv2", "layer2.0.conv2", "layer3.1.bn2"]),
    "tiny-unet": (TinyUNet, (1, 8, 8), ["down", "up", "dec"]),
    "resmlp": (ResMLP, (30,), ["blocks.0", "blocks.0.fc2", "head"]),
}


def wire_bytes(smashed: torch.Tensor, codec: str) -> int:
    record = encode_batches([SmashedBatch(smashed, torch.zeros(smashed.shape[0], dtype=torch.int64))], get_codec(codec))
    return record["x.0"].numpy().nbytes


def measure(name: str) -> list[dict]:
    build, shape, cuts = CASES[name]
    rows = []
    for cut in cuts:
        torch.manual_seed(0)
        model = build()
        x = torch.randn(4, *shape)
        t0 = time.perf_counter()
        split = as_split_model(model, example_input=x, cuts=[cut], verify=False)
        split_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        diff = split.verify(x)
        verify_s = time.perf_counter() - t0
        with torch.no_grad():
            smashed = split.client_part(1)(x)
        crossing = split.crossing(1)
        rows.append({
            "model": name, "cut": cut,
            "crossing": [{"name": c.name, "shape": list(c.shape), "elements": c.elements} for c in crossing],
            "elements_per_sample": sum(c.elements for c in crossing),
            **{f"bytes_per_sample_{codec}": wire_bytes(smashed, codec) / x.shape[0] for codec in ("fp32", "bf16", "fp8-e4m3")},
            "max_abs_diff": diff, "split_seconds": split_s, "verify_seconds": verify_s,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [row for name in CASES for row in measure(name)]
    print("| model | cut | crossing (per-sample shape) | elements | fp32 B | bf16 B | fp8 B | max diff | split s | verify s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        what = ", ".join(f"{c['name']} {tuple(c['shape'])}" for c in r["crossing"])
        print(f"| {r['model']} | `{r['cut']}` | {what} | {r['elements_per_sample']} | {r['bytes_per_sample_fp32']:.0f} | "
              f"{r['bytes_per_sample_bf16']:.0f} | {r['bytes_per_sample_fp8-e4m3']:.0f} | {r['max_abs_diff']:.1e} | "
              f"{r['split_seconds']:.2f} | {r['verify_seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
