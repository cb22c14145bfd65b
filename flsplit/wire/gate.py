"""The reply gate: every record a client sends is checked before anything trains on it.

Flower's strategies validate the replies of a round before they aggregate them
(``flwr.serverapp.strategy.strategy_utils.validate_message_reply_consistency``); split
learning trains on a reply at once, so ``ReplyGate`` checks each reply as it arrives, for
each kind of reply a client may send:

``step``
    a train reply with smashed data: records ``split.smashed`` + ``split.status`` (+
    ``client.device``); at most ``K`` batches of at most ``batch-size`` rows each.
``final``
    the train reply that ends a node's round: ``client.part`` holding exactly the keys of
    the blocks before the node's cut, each with the global model's shape and dtype and
    finite values, and ``split.metrics`` whose ``num-examples`` is exactly the number of
    samples the server trained on for that node this round.
``tail``
    a U-shaped split's second reply of a step: ``split.tailgrad`` (one gradient per
    activation the server sent, of its shape and dtype, finite) and ``split.loss`` (each
    batch's loss sum, finite and >= 0, and samples predicted right, between 0 and its rows).
``upload``
    async SL's one-way window (state B): smashed data and its ``num-examples``.
``evaluation``
    the smashed evaluation data and its ``num-examples``.

Every check runs on the record as received, before it is decoded: the record names, the
exact array keys, and a byte cap derived from the round's settings (``K``, batch size,
codec, the model's shapes) come first; then decoding, dtype, shape, finiteness, counts and
value ranges. A reply that fails raises ``ProtocolError`` naming the record, the key and
what was wrong; the strategy then lets that node sit out the rest of the round (its batches
up to then were trained on, its client part is not averaged), so the global model is the
one of a round where the node dropped at that point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.wire.codecs import Codec
from flsplit.wire.npy import tensor_of
from flsplit.wire.protocol import DEVICE_KEYS, FALLBACK

__all__ = ["ReplyGate", "check_state", "check_records", "record_of"]

# Room for a .npy header per array (it is about 128 bytes; shapes with many dimensions
# make it longer) and for a codec's scale.
_ARRAY_SLACK = 1024


def check_records(content: Optional[RecordDict], arrays: set[str], metrics: set[str],
                  configs: set[str], required: set[str], what: str) -> RecordDict:
    """Raise ``ProtocolError`` unless ``content`` holds only the named records, each of its
    kind, and every name in ``required``.

    One pass over the records (``RecordDict.array_records`` and its siblings build a new
    dictionary on every access); the first record refused is the one the kinds' order
    (ArrayRecords, then MetricRecords, then ConfigRecords) finds first."""
    if content is None:
        raise p.ProtocolError(f"{what}: no content")
    kinds = (("ArrayRecord", ArrayRecord, arrays, []), ("MetricRecord", MetricRecord, metrics, []),
             ("ConfigRecord", ConfigRecord, configs, []))
    for name, record in content.items():
        for _, cls, _, names in kinds:
            if isinstance(record, cls):
                names.append(name)
                break
    for kind, _, allowed, names in kinds:
        for name in names:
            if name not in allowed:
                raise p.ProtocolError(f"{what}: unexpected {kind} '{name}' (allowed: {sorted(allowed) or 'none'})")
    for name in sorted(required - set().union(*(names for *_, names in kinds))):
        raise p.ProtocolError(f"{what}: missing record '{name}'")
    return content


def record_of(content: Optional[RecordDict], name: str, cls: type):
    """The record ``name`` of ``content`` if it is a ``cls`` (``ArrayRecord``, ``MetricRecord``,
    ``ConfigRecord``), else ``None``: ``content.config_records.get(name)`` without building the
    typed view."""
    record = content.get(name) if content is not None else None
    return record if isinstance(record, cls) else None


def _array_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _to_tensor(name: str, array: Array) -> torch.Tensor:
    try:
        return tensor_of(array)  # a new tensor: one copy of the payload
    except Exception as err:  # whatever the bytes are, the reply is refused, not the run
        raise p.ProtocolError(f"{name}: cannot decode: {type(err).__name__}: {err}") from None


def check_state(record: ArrayRecord, expected: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Decode a client part: exactly ``expected``'s keys, each with its shape and dtype, and
    finite floating-point values; the byte cap (the expected sizes) is checked first.

    Raises ``ProtocolError`` naming the first key that is missing, extra or wrong.
    """
    keys, wanted = set(record.keys()), set(expected)
    if extra := sorted(keys - wanted):
        raise p.ProtocolError(f"{what}: unexpected key '{extra[0]}' ({len(extra)} key(s) that are not "
                              f"this part's; allowed: the {len(wanted)} keys of its blocks)")
    if missing := sorted(wanted - keys):
        raise p.ProtocolError(f"{what}: missing key '{missing[0]}' ({len(missing)} missing)")
    cap = sum(t.numel() * t.element_size() + _ARRAY_SLACK for t in expected.values())
    if (size := _array_bytes(record)) > cap:
        raise p.ProtocolError(f"{what}: {size} bytes, more than the {cap} this part can take")
    out = {}
    for key, ref in expected.items():
        out[key] = p.check_tensor(f"{what} '{key}'", _to_tensor(f"{what} '{key}'", record[key]), tuple(ref.shape),
                                  ref.dtype, finite=ref.is_floating_point())
    return out


def _check_int(what: str, value: object, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise p.ProtocolError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _check_status(content: RecordDict, done: bool, what: str, remaining: bool = True) -> None:
    status = content[p.STATUS]  # a ConfigRecord: check_records said so
    keys = {"done", "position"} | (set() if done or not remaining else {"remaining"})
    for key in status:
        if key not in keys:
            raise p.ProtocolError(f"{what}: '{p.STATUS}' has unexpected key '{key}' (allowed: {sorted(keys)})")
    for key in sorted(keys - {"done"}):
        if key not in status:
            raise p.ProtocolError(f"{what}: '{p.STATUS}' is missing '{key}'")
        _check_int(f"{what}: '{p.STATUS}' {key}", status[key])


def _check_device(content: RecordDict, what: str) -> None:
    record = record_of(content, p.DEVICE, ConfigRecord)
    if record is None:
        return
    allowed = {"partition-id", *DEVICE_KEYS}
    for key, value in record.items():
        if key not in allowed:
            raise p.ProtocolError(f"{what}: '{p.DEVICE}' has unexpected key '{key}'")
        if key == "partition-id":
            _check_int(f"{what}: '{p.DEVICE}' partition-id", value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise p.ProtocolError(f"{what}: '{p.DEVICE}' {key} must be a finite number, got {value!r}")


def _check_fallback(content: RecordDict, what: str) -> None:
    record = record_of(content, FALLBACK, ConfigRecord)
    if record is not None and (set(record) - {"reason"} or not isinstance(record.get("reason", ""), str)):
        raise p.ProtocolError(f"{what}: '{FALLBACK}' must hold only a 'reason' string")


def _num_examples(content: RecordDict, what: str) -> int:
    metrics: MetricRecord = content[p.METRICS]  # a MetricRecord: check_records said so
    for key in metrics:
        if key != "num-examples":
            raise p.ProtocolError(f"{what}: '{p.METRICS}' has unexpected key '{key}' (allowed: ['num-examples'])")
    if "num-examples" not in metrics:
        raise p.ProtocolError(f"{what}: '{p.METRICS}' is missing 'num-examples'")
    return _check_int(f"{what}: num-examples", metrics["num-examples"])


class ReplyGate:
    """Checks the replies of a strategy's clients against its model and round settings.

    Parameters
    ----------
    model_state : mapping of str to Tensor
        The global model's blocks' state (keys, shapes, dtypes of every client part).
    block_of : callable
        ``block_of(key) -> int``: the block a state key belongs to.
    shapes : list of tuple of int
        Output shape of one sample after each block (the smashed shape at cut ``c`` is
        ``shapes[c - 1]``).
    dtype : torch.dtype
        The server part's dtype (smashed data is decoded to it).
    num_classes : int
        Labels must lie in ``[0, num_classes)``.
    label_shape : tuple of int
        Shape of one sample's labels: ``()`` (a class), ``(T,)`` (a language model's next tokens).
    tail_cut : int
        A U-shaped split's tail cut (``0``: none): smashed data then comes without labels, and a
        client part holds the blocks from it on too.
    batch_size, steps_per_exchange : int
        At most ``steps_per_exchange`` batches per step reply, ``batch_size`` rows each.
    codec : Codec
        The uplink codec (how many bytes a smashed value takes on the wire).
    """

    def __init__(self, model_state: Mapping[str, torch.Tensor], block_of, shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, num_classes: int, batch_size: int, steps_per_exchange: int, codec: Codec,
                 label_shape: tuple[int, ...] = (), tail_cut: int = 0) -> None:
        # shapes and dtypes only: meta tensors hold no memory, whatever device the model is on
        self.model_state = {k: torch.empty_like(v, device="meta") for k, v in model_state.items()}
        self.block_of = block_of
        self.shapes, self.dtype, self.num_classes = shapes, dtype, num_classes
        self.batch_size, self.steps_per_exchange, self.codec = batch_size, steps_per_exchange, codec
        self.label_shape = tuple(label_shape)
        self.tail_cut = tail_cut

    # ------------------------------------------------------------------ pieces
    def part_spec(self, cut: int) -> dict[str, torch.Tensor]:
        """The keys (with reference tensors) a client part at ``cut`` holds."""
        return {k: v for k, v in self.model_state.items()
                if self.block_of(k) < cut or 0 < self.tail_cut <= self.block_of(k)}

    def smashed_cap(self, cut: int, batches: int) -> int:
        """Most bytes ``batches`` full batches of smashed data and labels take on the wire."""
        values = math.prod(self.shapes[cut - 1]) * self.codec.bytes_per_element(self.dtype)
        labels = 0 if self.tail_cut else 8 * math.prod(self.label_shape)  # int64 labels, none in a U-shape
        return batches * (self.batch_size * (values + labels) + 3 * _ARRAY_SLACK)

    def smashed(self, record: ArrayRecord, cut: int, max_batches: Optional[int], what: str) -> list[p.SmashedBatch]:
        """Decode and check smashed batches: exact keys ``x.i``/``y.i`` (and ``x.i.scale``
        for scaled codecs), at most ``max_batches`` of at most ``batch_size`` rows, the
        byte cap before decoding, then ``protocol.decode_smashed``'s checks."""
        keys = set(record.keys())
        indices = {int(k[2:]) for k in keys if k[:2] in ("x.", "y.") and k[2:].isdigit()}
        count = max(indices) + 1 if indices else 0
        if max_batches is not None and count > max_batches:
            raise p.ProtocolError(f"{what}: {count} batches, more than the {max_batches} a reply may carry")
        if count > len(indices):  # a gap in the batch numbers
            gap = min(set(range(len(indices) + 1)) - indices)
            raise p.ProtocolError(f"{what}: '{p.SMASHED}' is missing key 'x.{gap}'")
        expected = {f"{c}.{i}" for i in range(count) for c in ("x" if self.tail_cut else "xy")}
        if self.codec.scaled:
            expected |= {f"x.{i}.scale" for i in range(count)}
        if missing := sorted(expected - keys, key=lambda k: (k[0] != "x", k)):
            raise p.ProtocolError(f"{what}: '{p.SMASHED}' is missing key '{missing[0]}'")
        if extra := sorted(keys - expected):
            raise p.ProtocolError(f"{what}: '{p.SMASHED}' has unexpected key '{extra[0]}'")
        for i in range(count):  # rows from the array's header, before its payload is decoded
            shape = record[f"x.{i}"].shape if f"x.{i}" in record else []
            if shape and shape[0] > self.batch_size:
                raise p.ProtocolError(f"{what}: batch {i} has {shape[0]} rows, more than batch-size {self.batch_size}")
        if count and (size := _array_bytes(record)) > (cap := self.smashed_cap(cut, count)):
            raise p.ProtocolError(f"{what}: '{p.SMASHED}' is {size} bytes, more than the {cap} that {count} "
                                  f"batch(es) of {self.batch_size} rows take")
        batches = p.decode_smashed(record, self.shapes[cut - 1], self.dtype, self.num_classes, self.codec, self.label_shape,
                                   labels=not self.tail_cut)
        for i, b in enumerate(batches):  # the payload's own rows (an array's header may say otherwise)
            if b.x.shape[0] > self.batch_size:
                raise p.ProtocolError(f"{what}: batch {i} has {b.x.shape[0]} rows, more than batch-size {self.batch_size}")
        return batches

    # ------------------------------------------------------------------ the kinds of reply
    def is_final(self, content: Optional[RecordDict]) -> bool:
        """Whether a train reply says it ends the node's round (checked by ``final``)."""
        status = record_of(content, p.STATUS, ConfigRecord)
        if status is None:
            raise p.ProtocolError(f"train reply: missing record '{p.STATUS}'")
        done = status.get("done")
        if not isinstance(done, bool):
            raise p.ProtocolError(f"train reply: '{p.STATUS}' done must be true or false, got {done!r}")
        return done

    def step(self, content: Optional[RecordDict], cut: int) -> list[p.SmashedBatch]:
        """The checked smashed batches of a train reply that does not end the round."""
        what = "train reply"
        check_records(content, {p.SMASHED}, set(), {p.STATUS, p.DEVICE, FALLBACK}, {p.SMASHED, p.STATUS}, what)
        _check_status(content, False, what)
        _check_device(content, what)
        _check_fallback(content, what)
        return self.smashed(content[p.SMASHED], cut, self.steps_per_exchange, what)

    def final(self, content: Optional[RecordDict], cut: int, trained_samples: int) -> int:
        """Check the reply that ends a node's round; return its ``num-examples``.

        ``trained_samples`` is what the server trained on for this node this round: an
        honest client reports exactly that, so a node cannot weigh more in the average.
        """
        return self.final_part(content, cut, trained_samples)[0]

    def final_part(self, content: Optional[RecordDict], cut: int,
                   trained_samples: int) -> tuple[int, dict[str, torch.Tensor]]:
        """``final``'s checks; its ``num-examples`` and the client part as checked and decoded
        (what the averaging then uses: the part is not decoded again)."""
        what = "final reply"
        check_records(content, {p.CLIENT_PART}, {p.METRICS}, {p.STATUS, p.DEVICE, FALLBACK},
                      {p.CLIENT_PART, p.METRICS, p.STATUS}, what)
        _check_status(content, True, what)
        _check_device(content, what)
        _check_fallback(content, what)
        n = _num_examples(content, what)
        if n != trained_samples:
            raise p.ProtocolError(f"{what}: num-examples is {n}, but the server trained on {trained_samples} "
                                  "of this node's samples this round")
        return n, check_state(content[p.CLIENT_PART], self.part_spec(cut), f"'{p.CLIENT_PART}'")

    def tail(self, content: Optional[RecordDict], acts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
        """A U-shaped split's tail reply to the activations ``acts`` the server sent: the
        checked gradients (one per activation, its shape, the server's dtype, finite) and each
        batch's loss sum and samples predicted right."""
        what = "tail reply"
        check_records(content, {p.TAIL_GRAD}, {p.LOSS}, {p.STATUS}, {p.TAIL_GRAD, p.LOSS, p.STATUS}, what)
        _check_status(content, False, what, remaining=False)
        if content[p.STATUS].get("done") is not False:
            raise p.ProtocolError(f"{what}: '{p.STATUS}' done must be false: a step's second exchange ends no round")
        record = content[p.TAIL_GRAD]
        codec_up = self.codec
        expected = {f"t.{i}" for i in range(len(acts))} | ({f"t.{i}.scale" for i in range(len(acts))} if codec_up.scaled else set())
        if keys := sorted(set(record.keys()) ^ expected):
            raise p.ProtocolError(f"{what}: '{p.TAIL_GRAD}' key '{keys[0]}' is "
                                  f"{'unexpected' if keys[0] in record else 'missing'} ({len(acts)} gradient(s) expected)")
        cap = sum(a.numel() * codec_up.bytes_per_element(self.dtype) + 2 * _ARRAY_SLACK for a in acts)
        if (size := _array_bytes(record)) > cap:
            raise p.ProtocolError(f"{what}: '{p.TAIL_GRAD}' is {size} bytes, more than the {cap} its gradients take")
        grads = p.decode_tensors(record, "t", codec_up, self.dtype, p.TAIL_GRAD)
        for i, (g, a) in enumerate(zip(grads, acts)):
            p.check_tensor(f"{p.TAIL_GRAD} t.{i}", g, tuple(a.shape), self.dtype)
        loss = content[p.LOSS]
        names = {f"{key}.{i}" for i in range(len(acts)) for key in ("loss-sum", "correct")}
        if keys := sorted(set(loss.keys()) ^ names):
            raise p.ProtocolError(f"{what}: '{p.LOSS}' key '{keys[0]}' is {'unexpected' if keys[0] in loss else 'missing'}")
        stats = []
        for i, a in enumerate(acts):
            total, right = loss[f"loss-sum.{i}"], loss[f"correct.{i}"]
            for key, value, high in (("loss-sum", total, math.inf), ("correct", right, a.shape[0])):
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or not 0 <= value <= high):
                    raise p.ProtocolError(f"{what}: '{p.LOSS}' {key}.{i} must be a finite number in [0, {high}], "
                                          f"got {value!r}")
            stats.append((float(total), float(right)))
        return grads, stats

    def upload(self, content: Optional[RecordDict], cut: int, max_batches: Optional[int]) -> list[p.SmashedBatch]:
        """The checked batches of a one-way upload (async SL, state B)."""
        what = "upload"
        check_records(content, {p.SMASHED}, {p.METRICS}, set(), {p.SMASHED, p.METRICS}, what)
        batches = self.smashed(content[p.SMASHED], cut, max_batches, what)
        return self._counted(content, batches, what)

    def evaluation(self, content: Optional[RecordDict], cut: int) -> list[p.SmashedBatch]:
        """The checked batches of an evaluation reply (none when the node has no evaluation data)."""
        what = "evaluation reply"
        check_records(content, {p.SMASHED}, {p.METRICS}, set(), {p.SMASHED, p.METRICS}, what)
        record = content[p.SMASHED]
        batches = self.smashed(record, cut, None, what) if len(record) else []
        return self._counted(content, batches, what)

    @staticmethod
    def _counted(content: RecordDict, batches: list[p.SmashedBatch], what: str) -> list[p.SmashedBatch]:
        n, rows = _num_examples(content, what), sum(int(b.y.shape[0]) for b in batches)
        if n != rows:
            raise p.ProtocolError(f"{what}: num-examples is {n}, but the batches hold {rows} samples")
        return batches
