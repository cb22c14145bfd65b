"""Wire codecs: exact fp32, fp8 error bounds, refusal of NaN/inf, bytes from the real messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from flsplit.wire.codecs import CODECS, CodecError, get_codec
from flsplit.planes.dataplane import payload_bytes
from flsplit.strategies import SFLV2
from tests.helpers import random_data, run_strategy

SHAPES = [(7,), (4, 16), (2, 3, 5, 5), (32, 64, 4, 4)]
SCALES = [1e-6, 1.0, 3e4]


def round_trip(name: str, x: torch.Tensor) -> torch.Tensor:
    record = ArrayRecord()
    get_codec(name).encode_into(record, "t", x)
    return get_codec(name).decode_from(record, "t", x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp32_and_native_round_trips_are_exact(dtype):
    x = (torch.randn(3, 4, 5) * 123.4).to(dtype)  # values a float32 can hold
    assert torch.equal(round_trip("fp32", x), x)
    y = torch.randn(3, 4, dtype=dtype)
    assert torch.equal(round_trip("native", y), y)


@pytest.mark.parametrize("name, divisor", [("fp8-e4m3", 28.0), ("fp8-e5m2", 14.0), ("int8", 254.0)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_scaled_codecs_stay_within_their_error_bound(name, divisor, shape, scale):
    g = torch.Generator().manual_seed(hash((name, shape, scale)) % 2**31)
    x = torch.randn(*shape, generator=g) * scale
    amax = float(x.abs().max())
    error = float((round_trip(name, x) - x).abs().max())
    # the bound, plus float32 rounding of the scale multiply
    assert error <= amax / divisor + 4 * torch.finfo(torch.float32).eps * amax


@pytest.mark.parametrize("name", sorted(CODECS))
def test_all_zero_and_single_value_tensors_survive(name):
    zeros = torch.zeros(4, 3)
    assert torch.equal(round_trip(name, zeros), zeros)
    single = torch.full((5,), -2.5)
    out = round_trip(name, single)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, single, rtol=0.07)  # bf16/fp8 may round, never explode
    one = torch.tensor([0.75])
    assert torch.isfinite(round_trip(name, one)).all()


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_refused(name, bad):
    x = torch.ones(3, 3)
    x[1, 2] = bad
    with pytest.raises(CodecError, match="refusing to encode NaN or infinite"):
        get_codec(name).encode_into(ArrayRecord(), "x.0", x)


def test_payload_size_per_codec():
    x = torch.randn(32, 64, 8, 8)
    n = x.numel()
    sizes = {}
    for name in CODECS:
        record = ArrayRecord()
        get_codec(name).encode_into(record, "x.0", x)
        sizes[name] = sum(len(a.data) for a in record.values())
    header = sizes["fp32"] - 4 * n  # numpy's .npy header
    assert 0 < header <= 256
    assert sizes["fp16"] - header == 2 * n and sizes["bf16"] - header == 2 * n
    for name in ("fp8-e4m3", "fp8-e5m2", "int8"):
        assert n < sizes[name] - header <= n + 256  # one byte per value plus the scale array


def test_unknown_codec_and_mismatched_payload_are_named():
    with pytest.raises(ValueError, match="unknown codec 'fp4'"):
        get_codec("fp4")
    record = ArrayRecord()
    get_codec("fp16").encode_into(record, "x.0", torch.ones(2))
    with pytest.raises(CodecError, match="wrong dtype torch.float16, expected torch.uint8"):
        get_codec("fp8-e4m3").decode_from(record, "x.0", torch.float32)
    get_codec("fp8-e4m3").encode_into(record, "y.0", torch.ones(2))
    del record["y.0.scale"]
    with pytest.raises(CodecError, match="missing key 'y.0.scale'"):
        get_codec("fp8-e4m3").decode_from(record, "y.0", torch.float32)


def test_history_bytes_are_what_the_messages_carried():
    """Per node, per direction: the bytes recorded equal the arrays the grid delivered."""
    carried: dict[int, int] = {}

    def count(node_id, reply):
        if reply.has_content():
            carried[node_id] = carried.get(node_id, 0) + payload_bytes(reply.content, "split.")
        return reply

    parts = [random_data(16, seed=1), random_data(16, seed=2)]
    fp8, _, _ = run_strategy(SFLV2, parts, cut_layer=2, batch_size=8, codec_up="fp8-e4m3", codec_down="fp8-e5m2", intercept=count)
    entry = fp8.history.rounds[0]
    for node, counters in entry["bytes_per_node"].items():
        assert counters["split_up"] == carried[int(node)]
    native, _, _ = run_strategy(SFLV2, parts, cut_layer=2, batch_size=8)
    ratio = entry["split_bytes_up"] / native.history.rounds[0]["split_bytes_up"]
    assert 0.125 < ratio < 0.14  # float64 model: one byte instead of eight, plus headers and labels
    assert entry["split_bytes_down"] < native.history.rounds[0]["split_bytes_down"] / 7


# ---------------------------------------------------------------------------- float edges
# (amax, dtype) pairs at the edges: float32's subnormal range, its smallest normal, tiny and
# huge float64 beyond float32's range, and float32's maximum.
EDGES = [
    (1e-40, torch.float32), (2e-45, torch.float32), (1.2e-38, torch.float32), (3e38, torch.float32),
    (1e-200, torch.float64), (1e-300, torch.float64), (1e300, torch.float64), (1e-320, torch.float64),
]
RELATIVE = {"fp8-e4m3": 1 / 28, "fp8-e5m2": 1 / 14, "int8": 1 / 254, "fp16": 2.0**-11, "bf16": 2.0**-8,
            "fp32": 2.0**-24, "native": 0.0}


def _edge_tensor(amax: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1) * amax
    x[0] = amax
    return x.to(dtype)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("amax, dtype", EDGES)
def test_float_edges_are_exact_within_the_bound_or_refused_at_encoding(name, amax, dtype):
    """Never inf or NaN after decoding: either the round trip stays within the codec's
    documented error (relative to amax, plus the target's smallest subnormal for values that
    underflow), or encoding refuses with an error naming the codec or the range."""
    x = _edge_tensor(amax, dtype)
    record = ArrayRecord()
    codec = get_codec(name)
    try:
        codec.encode_into(record, "t", x)
    except CodecError as err:
        assert name in str(err) or "range" in str(err)
        # what is refused is only what cannot be represented: beyond the wire dtype's range,
        # or a scale no float64 holds as a normal number
        beyond = not codec.scaled and codec.wire_dtype is not None and float(x.abs().max()) > torch.finfo(codec.wire_dtype).max
        assert beyond or amax / (codec.max_value or 1.0) < torch.finfo(torch.float64).tiny, str(err)
        return
    y = codec.decode_from(record, "t", dtype)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    real_amax = float(x.abs().max())
    floor = torch.finfo(codec.wire_dtype).smallest_normal * torch.finfo(codec.wire_dtype).eps if codec.wire_dtype is not None and not codec.scaled else 0.0
    bound = real_amax * (RELATIVE[name] + 8 * torch.finfo(dtype).eps) + floor + 2 * float(torch.finfo(dtype).smallest_normal) * torch.finfo(dtype).eps
    error = float((y.double() - x.double()).abs().max())
    assert error <= bound, (error, bound)


def test_the_issue_examples():
    """``[1e-40, -5e-41]`` through fp8-e5m2 came back as ``[inf, ...]``; fp16 turned 7e4 into inf."""
    x = torch.tensor([1e-40, -5e-41])
    y = round_trip("fp8-e5m2", x)
    assert bool(torch.isfinite(y).all()) and float((y - x).abs().max()) <= 1e-40 / 14
    with pytest.raises(CodecError, match="beyond torch.float16's range"):
        round_trip("fp16", torch.tensor([7e4, 1.0]))


def test_a_scale_that_decodes_beyond_the_dtype_is_refused():
    """A client's payload whose scale blows its values past the dtype's range is refused."""
    record = ArrayRecord()
    get_codec("fp8-e5m2").encode_into(record, "t", torch.tensor([1.0, -1.0]))
    from flwr.app import Array

    record["t.scale"] = Array(torch.tensor(3e38, dtype=torch.float32))  # 57344 x 3e38 = inf in float32
    with pytest.raises(CodecError, match="beyond torch.float32's range"):
        get_codec("fp8-e5m2").decode_from(record, "t", torch.float32)
    record["t.scale"] = Array(torch.tensor(3, dtype=torch.int32))
    with pytest.raises(CodecError, match="wrong dtype"):
        get_codec("fp8-e5m2").decode_from(record, "t", torch.float32)
