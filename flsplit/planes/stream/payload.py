"""The payload of the stream plane's REQUEST and REPLY frames: a ``RecordDict`` with its
tensors carried as raw bytes beside their dtype and shape (no protobuf pass, no ``.npy`` parse).

Flower's serde (``recorddict_to_proto`` / ``recorddict_from_proto``) copies every array into a
protobuf message and out again. This format writes each array's raw buffer once, after a few
bytes of dtype and shape, and the receiver rebuilds the ``Array`` from a cached ``.npy`` header
and that buffer. The decoded ``RecordDict`` equals the one Flower's serde round trip gives:
same record and key order, same ``Array`` fields (``dtype``, ``shape``, ``stype``, ``data``
byte for byte, as long as both ends run the same numpy: the ``.npy`` header is rebuilt by
the receiver's numpy), same config and metric values with the same Python types.

Byte layout
-----------
Integers are little-endian; ``u8/u32/u64`` unsigned, ``i32/i64`` two's complement, ``f64``
IEEE 754 binary64. ``str`` is ``u32 n`` then ``n`` bytes of UTF-8 (keys, dtype, stype). Every
length and count is checked against the bytes left before anything is allocated, and
nothing may follow the last record::

    payload := b"FLR1"  u32 n_records  record * n_records
    record  := str name  u8 kind  u32 n_items  item * n_items
               kind 1: ArrayRecord  (items are arrays)
               kind 2: MetricRecord (items are values; tags 2, 3, 4 and their lists only)
               kind 3: ConfigRecord (items are values; every tag)
    array   := str key  u8 form  body
      form 1, a raw tensor: an Array of stype "numpy.ndarray" whose data is a plain
              version-1.0 .npy header followed by the buffer (what ``Array(ndarray)`` makes)
              str descr       the .npy dtype descr, one of DESCRS: "|b1" "|i1" "|u1" and
                              "<" or ">" with i2 i4 i8 u2 u4 u8 f2 f4 f8 c8 c16
              u8 fortran      0: C order, 1: Fortran order
              u8 ndim         at most 64
              u32 dim * ndim
              u64 nbytes      = product(dims) * itemsize(descr)
              nbytes bytes    the raw buffer
              decoded as Array(dtype=str(numpy.dtype(descr)), shape=dims, stype="numpy.ndarray",
              data=header + buffer), header being what numpy.lib.format.write_array_header_1_0
              writes for {"descr": descr, "fortran_order": bool(fortran), "shape": dims}; the
              encoder takes form 1 only when the Array's data starts with exactly that header
      form 2, any other Array, carried verbatim:
              str dtype  u8 ndim  i32 dim * ndim  str stype  u64 nbytes  nbytes bytes of data
    value   := str key  u8 tag  body
      tag 1 bool   u8 (0 or 1)         tag 4 float  f64
      tag 2 int    i64                 tag 5 str    str
      tag 3 int    u64 (> 2**63 - 1)   tag 6 bytes  u32 n, n bytes
      tag 0x80 | t: a list of type t: u32 count, then count bodies of tag t
                    (bool lists one byte per element; str and bytes lists u32 n + n bytes each)

Names, keys and values are unique and in the sender's order. The receiver copies each buffer
once, into the ``bytes`` an ``Array.data`` must be (no view into the frame is kept).

A value is typed the way Flower's serde types it (``flwr.common.serde_utils``): the first of
the record's allowed types (config: bool, int, float, str, bytes; metric: float, int) the
value, or every element of the list, is an instance of; so ``[1, True]`` in a config record
travels as ints and arrives as ``[1, 1]``, as it does through protobuf. ``encode_content``
refuses what Flower's serde refuses (an unknown record or value type: ``TypeError``; an int
outside int64/uint64, a dimension outside int32: ``ValueError``); ``decode_content`` raises
``PayloadError`` naming what was wrong for any payload that is not exactly this layout, and
nothing else (``flsplit.planes.stream.frames`` turns it into its ``FrameError``).
"""

from __future__ import annotations

import functools
import io
import math
import operator
import struct
from typing import Any, Optional, Union, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from numpy.lib import format as npy_format

__all__ = ["MAGIC", "DESCRS", "PayloadError", "encode_content", "decode_content"]

MAGIC = b"FLR1"
NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
MAX_NDIM = 64  # numpy's own limit (NPY_MAXDIMS in numpy 2)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

KIND_ARRAY, KIND_METRIC, KIND_CONFIG = 1, 2, 3
FORM_TENSOR, FORM_VERBATIM = 1, 2
T_BOOL, T_INT, T_UINT, T_FLOAT, T_STR, T_BYTES = 1, 2, 3, 4, 5, 6
LIST = 0x80

# The dtypes a raw tensor may have: fixed-size numbers and bool, either byte order. Looked up,
# never parsed: numpy.dtype() of a peer's string would accept far more (subarrays, records).
DESCRS: dict[str, np.dtype] = {
    d: np.dtype(d)
    for d in ["|b1", "|i1", "|u1"]
    + [o + k for o in "<>" for k in ("i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")]
}
# Array.dtype (``str(ndarray.dtype)``, e.g. "float32" or ">f4") -> descr, for the encoder
_NAME_TO_DESCR = {str(dt): d for d, dt in DESCRS.items()}
_DESCR_NAME = {d: str(dt) for d, dt in DESCRS.items()}
_DESCR_ITEMSIZE = {d: dt.itemsize for d, dt in DESCRS.items()}

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_KIND_COUNT = struct.Struct("<BI")  # record: kind, n_items
_FORM = _U8
_ORDER_NDIM = struct.Struct("<BB")
_DIMS_U32 = [f"<{n}I" for n in range(MAX_NDIM + 1)]
# Flower's order of trial (flwr.common.serde: bool first, since bool is an int)
_CONFIG_TYPES: tuple[type, ...] = (bool, int, float, str, bytes)
_METRIC_TYPES: tuple[type, ...] = (float, int)
_SCALAR_TAGS = frozenset((T_BOOL, T_INT, T_UINT, T_FLOAT, T_STR, T_BYTES))
_METRIC_TAGS = frozenset((T_INT, T_UINT, T_FLOAT))
_FIXED_SIZE = {T_BOOL: 1, T_INT: 8, T_UINT: 8, T_FLOAT: 8}
_LIST_FORMAT = {T_INT: "q", T_UINT: "Q", T_FLOAT: "d"}

Buffer = Union[bytes, bytearray, memoryview]


class PayloadError(ValueError):
    """A payload is not a serialized ``RecordDict`` of this format; the text names what is wrong."""


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, fortran: bool, shape: tuple[int, ...]) -> Optional[bytes]:
    """The version-1.0 ``.npy`` header ``numpy.save`` writes for this array, or ``None`` if it
    needs a later version. Cached: a split step sends the same few shapes over and over."""
    out = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(out, {"descr": descr, "fortran_order": fortran, "shape": shape})
    except ValueError:  # header too long for version 1.0
        return None
    return out.getvalue()


# ------------------------------------------------------------------------------------ encode
def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U32.pack(len(raw)) + raw


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"{where}: key {key!r} is not a str")
    return key


@functools.lru_cache(maxsize=1024)
def _tensor_layouts(descr: str, shape: tuple[int, ...]) -> tuple[tuple[bytes, bytes, int], ...]:
    """``(.npy header, form-1 head, buffer bytes)`` for C order, then Fortran order (a 0-d or
    1-d array has only C order; a header that needs .npy 2.0 is left out). Cached per dtype
    and shape: a split step sends the same few over and over."""
    nbytes = math.prod(shape) * _DESCR_ITEMSIZE[descr]
    out = []
    for fortran in (False, True) if len(shape) > 1 else (False,):
        header = _npy_header(descr, fortran, shape)
        if header is not None:
            dims = struct.pack(f"<{len(shape)}I", *shape)
            head = b"".join((_str(descr), bytes((int(fortran), len(shape))), dims, _U64.pack(nbytes)))
            out.append((header, head, nbytes))
    return tuple(out)


def _tensor_parts(array: Array) -> Optional[tuple[bytes, memoryview]]:
    """``(form-1 head, raw buffer view)`` if ``array`` is a plain ``.npy`` array of a known
    dtype whose header is the one we would rebuild; ``None`` sends it verbatim."""
    descr = _NAME_TO_DESCR.get(array.dtype) if isinstance(array.dtype, str) else None
    shape = array.shape
    if (
        descr is None
        or array.stype != NUMPY_STYPE
        or type(shape) is not tuple  # noqa: E721 (a subclass could hash like another shape)
        or len(shape) > MAX_NDIM
        # exact ints only: True or 2.0 would hit the cache entry of 1 or 2
        or not all(type(s) is int and 0 <= s <= INT32_MAX for s in shape)  # noqa: E721
    ):
        return None
    data = array.data
    for header, head, nbytes in _tensor_layouts(descr, shape):
        # exactly this header and the buffer, else the receiver's rebuilt data would differ
        if len(data) - len(header) == nbytes and data.startswith(header):
            return head, memoryview(data)[len(header) :]
    return None


def _encode_array(parts: list[Any], key: str, array: Any, where: str) -> None:
    if not isinstance(array, Array):
        raise TypeError(f"{where}: value of {key!r} is a {type(array).__name__}, not a flwr Array")
    if not isinstance(array.data, bytes):
        raise TypeError(f"{where}: Array {key!r} holds data of type {type(array.data).__name__}, not bytes")
    parts.append(_str(key))
    tensor = _tensor_parts(array)
    if tensor is not None:
        parts += [_FORM.pack(FORM_TENSOR), tensor[0], tensor[1]]
        return
    # Anything else (another stype, a dtype outside DESCRS, a header we would not rebuild) goes
    # as it is, like Flower's protobuf Array: dtype, int32 dims, stype, data.
    try:
        shape = tuple(operator.index(s) for s in array.shape)
    except TypeError:
        raise TypeError(f"{where}: Array {key!r} has a shape {array.shape!r:.60} that is not a sequence of ints") from None
    if len(shape) > 255:
        raise ValueError(f"{where}: Array {key!r} has {len(shape)} dimensions (at most 255 travel)")
    if not all(-(2**31) <= s <= INT32_MAX for s in shape):
        raise ValueError(f"{where}: Array {key!r} has a shape {shape} outside int32 (as in Flower's protobuf)")
    if not isinstance(array.dtype, str) or not isinstance(array.stype, str):
        raise TypeError(f"{where}: Array {key!r} has a dtype or stype that is not a str")
    parts += [
        _FORM.pack(FORM_VERBATIM),
        _str(array.dtype),
        bytes((len(shape),)),
        struct.pack(f"<{len(shape)}i", *shape),
        _str(array.stype),
        _U64.pack(len(array.data)),
        array.data,
    ]


def _encode_scalar(tag: int, value: Any) -> bytes:
    if tag == T_BOOL:
        return b"\x01" if value else b"\x00"
    if tag == T_INT:
        return _I64.pack(value)
    if tag == T_UINT:
        return _U64.pack(value)
    if tag == T_FLOAT:
        return _F64.pack(value)
    raw = value.encode("utf-8") if tag == T_STR else value
    return _U32.pack(len(raw)) + raw


_TYPE_TAG = {bool: T_BOOL, int: T_INT, float: T_FLOAT, str: T_STR, bytes: T_BYTES}


def _encode_value(key: str, value: Any, allowed: tuple[type, ...], where: str) -> bytes:
    """A value typed as Flower's serde types it (first allowed type that fits)."""
    for typ in allowed:
        tag = _TYPE_TAG[typ]
        try:
            if isinstance(value, typ):
                if tag == T_INT and cast(int, value) > INT64_MAX:
                    tag = T_UINT
                return bytes((tag,)) + _encode_scalar(tag, value)
            if isinstance(value, list) and all(isinstance(v, typ) for v in value):
                if tag == T_INT and any(v > INT64_MAX for v in value):
                    tag = T_UINT
                head = bytes((LIST | tag,)) + _U32.pack(len(value))
                if tag in _LIST_FORMAT:
                    return head + struct.pack(f"<{len(value)}{_LIST_FORMAT[tag]}", *value)
                if tag == T_BOOL:
                    return head + bytes(1 if v else 0 for v in value)
                return head + b"".join(_encode_scalar(tag, v) for v in value)
        except struct.error:
            raise ValueError(f"{where}: {key!r} holds an int outside int64 and uint64 ({value!r:.60})") from None
        except UnicodeEncodeError as err:  # a lone surrogate: not UTF-8, as protobuf would say too
            raise ValueError(f"{where}: {key!r} holds a str that is not UTF-8 encodable ({err.reason})") from None
    names = ", ".join(t.__name__ for t in allowed)
    raise TypeError(f"{where}: {key!r} holds a {type(value).__name__} ({value!r:.60}); allowed: {names} or a list of one")


def encode_content(content: RecordDict) -> bytes:
    """A ``RecordDict`` as bytes of this module's layout (see the module docstring).

    Parameters
    ----------
    content : RecordDict
        ArrayRecords, MetricRecords and ConfigRecords, as Flower builds them.

    Returns
    -------
    bytes
        The payload; arrays of plain ``.npy`` data travel as raw buffers.

    Raises
    ------
    TypeError
        A record, key or value of a type Flower's serde would not carry either.
    ValueError
        An int outside int64/uint64 or an array dimension outside int32 (Flower's protobuf
        refuses them too), or a str that is not encodable as UTF-8.
    """
    if not isinstance(content, RecordDict):
        raise TypeError(f"content is a {type(content).__name__}, not a RecordDict")
    parts: list[Any] = [MAGIC, _U32.pack(len(content))]
    for name, record in content.items():
        where = f"record {_check_key(name, 'RecordDict')!r}"
        parts.append(_str(name))
        if isinstance(record, ArrayRecord):
            parts.append(_KIND_COUNT.pack(KIND_ARRAY, len(record)))
            for key, array in record.items():
                _encode_array(parts, _check_key(key, where), array, where)
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            metric = isinstance(record, MetricRecord)
            parts.append(_KIND_COUNT.pack(KIND_METRIC if metric else KIND_CONFIG, len(record)))
            allowed = _METRIC_TYPES if metric else _CONFIG_TYPES
            for key, value in record.items():
                parts.append(_str(_check_key(key, where)))
                parts.append(_encode_value(key, value, allowed, where))
        else:
            raise TypeError(f"{where} is a {type(record).__name__}, not an ArrayRecord, MetricRecord or ConfigRecord")
    return b"".join(parts)


# ------------------------------------------------------------------------------------ decode
def _array_by_constructor(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _array_by_fields(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """An ``Array`` with its four fields set directly: what the constructor leaves, without its
    argument dispatch and per-field ``__setattr__`` (0.3 against 4-5 us an array, measured)."""
    array = object.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=stype, data=data)
    return array


def _fields_match_constructor() -> bool:
    """Whether ``_array_by_fields`` builds what Flower's constructor builds (this flwr's
    ``Array`` keeps exactly these attributes); checked once at import."""
    try:
        args = ("float32", (2, 3), NUMPY_STYPE, b"\x93NUMPY")
        built, made = _array_by_constructor(*args), _array_by_fields(*args)
        return built == made and built.__dict__ == made.__dict__ and made.object_id == built.object_id
    except Exception:  # pylint: disable=broad-except  # any surprise: the constructor it is
        return False


# A newer flwr whose Array holds more state gets its constructor, not a half-built object
_new_array = _array_by_fields if _fields_match_constructor() else _array_by_constructor


class _Reader:
    """A cursor over the payload; every read checks the bytes left first. ``record`` and
    ``key`` say where it is, formatted into a message only when something is refused (an
    f-string per field would cost more than the parse)."""

    __slots__ = ("mv", "pos", "end", "record", "key")

    def __init__(self, payload: Buffer) -> None:
        mv = memoryview(payload)
        self.mv = mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
        self.pos = 0
        self.end = len(self.mv)
        self.record: Optional[str] = None
        self.key: Optional[str] = None

    def fail(self, what: str) -> PayloadError:
        where = "" if self.record is None else f"record {self.record!r:.60}"
        if self.key is not None:
            where += f"[{self.key!r:.60}]"
        return PayloadError(f"{where}{': ' if where else ''}{what} (at byte {self.pos} of {self.end})")

    def need(self, n: int, what: str) -> int:
        """Claim ``n`` bytes for ``what``; their start offset."""
        pos = self.pos
        if n > self.end - pos:
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.end - pos} left")
        self.pos = pos + n
        return pos

    def u8(self, what: str) -> int:
        pos = self.pos
        if pos >= self.end:
            raise self.fail(f"truncated: {what} needs 1 byte, 0 left")
        self.pos = pos + 1
        return self.mv[pos]

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.mv, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.mv, self.need(8, what))[0]

    def count(self, what: str, min_size: int) -> int:
        """A ``u32`` count of things at least ``min_size`` bytes each: more than the bytes left
        could hold is refused now, before a loop or a list is sized by it."""
        n = self.u32(what)
        if n * min_size > self.end - self.pos:
            raise self.fail(f"{what} of {n} cannot fit in the {self.end - self.pos} bytes left")
        return n

    def text(self, what: str) -> str:
        n = self.u32(what)
        start = self.need(n, what)
        try:
            return str(self.mv[start : start + n], "utf-8")
        except UnicodeDecodeError as err:
            self.pos = start + err.start
            raise self.fail(f"{what} is not UTF-8 ({err.reason})") from None

    def blob(self, what: str) -> memoryview:
        n = self.u32(what)
        start = self.need(n, what)
        return self.mv[start : start + n]


def _decode_array(r: _Reader) -> Array:
    form = r.u8("array form")
    if form == FORM_TENSOR:
        descr = r.text("dtype")
        itemsize = _DESCR_ITEMSIZE.get(descr)
        if itemsize is None:
            raise r.fail(f"unsupported dtype {descr!r:.40} (not one of {len(DESCRS)} plain numeric ones)")
        fortran, ndim = _ORDER_NDIM.unpack_from(r.mv, r.need(2, "order and ndim"))
        if fortran > 1:
            raise r.fail(f"order flag {fortran} (0 or 1)")
        if ndim > MAX_NDIM:
            raise r.fail(f"{ndim} dimensions (at most {MAX_NDIM})")
        shape = struct.unpack_from(_DIMS_U32[ndim], r.mv, r.need(4 * ndim, "shape"))
        if ndim and max(shape) > INT32_MAX:
            raise r.fail(f"shape {shape} has a dimension over int32")
        nbytes = r.u64("byte count")
        expected = math.prod(shape) * itemsize  # Python ints: no overflow
        if nbytes != expected:
            raise r.fail(f"{nbytes} bytes for shape {shape} of {descr} ({expected} expected)")
        start = r.need(nbytes, "data")
        header = _npy_header(descr, fortran == 1, shape)
        if header is None:  # cannot happen for <= 64 int32 dims; refused rather than guessed
            raise r.fail(f"shape {shape} needs a .npy header beyond version 1.0")
        # One copy, header and buffer straight into the bytes Array.data must be
        return _new_array(_DESCR_NAME[descr], shape, NUMPY_STYPE, b"".join((header, r.mv[start : start + nbytes])))
    if form == FORM_VERBATIM:
        dtype = r.text("dtype")
        ndim = r.u8("ndim")
        shape = struct.unpack_from(f"<{ndim}i", r.mv, r.need(4 * ndim, "shape"))
        stype = r.text("stype")
        nbytes = r.u64("byte count")
        start = r.need(nbytes, "data")
        return _new_array(dtype, shape, stype, bytes(r.mv[start : start + nbytes]))
    raise r.fail(f"unknown array form {form}")


def _decode_scalar(r: _Reader, tag: int) -> Any:
    if tag == T_INT:
        return _I64.unpack_from(r.mv, r.need(8, "int"))[0]
    if tag == T_FLOAT:
        return _F64.unpack_from(r.mv, r.need(8, "float"))[0]
    if tag == T_BOOL:
        b = r.u8("bool")
        if b > 1:
            raise r.fail(f"bool byte {b} (0 or 1)")
        return b == 1
    if tag == T_UINT:
        return _U64.unpack_from(r.mv, r.need(8, "uint"))[0]
    if tag == T_STR:
        return r.text("str")
    return bytes(r.blob("bytes"))  # T_BYTES


def _decode_value(r: _Reader, allowed: frozenset[int]) -> Any:
    tag = r.u8("value tag")
    base = tag & ~LIST
    if base not in allowed:
        record = "a MetricRecord" if allowed is _METRIC_TAGS else "a ConfigRecord"
        raise r.fail(f"value tag {tag} is not a value type of {record} (tags {sorted(allowed)}, +{LIST} for lists)")
    if not tag & LIST:
        return _decode_scalar(r, tag)
    n = r.count("list length", _FIXED_SIZE.get(base, 4))  # str/bytes elements: at least their u32 length
    if base in _LIST_FORMAT:
        return list(struct.unpack_from(f"<{n}{_LIST_FORMAT[base]}", r.mv, r.need(8 * n, "list")))
    if base == T_BOOL:
        start = r.need(n, "bool list")
        raw = bytes(r.mv[start : start + n])
        if raw.translate(None, b"\x00\x01"):
            raise r.fail("a bool list holds a byte other than 0 or 1")
        return [b == 1 for b in raw]
    return [_decode_scalar(r, base) for _ in range(n)]


def _decode(payload: Buffer) -> RecordDict:
    r = _Reader(payload)
    start = r.need(4, "magic")
    if r.mv[start : start + 4] != MAGIC:
        raise r.fail(f"magic {bytes(r.mv[start:start + 4])!r} is not {MAGIC!r}")
    n_records = r.count("record count", 9)  # a record is at least a key length, kind and count
    out = RecordDict()
    for _ in range(n_records):
        r.record = r.key = None
        name = r.text("record name")
        if name in out:
            raise r.fail(f"record {name!r:.60} appears twice")
        r.record = name
        kind = r.u8("record kind")
        n_items = r.count("item count", 5)  # an item is at least a key length and a tag
        if kind == KIND_ARRAY:
            # Filled item by item: ArrayRecord(dict) would build every Array a second time
            arrays = ArrayRecord()
            for _ in range(n_items):
                r.key = None
                key = r.text("key")
                if key in arrays:
                    raise r.fail(f"key {key!r:.60} appears twice")
                r.key = key
                arrays[key] = _decode_array(r)
            out[name] = arrays
        elif kind in (KIND_METRIC, KIND_CONFIG):
            allowed = _METRIC_TAGS if kind == KIND_METRIC else _SCALAR_TAGS
            values: dict[str, Any] = {}
            for _ in range(n_items):
                r.key = None
                key = r.text("key")
                if key in values:
                    raise r.fail(f"key {key!r:.60} appears twice")
                r.key = key
                values[key] = _decode_value(r, allowed)
            out[name] = MetricRecord(values, keep_input=False) if kind == KIND_METRIC else ConfigRecord(values, keep_input=False)
        else:
            raise r.fail(f"unknown record kind {kind}")
    if r.pos != r.end:
        r.record = r.key = None
        raise r.fail(f"{r.end - r.pos} bytes after the last record")
    return out


def decode_content(payload: Buffer) -> RecordDict:
    """The ``RecordDict`` of a payload written by ``encode_content``.

    Parameters
    ----------
    payload : bytes, bytearray or memoryview
        The frame's payload. Nothing of it is kept: every array's data is copied (once) into
        the ``bytes`` Flower's ``Array.data`` must be, so the caller may reuse the buffer.

    Returns
    -------
    RecordDict
        Equal to what Flower's protobuf serde round trip of the sent ``RecordDict`` gives.

    Raises
    ------
    PayloadError
        For any payload that is not exactly the layout (truncated, trailing bytes, unknown
        kinds, tags, forms or dtypes, lengths or shapes that disagree with the bytes there,
        names that are not UTF-8, repeated keys); the text names what and where.
    """
    try:
        return _decode(payload)
    except PayloadError:
        raise
    except Exception as err:  # pylint: disable=broad-except  # a parser bug must still read as a refused payload
        raise PayloadError(f"internal parser error, {type(err).__name__}: {err}") from None
