"""The split exchange over Flower messages: message types, record names, checks.

One exchange per step (fused): the server's request carries the gradients of the batches
the client sent last time and asks for the smashed data of its next ``K`` batches; the reply
carries that smashed data and the labels. The first request of a round also carries the
client part's weights; the reply that ends the client's round carries its trained weights.

Records in a request (server -> client)
    ``split.config``  ConfigRecord: round settings (see ``SplitConfig``)
    ``client.part``   ArrayRecord: client-part weights (first request of a round only)
    ``split.grad``    ArrayRecord: ``g.0 .. g.{K-1}``, gradients of the pending batches (only the
                      rows not covered by a broadcast)
    ``split.bcast``   ArrayRecord: ``b.k`` gradient rows shared by every receiver (EPSL,
                      SFL-GA); counted once per step in the traffic, not once per client
    ``split.bcast.config`` ConfigRecord: ``positions.k`` (rows of batch ``k`` the broadcast
                      fills) and ``scale.k`` (factor this receiver applies to it)
    ``split.acts``    ArrayRecord: ``a.0``, the server part's output for the pending batch
                      (U-shaped splits: the second exchange of a step)
Records in a reply (client -> server)
    ``split.smashed`` ArrayRecord: ``x.i`` smashed data and ``y.i`` labels of batch ``i``
                      (no labels in a U-shaped split)
    ``split.tailgrad`` ArrayRecord + ``split.loss`` MetricRecord (U-shaped splits): ``t.0``, the
                      gradient of the client's mean loss with respect to ``split.acts``'s
                      ``a.0``, and that batch's ``loss-sum.0`` and ``correct.0``
    ``split.status``  ConfigRecord: ``done`` (bool), ``position`` of the first batch sent,
                      ``remaining`` batches of the round from it (progress reporting)
    ``client.part``   ArrayRecord + ``split.metrics`` MetricRecord ``num-examples``: at round end
    ``client.device`` ConfigRecord (first reply of a round): ``partition-id`` and the device
                      profile keys found in the node config (``DEVICE_KEYS``: ``cpu-hz``, ...)
    ``split.stream.fallback`` ConfigRecord ``reason`` (``FALLBACK``): the request offered a
                      session on another plane, allowed to fail (``flsplit.planes.endpoint``), and
                      the node answers over messages instead, saying why

A U-shaped split (``tail_cut > 0``) keeps the labels, the last blocks and the loss on the
client, so a step takes two exchanges: (1) the request carries the head gradient of the last
step (``split.grad``) and the reply the next batch's smashed data, without labels; (2) the
request carries the server part's output (``split.acts``), the client runs its tail and the
loss, updates the tail and replies with the gradient at the tail's input (``split.tailgrad``)
and the batch's loss; the server back-propagates it through its part, and the head gradient
travels in the next (1). No label or token id leaves the client.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord

from flsplit.sim.checks import int_arg, real_arg
from flsplit.wire.codecs import Codec, CodecError, all_finite, get_codec
from flsplit.wire.npy import array_of

__all__ = [
    "TRAIN_STEP",
    "UPLOAD",
    "EVALUATE",
    "NOOP",
    "ProtocolError",
    "SplitConfig",
    "TrainingSettings",
    "SmashedBatch",
    "encode_batches",
    "decode_smashed",
    "encode_grads",
    "decode_grads",
    "encode_tensors",
    "decode_tensors",
    "check_tensor",
    "assemble_grads",
]

TRAIN_STEP = "train.split_step"
UPLOAD = "train.split_upload"
EVALUATE = "evaluate.split_eval"
NOOP = "query.noop"
DESCRIBE = "query.split_device"  # who a node is: partition, device profile, samples

CONFIG = "split.config"
CLIENT_PART = "client.part"
GRAD = "split.grad"
SMASHED = "split.smashed"
STATUS = "split.status"
METRICS = "split.metrics"
DEVICE = "client.device"
BCAST = "split.bcast"
BCAST_CONFIG = "split.bcast.config"
# A reply over messages to a request whose session offer could not be taken up (any plane's;
# the name is the first plane's, the stream's).
FALLBACK = "split.stream.fallback"
ACTS = "split.acts"  # U-shaped splits: the server part's output, to the client's tail
TAIL_GRAD = "split.tailgrad"  # U-shaped splits: the gradient at the tail's input, to the server
LOSS = "split.loss"  # U-shaped splits: the tail's loss sum and samples predicted right

# The device-profile keys a node reports in ``client.device`` (kebab case -> the field of
# ``flsplit.sim.scenario.DeviceProfile``; tests/test_endpoint.py keeps the two equal).
DEVICE_KEYS = {
    "cpu-hz": "cpu_hz",
    "flops-per-cycle": "flops_per_cycle",
    "kappa": "kappa",
    "tx-power-w": "tx_power_w",
    "distance-m": "distance_m",
}


OPTIMIZERS = ("sgd", "adamw")  # built by flsplit.runtime.optim


class ProtocolError(ValueError):
    """A message of the split exchange is malformed; the text names what is wrong."""


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """A round's training settings: what a strategy is given (``SplitSettings``) and every
    client gets each round (``SplitConfig``), declared and checked here once.

    Attributes
    ----------
    batch_size : int
        Samples per batch.
    local_epochs : int
        Epochs over the local data in this round (ignored when ``max_steps > 0``).
    max_steps : int
        If positive, the round ends after this many batches instead of after the epochs.
    steps_per_exchange : int
        ``K``: batches of smashed data per exchange, all computed with the weights current
        when the request arrives. The server trains on them in order and returns ``K``
        gradients; the client applies them in order, recomputing each batch's forward pass
        with its *current* weights, so gradient ``j`` was computed for activations that are
        ``j`` client steps old (staleness up to ``K - 1``). ``K = 1`` is exact SL. Stale
        gradients and heavy momentum do not mix well: with ``K > 1`` prefer plain SGD.
    learning_rate, momentum, weight_decay : float
        SGD settings of the client part.
    carry_momentum : bool
        Keep SGD momentum across rounds: the client starts a round with the momentum
        buffers it ended its previous one with (same cut; else fresh), the server's shared
        part likewise. Off: every round starts with fresh optimizers (FedAvg's usual way).
    seed : int
        Run seed; batch order and dropout masks derive from it.
    shuffle : bool
        Shuffle the local data each epoch (seeded) or use it in stored order.
    codec_up, codec_down : str
        Wire codecs of smashed data (client -> server) and gradients (server -> client),
        see ``flsplit.wire.codecs``.
    optimizer : str
        ``sgd`` (with ``momentum``) or ``adamw`` (torch's AdamW with its default betas and eps;
        ``momentum`` must be 0), on both sides of the cut (``flsplit.runtime.optim``).
    tail_cut : int
        ``0``: the server runs every block from the client's cut on and computes the loss. A
        positive ``tail_cut`` makes the split U-shaped: blocks ``[tail_cut, L)`` and the loss
        stay on the client with the labels, the server runs ``[cut, tail_cut)`` only, and a
        step takes two exchanges (see the module docstring). Needs ``steps_per_exchange`` 1.
    """

    batch_size: int = 32
    local_epochs: int = 1
    max_steps: int = 0
    steps_per_exchange: int = 1
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    carry_momentum: bool = False
    seed: int = 0
    shuffle: bool = True
    codec_up: str = "native"
    codec_down: str = "native"
    optimizer: str = "sgd"
    tail_cut: int = 0

    def __post_init__(self) -> None:
        """Every field checked here, once, with the run-config key in the message."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer != "sgd" and self.momentum != 0.0:
            raise ValueError(f"momentum applies to optimizer 'sgd' only ({self.optimizer} keeps its own moments), "
                             f"got momentum {self.momentum}")
        for name, low in (("batch_size", 1), ("steps_per_exchange", 1), ("local_epochs", 0), ("max_steps", 0),
                          ("seed", 0), ("tail_cut", 0)):
            int_arg(name.replace("_", "-"), getattr(self, name), minimum=low, maximum=2**32 - 1 if name == "seed" else None)
        if self.tail_cut and self.steps_per_exchange != 1:
            raise ValueError(f"a U-shaped split (tail-cut {self.tail_cut}) takes one step per exchange: each step's "
                             f"server forward waits for the client's tail, got steps-per-exchange {self.steps_per_exchange}")
        if self.local_epochs < 1 and self.max_steps < 1:
            raise ValueError("local-epochs must be >= 1 (or max-steps > 0)")
        real_arg("learning-rate", self.learning_rate, low=0.0, low_open=True)
        real_arg("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        real_arg("weight-decay", self.weight_decay, low=0.0)
        for name in ("shuffle", "carry_momentum"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name.replace('_', '-')} must be true or false, got {getattr(self, name)!r}")
        for name in ("codec_up", "codec_down"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name.replace('_', '-')} must be a codec name, got {getattr(self, name)!r}")
            get_codec(getattr(self, name))

    def training_settings(self) -> dict:
        """The training settings as keywords (of ``TrainingSettings``' fields only)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingSettings)}


@dataclass(frozen=True)
class SplitConfig(TrainingSettings):
    """What the server tells a client about this round's split training: the round, the
    client's cut and the ``TrainingSettings``.

    Attributes
    ----------
    server_round : int
        Round number (1-based).
    cut : int
        Cut layer of this client: it runs blocks ``[0, cut)`` (and ``[tail_cut, L)`` in a
        U-shaped split).
    """

    server_round: int
    cut: int

    def __post_init__(self) -> None:
        for name in ("server_round", "cut"):
            int_arg(name.replace("_", "-"), getattr(self, name), minimum=1)
        super().__post_init__()
        if self.tail_cut and self.tail_cut <= self.cut:
            raise ValueError(f"tail-cut {self.tail_cut} must lie after the cut {self.cut}: the server runs the blocks "
                             "between them")

    def client_holds(self, block: int) -> bool:
        """Whether block ``block`` is the client's: before its cut, or from the tail cut on."""
        return block < self.cut or 0 < self.tail_cut <= block

    def to_record(self) -> ConfigRecord:
        """Serialize into a ``ConfigRecord`` (the round and the cut first, then the settings;
        ``optimizer`` only when it is not the default ``sgd`` and ``tail_cut`` only in a U-shaped
        split, so an SGD round's record is the one it always was)."""
        settings = self.training_settings()
        if settings["optimizer"] == "sgd":
            del settings["optimizer"]
        if not settings["tail_cut"]:
            del settings["tail_cut"]
        return ConfigRecord({"server_round": self.server_round, "cut": self.cut, **settings})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "SplitConfig":
        """Parse a ``ConfigRecord``; a missing or mistyped field raises ``ProtocolError``."""
        values = {}
        for f in fields(cls):
            if f.name in record:
                values[f.name] = record[f.name]
        if "server_round" not in values or "cut" not in values:
            raise ProtocolError(f"'{CONFIG}' must hold 'server_round' and 'cut'")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ProtocolError(f"bad '{CONFIG}': {err}") from err


@dataclass
class SmashedBatch:
    """One batch of smashed data (cut-layer activations) with its labels (``None`` where
    they stay on the client: a U-shaped split)."""

    x: torch.Tensor
    y: Optional[torch.Tensor]

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def encode_batches(batches: list[SmashedBatch], codec: Codec) -> ArrayRecord:
    """Pack smashed batches as ``x.i`` (through ``codec``) and int64 labels ``y.i`` (none for a
    batch whose labels stay on the client: ``y`` is ``None`` in a U-shaped split)."""
    record = ArrayRecord()
    for i, b in enumerate(batches):
        codec.encode_into(record, f"x.{i}", b.x)
        if b.y is not None:
            record[f"y.{i}"] = array_of(b.y)
    return record


def check_tensor(
    name: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    finite: bool = True,
) -> torch.Tensor:
    """Raise ``ProtocolError`` unless ``tensor`` has this shape, dtype and finite values.

    ``-1`` in ``shape`` matches any size.
    """
    if tensor.dtype != dtype:
        raise ProtocolError(f"{name}: wrong dtype {tensor.dtype}, expected {dtype}")
    if len(tensor.shape) != len(shape) or any(s != -1 and s != t for s, t in zip(shape, tensor.shape)):
        raise ProtocolError(f"{name}: wrong shape {tuple(tensor.shape)}, expected {shape}")
    if finite and not all_finite(tensor):
        raise ProtocolError(f"{name}: contains NaN or infinite values")
    return tensor


def _decode(codec: Codec, record: ArrayRecord, key: str, dtype: torch.dtype, where: str) -> torch.Tensor:
    try:
        return codec.decode_from(record, key, dtype)
    except CodecError as err:
        raise ProtocolError(f"{where}: {err}") from err


def _count(record: ArrayRecord, prefix: str) -> int:
    """Number of ``<prefix>.<i>`` payload keys (scales not counted)."""
    return sum(1 for k in record if k.startswith(prefix) and k[len(prefix) :].isdigit())


def decode_smashed(
    record: ArrayRecord,
    sample_shape: tuple[int, ...],
    dtype: torch.dtype,
    num_classes: int,
    codec: Codec,
    label_shape: tuple[int, ...] = (),
    labels: bool = True,
) -> list[SmashedBatch]:
    """Decode and check the smashed batches of a reply.

    Every ``x.i`` must decode with ``codec`` to ``(b, *sample_shape)`` with finite values
    (returned as ``dtype``), and every ``y.i`` be ``(b, *label_shape)`` int64 labels in
    ``[0, num_classes)`` (``label_shape`` is ``()`` for one class per sample, ``(T,)`` for a
    language model's next tokens). Without ``labels`` (a U-shaped split) there are none.
    """
    count = _count(record, "x.")
    if count == 0:
        raise ProtocolError(f"'{SMASHED}': missing key 'x.0' (no smashed data)")
    out = []
    for i in range(count):
        x = _decode(codec, record, f"x.{i}", dtype, SMASHED)
        check_tensor(f"{SMASHED} x.{i}", x, (-1, *sample_shape), dtype)
        if x.shape[0] == 0:
            raise ProtocolError(f"{SMASHED} x.{i}: empty batch")
        if not labels:
            out.append(SmashedBatch(x, None))
            continue
        y = _decode(CODECS_NATIVE, record, f"y.{i}", torch.int64, SMASHED)
        check_tensor(f"{SMASHED} y.{i}", y, (x.shape[0], *label_shape), torch.int64)
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ProtocolError(f"{SMASHED} y.{i}: labels outside [0, {num_classes})")
        out.append(SmashedBatch(x, y))
    return out


def encode_tensors(tensors: list[torch.Tensor], prefix: str, codec: Codec) -> ArrayRecord:
    """Pack tensors as ``<prefix>.0 .. <prefix>.{n-1}`` through ``codec``."""
    record = ArrayRecord()
    for i, t in enumerate(tensors):
        codec.encode_into(record, f"{prefix}.{i}", t)
    return record


def decode_tensors(record: ArrayRecord, prefix: str, codec: Codec, dtype: torch.dtype, where: str) -> list[torch.Tensor]:
    """Unpack ``<prefix>.0 .. <prefix>.{n-1}`` as ``dtype`` (shapes are the caller's to check)."""
    return [_decode(codec, record, f"{prefix}.{i}", dtype, where) for i in range(_count(record, f"{prefix}."))]


def encode_grads(grads: list[torch.Tensor], codec: Codec) -> ArrayRecord:
    """Pack cut-layer gradients as ``g.i`` through ``codec``."""
    return encode_tensors(grads, "g", codec)


def decode_grads(record: ArrayRecord, codec: Codec, dtype: torch.dtype) -> list[torch.Tensor]:
    """Unpack ``g.0 .. g.{n-1}`` as ``dtype`` (shapes are checked against the recomputed forward)."""
    return decode_tensors(record, "g", codec, dtype, GRAD)


def assemble_grads(
    grad: ArrayRecord | None,
    bcast: ArrayRecord | None,
    bcast_config: ConfigRecord | None,
    codec: Codec,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Each pending batch's full cut-layer gradient from its unicast rows and the broadcast.

    ``g.k`` holds batch ``k``'s own rows. If the broadcast has ``b.k``, its first
    ``len(positions.k)`` rows, times ``scale.k``, go to the sample positions ``positions.k``
    and the ``g.k`` rows, in order, fill the others; otherwise ``g.k`` is the whole gradient.
    """
    unicast = decode_grads(grad, codec, dtype) if grad is not None else []
    if bcast is None:
        return unicast
    if bcast_config is None:
        raise ProtocolError(f"'{BCAST}' without '{BCAST_CONFIG}'")
    out = []
    for k, own in enumerate(unicast):
        if f"b.{k}" not in bcast:
            out.append(own)
            continue
        rows = _decode(codec, bcast, f"b.{k}", dtype, BCAST)
        positions, scale = bcast_config.get(f"positions.{k}"), bcast_config.get(f"scale.{k}")
        if positions is None or scale is None:
            raise ProtocolError(f"'{BCAST_CONFIG}': missing positions.{k} or scale.{k}")
        size = len(positions) + own.shape[0]
        if (
            rows.shape[0] < len(positions)
            or rows.shape[1:] != own.shape[1:]
            or len(set(positions)) != len(positions)
            or not all(0 <= i < size for i in positions)
        ):
            raise ProtocolError(
                f"{BCAST} b.{k}: positions {list(positions)} do not fit {rows.shape[0]} broadcast "
                f"rows and {own.shape[0]} own rows"
            )
        full = torch.empty((size, *own.shape[1:]), dtype=dtype)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[list(positions)] = True
        full[~mask] = own
        full[list(positions)] = rows[: len(positions)] * float(scale)
        out.append(full)
    return out


CODECS_NATIVE = get_codec("native")
