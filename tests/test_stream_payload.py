"""The stream payload (``flsplit.planes.stream.payload``): raw tensors with dtype and shape.

Round trips are held to Flower's protobuf serde: for every ``RecordDict`` of the corpus (what
flsplit sends, built with ``flsplit.wire.protocol``, and edge cases) the decoded value equals,
strictly (record types, key order, value types, float bits, every ``Array`` attribute), what
``recorddict_from_proto(recorddict_to_proto(...))`` gives. The parser is fuzzed: every
truncation, seeded random byte flips, and crafted payloads (huge counts and lengths, bad
dtypes, shapes, tags, non-UTF-8 names) must raise ``PayloadError`` (``FrameError`` through
``frames``) and nothing else, without a large allocation.
"""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611

from flsplit.planes.stream import frames
from flsplit.planes.stream import payload as pl
from flsplit.wire import protocol as p
from flsplit.wire.codecs import get_codec


# ------------------------------------------------------------------------------ the corpus
def flower_round_trip(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(recorddict_to_proto(content).SerializeToString()))


def _value(v: Any) -> Any:
    """A value with its type, floats as their bits (NaN equals NaN, -0.0 differs from 0.0)."""
    if isinstance(v, list):
        return ("list", [_value(x) for x in v])
    if isinstance(v, float):
        return (float, struct.pack("<d", v))
    return (type(v), v)


def canon(content: RecordDict) -> list:
    """Everything a ``RecordDict`` holds, in order, with types: stricter than ``==`` (which
    takes ``True`` for ``1`` and a ``ConfigRecord`` for an equal ``MetricRecord``)."""
    out = []
    for name, record in content.items():
        items = []
        for key, v in record.items():
            if isinstance(v, Array):
                items.append((key, type(v), dict(vars(v))))  # every attribute, _is_dirty included
            else:
                items.append((key, _value(v)))
        out.append((name, type(record), items))
    return out


def _torch_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(6, 2))
    return layer.state_dict()


def protocol_corpus() -> dict[str, RecordDict]:
    """RecordDicts like the ones flsplit's steps send, through ``flsplit.wire.protocol``."""
    torch.manual_seed(0)
    fp32 = get_codec("fp32")
    batch = p.SmashedBatch(torch.randn(4, 16, 6, 6), torch.randint(0, 10, (4,)))
    u_batch = p.SmashedBatch(torch.randn(3, 5), None)
    out = {
        "step reply": RecordDict(
            {
                p.SMASHED: p.encode_batches([batch, batch], fp32),
                p.STATUS: ConfigRecord({"done": False, "position": 128, "remaining": 64}),
            }
        ),
        "u-shaped reply": RecordDict(
            {
                p.SMASHED: p.encode_batches([u_batch], fp32),
                p.TAIL_GRAD: p.encode_tensors([torch.randn(3, 5)], "t", fp32),
                p.LOSS: MetricRecord({"loss-sum.0": 2.5, "correct.0": 3}),
            }
        ),
        "first request": RecordDict(
            {
                p.CONFIG: p.SplitConfig(server_round=1, cut=2, batch_size=4).to_record(),
                p.CLIENT_PART: ArrayRecord(_torch_state()),
            }
        ),
        "round end": RecordDict(
            {
                p.CLIENT_PART: ArrayRecord(_torch_state()),
                p.METRICS: MetricRecord({"num-examples": 48}),
                p.STATUS: ConfigRecord({"done": True, "position": 48}),
            }
        ),
        "broadcast": RecordDict(
            {
                p.GRAD: p.encode_grads([torch.randn(2, 8)], fp32),
                p.BCAST: p.encode_tensors([torch.randn(4, 8)], "b", fp32),
                p.BCAST_CONFIG: ConfigRecord({"positions.0": [0, 2, 3], "scale.0": 0.25}),
            }
        ),
    }
    for codec in ("fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "int8", "native"):
        out[f"grads {codec}"] = RecordDict({p.GRAD: p.encode_grads([torch.randn(4, 3, 2), torch.randn(1)], get_codec(codec))})
    return out


def edge_corpus() -> dict[str, RecordDict]:
    arrays = {f"{d}": Array(np.arange(6).astype(d).reshape(2, 3)) for d in pl.DESCRS}
    arrays.update(
        {
            "0-d": Array(np.array(3.5, dtype=np.float16)),
            "empty": Array(np.zeros((0, 5), np.int64)),
            "empty 1-d": Array(np.zeros((0,), np.float32)),
            "zero inner": Array(np.zeros((3, 0, 2), np.uint8)),
            "fortran": Array(np.asfortranarray(np.arange(12.0).reshape(3, 4))),
            "bool": Array(np.array([True, False, True])),
            "many dims": Array(np.zeros((1,) * 32, np.float32)),
            "bf16 as stored": Array(torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.int16)),
            "non-contiguous": Array(np.arange(20.0).reshape(4, 5)[:, ::2]),
            "transposed": Array(torch.arange(6.0).reshape(2, 3).t()),
            # not plain numbers, or not .npy: carried verbatim
            "unicode": Array(np.array(["ab", "c"])),
            "datetime": Array(np.array(["2026-01-01"], dtype="datetime64[D]")),
            "structured": Array(np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])),
            "longdouble": Array(np.zeros(2, dtype=np.longdouble)),
            "custom stype": Array(dtype="x", shape=(-1, 2), stype="custom", data=b"abc"),
            "header lies": Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x93NUMPY garbage"),
            "empty data": Array(dtype="", shape=(), stype="", data=b""),
        }
    )
    weird_keys = ArrayRecord({"": Array(np.zeros(1)), "ключ ✓": Array(np.ones(2)), "a\x00b": Array(np.ones(1))})
    metric = MetricRecord(
        {
            "int": -7, "float": 0.1, "nan": float("nan"), "inf": float("-inf"), "neg zero": -0.0,
            "ints": [1, 2, -3], "floats": [1.0, 2.5], "empty": [], "big": 2**64 - 1, "min": -(2**63),
            "mixed": [1, True], "bigs": [2**63, 0], "np float": np.float64(2.5),
        }
    )
    config = ConfigRecord(
        {
            "t": True, "f": False, "int": 2**63 - 1, "float": 1e308, "str": "héllo\x00", "bytes": b"\x00\xff",
            "bools": [True, False], "ints": [1, -1], "mixed": [1, True], "uints": [2**64 - 1, 5],
            "floats": [0.5], "strs": ["", "✓"], "bytess": [b"", b"\x00"], "empty": [], "empty str": "",
        }
    )
    return {
        "arrays": RecordDict({"a": ArrayRecord(arrays), "k": weird_keys}),
        "values": RecordDict({"m": metric, "c": config, "": ConfigRecord()}),
        "empty records": RecordDict({"a": ArrayRecord(), "m": MetricRecord(), "c": ConfigRecord()}),
        "nothing": RecordDict(),
    }


CORPUS = {**protocol_corpus(), **edge_corpus()}


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", list(CORPUS))
def test_round_trip_equals_flowers(name):
    content = CORPUS[name]
    data = pl.encode_content(content)
    got = pl.decode_content(bytearray(data))
    assert canon(got) == canon(flower_round_trip(content))
    if name != "values":  # NaN != NaN: canon compares float bits instead
        assert got == flower_round_trip(content)
    # through frames (what the plane and the client session call), from bytes too
    assert canon(frames.decode_content(frames.encode_content(content))) == canon(got)


def test_plain_tensors_travel_raw_without_an_npy_header():
    """The step corpus goes as form-1 raw tensors: no ``.npy`` header bytes in the payload."""
    for name in ("step reply", "u-shaped reply", "first request", "broadcast", "grads fp16", "grads bf16"):
        data = pl.encode_content(CORPUS[name])
        assert b"NUMPY" not in data, name
        assert len(data) < len(recorddict_to_proto(CORPUS[name]).SerializeToString())


def test_decoded_arrays_load_and_do_not_alias_the_frame():
    content = CORPUS["step reply"]
    buf = bytearray(pl.encode_content(content))
    got = pl.decode_content(buf)
    buf[:] = b"\x00" * len(buf)  # the receiver reuses its buffer: the arrays are their own bytes
    for key, array in content[p.SMASHED].items():
        assert isinstance(got[p.SMASHED][key].data, bytes)
        np.testing.assert_array_equal(got[p.SMASHED][key].numpy(), array.numpy())


def test_arrays_built_by_fields_are_what_the_constructor_builds():
    """The decoder's shortcut past ``Array.__init__`` is taken on this flwr and leaves the same
    object (attributes, equality, object id) as the constructor."""
    assert pl._new_array is pl._array_by_fields  # pylint: disable=protected-access
    args = ("int64", (0, 5), "numpy.ndarray", b"\x93NUMPY any bytes")
    made, built = pl._array_by_fields(*args), Array(*args)  # pylint: disable=protected-access
    assert vars(made) == vars(built) and made == built and made.object_id == built.object_id


@pytest.mark.parametrize(
    "content, error",
    [
        (RecordDict({"c": ConfigRecord({"x": 2**64})}), ValueError),
        (RecordDict({"c": ConfigRecord({"x": [-(2**63) - 1]})}), ValueError),
        (RecordDict({"m": MetricRecord({"x": [2**64, 1]})}), ValueError),
        (RecordDict({"c": ConfigRecord({"x": [2**63, -1]})}), ValueError),  # uint list with a negative
        (RecordDict({"a": ArrayRecord({"x": Array(dtype="f", shape=(2**31,), stype="s", data=b"")})}), ValueError),
        (RecordDict({"c": ConfigRecord({"x": "\ud800"})}), ValueError),  # a lone surrogate
        (RecordDict({"c": ConfigRecord({"x": ["a", "\udfff"]})}), ValueError),
    ],
)
def test_encode_refuses_what_flowers_serde_refuses(content, error):
    with pytest.raises(error):
        pl.encode_content(content)
    with pytest.raises(Exception):  # Flower's serde (protobuf) refuses it too
        recorddict_to_proto(content).SerializeToString()


def test_encode_refuses_unknown_types():
    with pytest.raises(TypeError, match="not a RecordDict"):
        pl.encode_content({"a": ArrayRecord()})  # type: ignore[arg-type]
    for record, value in ((ConfigRecord(), object()), (ConfigRecord(), bytearray(b"x")), (MetricRecord(), "text"),
                          (ConfigRecord(), [1, "a"]), (ArrayRecord(), np.zeros(2))):
        record.__dict__["_data"]["x"] = value  # past the record's own check, as a bug might put it
        with pytest.raises(TypeError, match="'x'"):
            pl.encode_content(RecordDict({"r": record}))
    content = RecordDict()
    content.__dict__["_data"]["r"] = {"not": "a record"}
    with pytest.raises(TypeError, match="record 'r'"):
        pl.encode_content(content)


# ---------------------------------------------------------------------------------- fuzzing
def _refused(data: bytes | bytearray) -> str:
    """Decode ``data``, which must be refused with PayloadError (and FrameError via frames)."""
    with pytest.raises(pl.PayloadError) as err:
        pl.decode_content(data)
    with pytest.raises(frames.FrameError, match="^payload is not a serialized RecordDict: "):
        frames.decode_content(data)
    message = str(err.value)
    assert "internal parser error" not in message, message  # the parser's own checks caught it, not the net
    return message


def _decodes_or_refuses(data: bytes | bytearray) -> None:
    try:
        got = pl.decode_content(data)
    except pl.PayloadError as err:
        assert "internal parser error" not in str(err), str(err)
    else:
        assert isinstance(got, RecordDict)


FUZZ_SOURCES = {
    "step reply": pl.encode_content(CORPUS["step reply"]),
    "values": pl.encode_content(CORPUS["values"]),
    "arrays": pl.encode_content(RecordDict({"a": ArrayRecord({k: CORPUS["arrays"]["a"][k] for k in list(CORPUS["arrays"]["a"])[::3]}), "k": CORPUS["arrays"]["k"]})),
}


@pytest.mark.parametrize("name", list(FUZZ_SOURCES))
def test_every_truncation_is_refused(name):
    data = FUZZ_SOURCES[name]
    for n in range(len(data)):
        _refused(data[:n])
        _refused(bytearray(data[:n]))
    _refused(data + b"\x00")  # and a byte too many


@pytest.mark.parametrize("name", list(FUZZ_SOURCES))
def test_random_byte_flips_decode_or_are_refused(name):
    data = FUZZ_SOURCES[name]
    rng = random.Random(f"flips-{name}")
    for _ in range(1500):
        mutated = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        _decodes_or_refuses(mutated)
    for _ in range(300):  # and flips confined to the first 200 bytes, where the structure is
        mutated = bytearray(data)
        mutated[rng.randrange(min(200, len(data)))] ^= 1 << rng.randrange(8)
        _decodes_or_refuses(mutated)


# A hand-writer of payloads, to craft what the encoder never would
def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u32(len(raw)) + raw


def one_record(name: bytes | str, kind: int, items: list[bytes]) -> bytes:
    return pl.MAGIC + u32(1) + s(name) + u8(kind) + u32(len(items)) + b"".join(items)


def tensor(key: str | bytes = "x", descr: str | bytes = "<f4", fortran: int = 0, shape: tuple[int, ...] = (2,),
           nbytes: int | None = None, data: bytes | None = None, ndim: int | None = None) -> bytes:
    size = pl.DESCRS[descr].itemsize if isinstance(descr, str) and descr in pl.DESCRS else 4
    count = int(np.prod(shape)) * size
    nbytes = count if nbytes is None else nbytes
    data = b"\x00" * min(count, 64) if data is None else data
    return (s(key) + u8(pl.FORM_TENSOR) + s(descr) + u8(fortran) + u8(len(shape) if ndim is None else ndim)
            + b"".join(u32(d) for d in shape) + u64(nbytes) + data)


def value(key: str | bytes, tag: int, body: bytes) -> bytes:
    return s(key) + u8(tag) + body


GOOD = one_record("r", pl.KIND_ARRAY, [tensor(data=b"\x00" * 8)])

CRAFTED = {
    # counts and lengths far beyond the payload
    "record count 2**32-1": pl.MAGIC + u32(2**32 - 1),
    "item count 2**32-1": pl.MAGIC + u32(1) + s("r") + u8(1) + u32(2**32 - 1),
    "name length 2**32-1": pl.MAGIC + u32(1) + u32(2**32 - 1) + b"r",
    "nbytes 2**64-1": one_record("r", 1, [tensor(nbytes=2**64 - 1)]),
    "nbytes disagrees": one_record("r", 1, [tensor(nbytes=4, data=b"\x00" * 4)]),
    "verbatim nbytes 2**64-1": one_record("r", 1, [s("x") + u8(2) + s("f") + u8(0) + s("s") + u64(2**64 - 1)]),
    "dims overflow int64": one_record("r", 1, [tensor(shape=(2**31 - 1,) * 4, nbytes=2**64 - 1)]),
    "dim over int32": one_record("r", 1, [tensor(shape=(2**32 - 1,), nbytes=(2**32 - 1) * 4)]),
    "dim like -1": one_record("r", 1, [tensor(shape=(0xFFFFFFFF, 0), nbytes=0, data=b"")]),
    "65 dims": one_record("r", 1, [tensor(shape=(1,) * 65)]),
    "255 dims declared": one_record("r", 1, [tensor(shape=(1,), ndim=255)]),
    "str list count 2**32-1": one_record("c", 3, [value("k", pl.LIST | pl.T_STR, u32(2**32 - 1))]),
    "int list count 2**31": one_record("c", 3, [value("k", pl.LIST | pl.T_INT, u32(2**31) + b"\x00" * 16)]),
    "bytes length 2**32-1": one_record("c", 3, [value("k", pl.T_BYTES, u32(2**32 - 1) + b"ab")]),
    # bad dtypes
    "dtype name not descr": one_record("r", 1, [tensor(descr="float32")]),
    "dtype object": one_record("r", 1, [tensor(descr="|O8")]),
    "dtype unicode": one_record("r", 1, [tensor(descr="<U5")]),
    "dtype void huge": one_record("r", 1, [tensor(descr="|V1000000000")]),
    "dtype subarray": one_record("r", 1, [tensor(descr="(1000000000,)f8")]),
    "dtype empty": one_record("r", 1, [tensor(descr="")]),
    "dtype not utf-8": one_record("r", 1, [tensor(descr=b"<f\xff")]),
    "dtype length 2**32-1": one_record("r", 1, [s("x") + u8(1) + u32(2**32 - 1) + b"<f4"]),
    # bad structure
    "no magic": b"",
    "wrong magic": b"FLR2" + u32(0),
    "protobuf": recorddict_to_proto(CORPUS["step reply"]).SerializeToString(),
    "json": b'{"not": "a RecordDict"}',
    "ff": b"\xff" * 64,
    "unknown kind": one_record("r", 9, []),
    "unknown form": one_record("r", 1, [s("x") + u8(7)]),
    "order flag 2": one_record("r", 1, [tensor(fortran=2)]),
    "trailing": GOOD + b"\x00",
    "record twice": pl.MAGIC + u32(2) + (s("r") + u8(3) + u32(0)) * 2,
    "key twice": one_record("r", 1, [tensor(data=b"\x00" * 8)] * 2),
    "config key twice": one_record("c", 3, [value("k", pl.T_BOOL, b"\x01")] * 2),
    "record name not utf-8": one_record(b"\xc3\x28", 3, []),
    "key not utf-8": one_record("r", 1, [tensor(key=b"\xed\xa0\x80", data=b"\x00" * 8)]),
    "config key not utf-8": one_record("c", 3, [value(b"\xff", pl.T_BOOL, b"\x01")]),
    "str value not utf-8": one_record("c", 3, [value("k", pl.T_STR, s(b"\x80"))]),
    "str list item not utf-8": one_record("c", 3, [value("k", pl.LIST | pl.T_STR, u32(1) + s(b"\xfe"))]),
    "verbatim stype not utf-8": one_record("r", 1, [s("x") + u8(2) + s("f") + u8(0) + s(b"\xff") + u64(0)]),
    "bool byte 2": one_record("c", 3, [value("k", pl.T_BOOL, b"\x02")]),
    "bool list byte 7": one_record("c", 3, [value("k", pl.LIST | pl.T_BOOL, u32(3) + b"\x01\x07\x00")]),
    "unknown tag": one_record("c", 3, [value("k", 9, b"")]),
    "list of unknown tag": one_record("c", 3, [value("k", pl.LIST | 9, u32(0))]),
    "tag 0": one_record("c", 3, [value("k", 0, b"")]),
    "metric str": one_record("m", 2, [value("k", pl.T_STR, s("a"))]),
    "metric bool": one_record("m", 2, [value("k", pl.T_BOOL, b"\x01")]),
    "metric bytes list": one_record("m", 2, [value("k", pl.LIST | pl.T_BYTES, u32(0))]),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_payloads_are_refused_without_allocating(name):
    tracemalloc.start()
    try:
        message = _refused(CRAFTED[name])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{name}: {peak} bytes allocated to refuse it ({message})"


def test_crafted_good_payload_decodes():
    """The hand-writer writes the layout the docstring describes (so the refusals above are
    refusals of the one thing changed)."""
    got = pl.decode_content(GOOD)
    assert canon(got) == canon(RecordDict({"r": ArrayRecord({"x": Array(np.zeros(2, np.float32))})}))
    got = pl.decode_content(one_record("c", 3, [value("k", pl.LIST | pl.T_BOOL, u32(2) + b"\x01\x00")]))
    assert canon(got) == canon(RecordDict({"c": ConfigRecord({"k": [True, False]})}))


def test_messages_name_what_was_wrong():
    assert "unsupported dtype 'float32'" in _refused(CRAFTED["dtype name not descr"])
    assert "18446744073709551615 bytes for shape (2,) of <f4 (8 expected)" in _refused(CRAFTED["nbytes 2**64-1"])
    assert "truncated" in _refused(CRAFTED["bytes length 2**32-1"])
    assert "cannot fit" in _refused(CRAFTED["record count 2**32-1"])
    assert "not UTF-8" in _refused(CRAFTED["key not utf-8"])
    assert "after the last record" in _refused(CRAFTED["trailing"])
    assert "magic" in _refused(CRAFTED["protobuf"])
    assert "appears twice" in _refused(CRAFTED["key twice"])
