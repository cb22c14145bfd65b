"""The round as a value: the work one round of split learning does, per client and on the server.

A ``RoundWorkload`` is what ``flsplit.sim.pricing.price`` turns into latency and energy. It is
produced two ways that share every rule:

* **predicted** (``flsplit.sim.traffic.predict_workload``): from a scheme's traffic model,
  the cuts and the samples of a plan, before the round (planners, ``flsplit plan``);
* **measured** (``flsplit.sim.traffic.measured_workload``): from a finished round, with the
  bytes the data plane actually serialized and the FLOPs the server actually executed (the
  training runtime).

Priced with the same allocation, the two agree to rounding when the traffic model is the
wire's own (``flsplit.wire.wire_bytes.SerializedWire``); with the default ``ElementWire``
(``samples x smashed elements x bytes per element``, no headers, labels or weights) the
prediction is the planners' usual approximation.

Server FLOPs per client (``ClientWork.server_flops``) are the nominal
``samples x (forward + backward)`` at the client's cut, scaled so that they sum to the
FLOPs the server executed on the clients' data (EPSL's aggregation executes fewer). They
are used only by the per-client server timing (``ServerTiming.PER_CLIENT``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.sim.checks import column_arg, int_arg, real_arg

if TYPE_CHECKING:  # only read: the simulator never imports torch
    from flsplit.model.profile import CutProfile

__all__ = ["Timing", "ClientWork", "RoundWorkload", "client_flops", "server_flops", "smashed_bytes"]


class Timing(str, Enum):
    """How the clients' chains combine into the round latency (the schedule's timing rule)."""

    PARALLEL = "parallel"  # lockstep and per-node schedules: the slowest chain sets the pace
    SEQUENTIAL = "sequential"  # the relay (vanilla SL): clients take turns, chains add up


@dataclass(frozen=True)
class ClientWork:
    """One client's work in a round.

    Attributes
    ----------
    client_id : int
        Scenario client id (partition id): selects the device profile and keys the fading.
    cut : int
        The client's cut layer this round.
    flops : float
        FLOPs the device executes (forward + backward; forward only when frozen).
    uplink_bytes, downlink_bytes : float
        Bytes the device sends, and receives by unicast (a broadcast is counted once, in
        ``RoundWorkload.broadcast_bytes``).
    server_flops : float
        Server FLOPs attributed to this client's data (see the module docstring).
    receives_broadcast : bool
        Whether the client hears the round's broadcast.
    samples : int
        Samples the client trained on (or uploaded).
    """

    client_id: int
    cut: int
    flops: float
    uplink_bytes: float
    downlink_bytes: float
    server_flops: float = 0.0
    receives_broadcast: bool = True
    samples: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_id", int_arg("client_id", self.client_id, minimum=0))
        object.__setattr__(self, "cut", int_arg("cut", self.cut, minimum=1))
        object.__setattr__(self, "samples", int_arg("samples", self.samples, minimum=0))
        for name in ("flops", "uplink_bytes", "downlink_bytes", "server_flops"):
            object.__setattr__(self, name, real_arg(f"client {self.client_id}: {name}", getattr(self, name), nonnegative=True))


@dataclass(frozen=True, eq=False)
class RoundWorkload:
    """The work of one round: per client (columns), the broadcast, the server, the timing rule.

    Per-client values are numpy columns in one client order, checked once at construction
    (the pricing function then calls unchecked kernels). ``from_clients`` builds one from
    ``ClientWork`` rows and ``clients`` gives the rows back.

    Attributes
    ----------
    client_ids, cuts, samples : array of int
        Scenario client id (distinct), cut layer and samples of each client that did work.
    flops, uplink_bytes, downlink_bytes : array of float
        Device FLOPs executed, bytes sent, bytes received by unicast.
    client_server_flops : array of float
        Server FLOPs attributed to each client's data (see the module docstring).
    receives_broadcast : array of bool
        Whether each client hears the round's broadcast.
    timing : Timing
        How the clients' chains combine (``parallel`` or ``sequential``).
    server_flops : float
        FLOPs the server executes in the round (all of them: also work on data no client
        sent this round, e.g. async SL's caches).
    broadcast_bytes : float
        Payload broadcast once to the receivers over the whole band (summed over the round).
    scheme : str
        The scheme whose round this is (a label).
    source : str
        ``"predicted"`` or ``"measured"``.
    """

    client_ids: np.ndarray
    cuts: np.ndarray
    flops: np.ndarray
    uplink_bytes: np.ndarray
    downlink_bytes: np.ndarray
    client_server_flops: Optional[np.ndarray] = None
    receives_broadcast: Optional[np.ndarray] = None
    samples: Optional[np.ndarray] = None
    timing: Timing = Timing.PARALLEL
    server_flops: float = 0.0
    broadcast_bytes: float = 0.0
    scheme: str = ""
    source: str = "predicted"

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        set_ = object.__setattr__
        set_(self, "client_ids", column_arg("client_ids", self.client_ids, n, integer=True))
        if len(np.unique(self.client_ids)) != n:
            raise ValueError(f"client ids must be distinct, got {self.client_ids.tolist()}")
        set_(self, "cuts", column_arg("cuts", self.cuts, n, integer=True, minimum=1))
        for name in ("flops", "uplink_bytes", "downlink_bytes"):
            set_(self, name, column_arg(name, getattr(self, name), n))
        set_(self, "client_server_flops", column_arg("client_server_flops", np.zeros(n) if self.client_server_flops is None
                                                  else self.client_server_flops, n))
        set_(self, "samples", column_arg("samples", np.zeros(n) if self.samples is None else self.samples, n, integer=True))
        receives = np.ones(n, dtype=bool) if self.receives_broadcast is None else np.array(self.receives_broadcast, dtype=bool)
        if receives.shape != (n,):
            raise ValueError(f"receives_broadcast has {receives.size} entries for {n} clients")
        receives.setflags(write=False)
        set_(self, "receives_broadcast", receives)
        try:
            set_(self, "timing", Timing(self.timing))
        except ValueError:
            raise ValueError(f"timing must be one of {[t.value for t in Timing]}, got {self.timing!r}") from None
        set_(self, "server_flops", real_arg("server_flops", self.server_flops, nonnegative=True))
        set_(self, "broadcast_bytes", real_arg("broadcast_bytes", self.broadcast_bytes, nonnegative=True))
        if self.broadcast_bytes > 0 and not receives.any():
            raise ValueError("broadcast_bytes > 0 needs at least one receiver")

    @classmethod
    def from_clients(cls, clients: Sequence[ClientWork], **kwargs) -> "RoundWorkload":
        """A workload from per-client rows (each a ``ClientWork``) and the round's scalars."""
        clients = list(clients)
        for i, c in enumerate(clients):
            if not isinstance(c, ClientWork):
                raise ValueError(f"clients[{i}] must be a ClientWork, got {type(c).__name__}")
        return cls(
            client_ids=[c.client_id for c in clients], cuts=[c.cut for c in clients], flops=[c.flops for c in clients],
            uplink_bytes=[c.uplink_bytes for c in clients], downlink_bytes=[c.downlink_bytes for c in clients],
            client_server_flops=[c.server_flops for c in clients],
            receives_broadcast=[c.receives_broadcast for c in clients], samples=[c.samples for c in clients], **kwargs,
        )

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def clients(self) -> tuple[ClientWork, ...]:
        """The per-client rows."""
        return tuple(
            ClientWork(int(c), int(k), float(f), float(u), float(d), float(w), bool(r), int(m))
            for c, k, f, u, d, w, r, m in zip(self.client_ids, self.cuts, self.flops, self.uplink_bytes,
                                              self.downlink_bytes, self.client_server_flops,
                                              self.receives_broadcast, self.samples)
        )

    def as_dict(self) -> dict:
        """Plain dict for JSON (columns as lists)."""
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}
        d["timing"] = self.timing.value
        return d


# --- work from a profile ---------------------------------------------------------------------


def client_flops(cut: "CutProfile", samples: float, *, backward: bool = True) -> float:
    """FLOPs a client executes on ``samples`` samples at a cut.

    ``samples * (client_forward_flops + client_backward_flops)``, or the forward alone with
    ``backward=False`` (a frozen client that only sends activations).

    flsplit's client is stateless between messages, so it recomputes the forward pass of a
    batch when that batch's gradient arrives; the simulator counts the forward once, as a
    device that keeps its autograd graph would. ``cut`` is a ``flsplit.model.profile.CutProfile``
    (``profile_model(model, input_shape).cut(k)``).
    """
    samples = real_arg("samples", samples, nonnegative=True)
    per_sample = cut.client_forward_flops + (cut.client_backward_flops if backward else 0.0)
    return samples * per_sample


def server_flops(cut: "CutProfile", samples: float, *, backward_samples: Optional[float] = None) -> float:
    """FLOPs the server executes forwarding ``samples`` samples and back-propagating some.

    ``samples * server_forward_flops + backward_samples * server_backward_flops``;
    ``backward_samples`` defaults to ``samples`` (EPSL back-propagates fewer:
    ``(1 - phi) * N * b + phi * b`` per step).
    """
    samples = real_arg("samples", samples, nonnegative=True)
    back = samples if backward_samples is None else real_arg("backward_samples", backward_samples, nonnegative=True)
    return samples * cut.server_forward_flops + back * cut.server_backward_flops


def smashed_bytes(cut: "CutProfile", samples: float, *, bytes_per_element: float = 4.0) -> float:
    """Predicted bytes of the smashed data (or its gradient) of ``samples`` samples.

    ``bytes_per_element`` is 4 for fp32, 2 for fp16/bf16, 1 for fp8/int8 (per-tensor scales
    are negligible). For accounting a real round, use the bytes actually serialized.
    """
    samples = real_arg("samples", samples, nonnegative=True)
    return samples * cut.smashed_elements * real_arg("bytes_per_element", bytes_per_element, positive=True)
