"""Stream payload: CPU time to encode and decode a step's ``RecordDict``, Flower's protobuf serde
(the stream plane's payload until issue 23) against ``flsplit.planes.stream.payload``'s raw
tensors, side by side in one process.

Cases (what a stream frame carries per step):

* ``grad 64 B``: ``split.grad`` with one float32 gradient of 16 values (``p.encode_grads``);
* ``grad 256 KiB``: the same with a (64, 16, 8, 8) float32 gradient;
* ``step reply``: a real reply, ``split.smashed`` = ``p.encode_batches`` of a (64, 16, 6, 6)
  float32 batch with its int64 labels, and ``split.status`` (done, position, remaining).

Each sample times ``inner`` back-to-back calls (so that a sample lasts about 2 ms)
with ``time.process_time`` and ``time.perf_counter``; old and new alternate sample by sample,
and the table gives the median per call over ``--reps`` samples. The decoder is given a
``bytearray``, as ``recv_frame`` hands it over.

Run: ``python benchmarks/bench_frames.py [--reps 301] [--profile] [--options]``

``--profile`` prints where cProfile finds the time of 2,000 encode+decode round trips of the
256 KiB gradient and of the step reply, old path by stage; ``--options`` times ways to build
the decoded ``Array`` and what the receiver still pays after decoding (``Array.numpy()``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import time
from typing import Callable

import flwr
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from flsplit.planes.stream import payload
from flsplit.wire import protocol as p
from flsplit.wire.codecs import get_codec


def old_encode(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def old_decode(data: bytearray) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def cases() -> dict[str, RecordDict]:
    torch.manual_seed(0)
    fp32 = get_codec("fp32")
    small = RecordDict({p.GRAD: p.encode_grads([torch.randn(1, 16)], fp32)})
    big = RecordDict({p.GRAD: p.encode_grads([torch.randn(64, 16, 8, 8)], fp32)})
    batch = p.SmashedBatch(torch.randn(64, 16, 6, 6), torch.randint(0, 10, (64,)))
    step = RecordDict(
        {
            p.SMASHED: p.encode_batches([batch], fp32),
            p.STATUS: ConfigRecord({"done": False, "position": 128, "remaining": 64}),
        }
    )
    return {"grad 64 B": small, "grad 256 KiB": big, "step reply": step}


def sample(fn: Callable[[], object], inner: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call of ``fn``, over ``inner`` calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.process_time() - c0) / inner, (time.perf_counter() - w0) / inner


def measure(content: RecordDict, reps: int) -> dict[str, dict[str, float]]:
    old_bytes, new_bytes = bytearray(old_encode(content)), bytearray(payload.encode_content(content))
    # the same RecordDict out of both (the tests hold every corpus case to this)
    assert old_decode(old_bytes) == payload.decode_content(new_bytes)
    fns = {
        ("old", "encode"): lambda: old_encode(content),
        ("old", "decode"): lambda: old_decode(old_bytes),
        ("new", "encode"): lambda: payload.encode_content(content),
        ("new", "decode"): lambda: payload.decode_content(new_bytes),
    }
    # calibrate: about 2 ms of work per sample
    inner = max(1, int(2e-3 / max(sample(fns[("old", "decode")], 20)[1], 1e-7)))
    for fn in fns.values():
        sample(fn, inner)  # warm caches (the new path's .npy header cache among them)
    got: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in fns}
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(list(fns)))
        for key in order:
            got[key].append(sample(fns[key], inner))
    out: dict[str, dict[str, float]] = {}
    for impl in ("old", "new"):
        row = {"bytes": len(old_bytes if impl == "old" else new_bytes), "inner": inner}
        for op in ("encode", "decode"):
            row[f"{op}_cpu"] = statistics.median(c for c, _ in got[(impl, op)])
            row[f"{op}_wall"] = statistics.median(w for _, w in got[(impl, op)])
        # per-sample sum, then the median (not the sum of two medians)
        row["both_cpu"] = statistics.median(a[0] + b[0] for a, b in zip(got[(impl, "encode")], got[(impl, "decode")]))
        row["both_wall"] = statistics.median(a[1] + b[1] for a, b in zip(got[(impl, "encode")], got[(impl, "decode")]))
        out[impl] = row
    return out


# (label, function name as pstats keys it, file suffix or "" for built-ins)
_STAGES = [
    ("encode: recorddict_to_proto (records -> protobuf objects, arrays copied in)", "recorddict_to_proto", "serde.py"),
    ("encode: SerializeToString (protobuf, C)", "<method 'SerializeToString' of 'google._upb._message.Message' objects>", ""),
    ("decode: FromString (protobuf parse, C)", "<built-in method FromString>", ""),
    ("decode: recorddict_from_proto (protobuf -> records)", "recorddict_from_proto", "serde.py"),
    ("  ArrayRecord.__init__ (old: ArrayRecord(dict), which builds every Array again)", "__init__", "arrayrecord.py"),
    ("  all: Array.__init__", "__init__", "array.py"),
    ("  all: TypedDict.__setitem__ (type checks, typing.cast)", "__setitem__", "typeddict.py"),
    ("encode: payload.encode_content", "encode_content", "payload.py"),
    ("decode: payload.decode_content", "decode_content", "payload.py"),
    ("  in it: payload._decode_array (parse, header, copy, Array)", "_decode_array", "payload.py"),
]


def profile(corpus: dict[str, RecordDict], n: int = 2000) -> None:
    """cProfile's cumulative time of the old path's stages (and the new path's), per round
    trip, and each one's share of its path's profiled total. The profiler's own cost
    inflates Python calls (shares lean towards call-heavy code), so read the shares, not the
    absolute microseconds."""
    for case in ("grad 256 KiB", "step reply"):
        content = corpus[case]
        rows: dict[str, tuple[float, int]] = {}
        totals = {}
        for impl, enc, dec in (("old", old_encode, old_decode), ("new", payload.encode_content, payload.decode_content)):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                dec(bytearray(enc(content)))
            prof.disable()
            stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            # the path's total: its encode and decode calls (what the loop calls), as profiled
            roots = {"old": ("old_encode", "old_decode"), "new": ("encode_content", "decode_content")}[impl]
            totals[impl] = sum(v[3] for (path, _, name), v in stats.items()
                               if name in roots and path.endswith("bench_frames.py" if impl == "old" else "payload.py")) / n
            for label, func, suffix in _STAGES:
                for (path, _line, name), (_cc, calls, _tt, cum, _callers) in stats.items():
                    if name == func and path.endswith(suffix):
                        got = rows.get((impl, label), (0.0, 0))
                        rows[(impl, label)] = (got[0] + cum / n, got[1] + calls // n)
        print(f"\n=== cProfile, {case}: {n} round trips (encode, then decode of a bytearray) per path")
        print(f"profiled per round trip: old {totals['old'] * 1e6:.1f} us, new {totals['new'] * 1e6:.1f} us")
        print("| path | stage | calls per round trip | cumulative us per round trip (profiled) | share of the path |")
        print("|---|---|---:|---:|---:|")
        for impl in ("old", "new"):
            for label, _func, _suffix in _STAGES:
                if (impl, label) in rows:
                    cum, calls = rows[(impl, label)]
                    print(f"| {impl} | {label} | {calls} | {cum * 1e6:.1f} | {cum / totals[impl]:.0%} |")


def options(reps: int) -> None:
    """Ways to build the decoded Array of a (64, 16, 8, 8) float32 buffer."""
    x = np.random.default_rng(0).standard_normal((64, 16, 8, 8)).astype(np.float32)
    raw = bytearray(x.tobytes())
    view = memoryview(raw)
    header = payload._npy_header("<f4", False, x.shape)  # pylint: disable=protected-access
    ways = {
        "Array(np.frombuffer(view).reshape) (np.save inside)": lambda: Array(np.frombuffer(view, np.float32).reshape(x.shape)),
        "Array(dtype, shape, stype, header + bytes(view))": lambda: Array(
            dtype="float32", shape=x.shape, stype="numpy.ndarray", data=header + bytes(view)
        ),
        "Array(dtype, shape, stype, b''.join((header, view)))": lambda: Array(
            dtype="float32", shape=x.shape, stype="numpy.ndarray", data=b"".join((header, view))
        ),
        "b''.join((header, view)) alone (the copy)": lambda: b"".join((header, view)),
        "Array(dtype, shape, stype, b'') alone (the constructor)": lambda: Array(
            dtype="float32", shape=x.shape, stype="numpy.ndarray", data=b""
        ),
        "payload._array_by_fields(..., b''.join((header, view)))  [used]": lambda: payload._array_by_fields(  # pylint: disable=protected-access
            "float32", x.shape, "numpy.ndarray", b"".join((header, view))
        ),
    }
    built = Array(x)
    record = ArrayRecord()
    after = {
        "Array.numpy() of it (np.load: the receiver's .npy parse and copy, in codecs.py)": built.numpy,
        "ArrayRecord()[key] = array (TypedDict.__setitem__, per item)": lambda: record.__setitem__("x.0", built),
    }
    print("\n=== decoded Array, 256 KiB float32: median CPU us per call")
    for name, fn in {**ways, **after}.items():
        cpu = statistics.median(sample(fn, 50)[0] for _ in range(reps))
        print(f"{cpu * 1e6:10.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=301)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--options", action="store_true")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__ if hasattr(flwr, '__version__') else '?'}, "
        f"numpy {np.__version__}, {os.cpu_count()} cpus, load average {os.getloadavg()}"
    )
    corpus = cases()
    if args.profile:
        profile(corpus)
    if args.options:
        options(max(31, args.reps // 5))
    print(f"\nmedian per call over {args.reps} samples, microseconds (CPU = process_time, wall = perf_counter)")
    print("| case | payload bytes old / new | encode CPU old / new | decode CPU old / new | encode+decode CPU old / new | ratio | encode+decode wall old / new | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, content in corpus.items():
        r = measure(content, args.reps)
        o, n = r["old"], r["new"]
        us = lambda v: f"{v * 1e6:.1f}"  # noqa: E731
        print(
            f"| {name} | {o['bytes']:,} / {n['bytes']:,} | {us(o['encode_cpu'])} / {us(n['encode_cpu'])} | "
            f"{us(o['decode_cpu'])} / {us(n['decode_cpu'])} | {us(o['both_cpu'])} / {us(n['both_cpu'])} | "
            f"{o['both_cpu'] / n['both_cpu']:.2f}x | {us(o['both_wall'])} / {us(n['both_wall'])} | "
            f"{o['both_wall'] / n['both_wall']:.2f}x |"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
