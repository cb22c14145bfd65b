"""Bytes per token at the cut of a split language model, per wire codec, plain and U-shaped.

The bytes are the serialized records as the runtime builds them (``flsplit.wire.protocol``:
``encode_batches``, ``encode_tensors``, ``encode_grads``) and as the data planes count them
(``flsplit.planes.dataplane.payload_bytes``: array bytes with their headers), for one batch of a
GPT-2-style model (``flsplit.model.hf.build_hf_model("gpt2", hidden=384, layers=6, heads=6)``,
byte vocabulary, 64-token sequences of the offline ``stdlib-text`` corpus). A plain step sends
the smashed data and the labels up and the cut gradient down; a U-shaped step sends the smashed
data (no labels) and the tail's gradient up, and the middle's output and the cut gradient down.

Usage: ``python benchmarks/bench_text_wire.py [--batch 8] [--cut 2] [--tail 6]``
"""

from __future__ import annotations

import argparse
import platform

import torch
from flwr.app import RecordDict

from flsplit.data.text import stdlib_text
from flsplit.model.hf import build_hf_model
from flsplit.planes.dataplane import payload_bytes
from flsplit.wire import protocol as p
from flsplit.wire.codecs import get_codec

CODECS = ("fp32", "bf16", "fp16", "fp8-e4m3", "fp8-e5m2", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--tail", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    split = build_hf_model("gpt2", vocab_size=256, seq_len=64, hidden=384, layers=6, heads=6)
    x, y, _ = stdlib_text("train")
    x, y = x[: args.batch], y[: args.batch]
    with torch.no_grad():
        smashed = split.blocks[: args.cut](x)
        middle = split.blocks[args.cut : args.tail](smashed)
    tokens = x.numel()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}; GPT-2 style 6 x 384, "
          f"batch {args.batch} x 64 tokens, cut {args.cut}, tail {args.tail}")
    print(f"{'codec':10} {'plain up':>10} {'plain down':>11} {'U up':>8} {'U down':>8}   (bytes per token)")
    for name in CODECS:
        codec = get_codec(name)
        size = lambda records: payload_bytes(RecordDict(records)) / tokens  # noqa: E731
        plain_up = size({p.SMASHED: p.encode_batches([p.SmashedBatch(smashed, y)], codec)})
        plain_down = size({p.GRAD: p.encode_grads([torch.randn_like(smashed)], codec)})
        u_up = size({p.SMASHED: p.encode_batches([p.SmashedBatch(smashed, None)], codec),
                     p.TAIL_GRAD: p.encode_tensors([torch.randn_like(middle)], "t", codec)})
        u_down = size({p.ACTS: p.encode_tensors([middle], "a", codec), p.GRAD: p.encode_grads([torch.randn_like(smashed)], codec)})
        print(f"{name:10} {plain_up:10.1f} {plain_down:11.1f} {u_up:8.1f} {u_down:8.1f}")
    # The client part a round sends down and back up: in full, or (LoRA) its adapters only.
    from flwr.app import ArrayRecord

    from flsplit.model.lora import add_lora
    from flsplit.model.splitting import exchanged_keys

    add_lora(split, rank=8, alpha=16.0)
    for tail in (0, args.tail):
        part = split.client_part(args.cut, tail)
        state = part.state_dict()
        full = payload_bytes(RecordDict({p.CLIENT_PART: ArrayRecord({k: v for k, v in state.items() if "lora_" not in k})}))
        keys = exchanged_keys(part)
        adapters = payload_bytes(RecordDict({p.CLIENT_PART: ArrayRecord({k: state[k] for k in keys})}))
        shape = f"cut {args.cut}" + (f", tail {tail}" if tail else "")
        print(f"client part ({shape}): full {full} bytes, LoRA rank 8 adapters {adapters} bytes "
              f"({len(keys)} tensors), {full / adapters:.1f}x smaller, each way per round")


if __name__ == "__main__":
    main()
