"""What the reply gate costs per reply, side by side with decoding alone.

The gate (``flsplit.wire.gate.ReplyGate``) checks a step reply's records, keys, sizes, status and
device records and then decodes it with ``protocol.decode_smashed``, which the server called
alone before the gate existed. Both run in one process, interleaved, on the same replies;
the ratio is what matters (the machine is shared). A final reply's client-part check is
timed too, against ``ArrayRecord.to_torch_state_dict`` (what averaging decodes anyway).

    python benchmarks/bench_gate.py [--repeats 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.runtime.aggregation import block_of
from flsplit.wire.codecs import get_codec
from flsplit.wire.gate import ReplyGate
from flsplit.model.splitting import SplitModel, block_output_shapes
from flsplit.model.zoo import build_model


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    cases = [("digits-cnn", 1, 8, 10, 2, 32), ("vgg11", 3, 32, 10, 4, 32)]
    print("| model | cut | codec | batch | decode alone (ms) | gate: checks + decode (ms) | ratio | client part: decode (ms) | gate (ms) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, channels, size, classes, cut, batch in cases:
        torch.manual_seed(0)
        model = SplitModel(build_model(name, num_classes=classes, in_channels=channels, image_size=size).blocks)
        shapes = block_output_shapes(model, (channels, size, size))
        for codec_name in ("native", "fp8-e4m3"):
            codec = get_codec(codec_name)
            gate = ReplyGate(model.blocks.state_dict(), block_of, shapes, torch.float32, classes, batch, 1, codec)
            b = p.SmashedBatch(torch.randn(batch, *shapes[cut - 1]), torch.randint(0, classes, (batch,)))
            step = RecordDict({p.SMASHED: p.encode_batches([b], codec),
                               p.STATUS: ConfigRecord({"done": False, "position": 0, "remaining": 10})})
            part = ArrayRecord(gate.part_spec(cut))
            final = RecordDict({p.CLIENT_PART: part, p.METRICS: MetricRecord({"num-examples": batch}),
                                p.STATUS: ConfigRecord({"done": True, "position": 1})})
            plain, gated, pdec, pgate = [], [], [], []
            for _ in range(3):  # interleaved rounds: drift hits both sides alike
                plain += _time(lambda: p.decode_smashed(step.array_records[p.SMASHED], shapes[cut - 1], torch.float32,
                                                        classes, codec), args.repeats)
                gated += _time(lambda: gate.step(step, cut), args.repeats)
                pdec += _time(lambda: part.to_torch_state_dict(), args.repeats // 3)
                pgate += _time(lambda: gate.final(final, cut, batch), args.repeats // 3)
            a, g = statistics.median(plain) * 1e3, statistics.median(gated) * 1e3
            c, f = statistics.median(pdec) * 1e3, statistics.median(pgate) * 1e3
            print(f"| {name} | {cut} | {codec_name} | {batch} | {a:.3f} | {g:.3f} | {g / a:.2f} | {c:.3f} | {f:.3f} | {f / c:.2f} |")


if __name__ == "__main__":
    main()
