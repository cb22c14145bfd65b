"""The round as a value: the work one round of split learning does, per client and on the server.

A ``RoundWorkload`` is what ``flsplit.sim.pricing.price`` turns into latency and energy. It is
produced two ways that share every rule:

* **predicted** (``predict_workload``): from a scheme's traffic model, the cuts and the
  samples of a plan, before the round (planners, ``flsplit plan``);
* **measured** (``measured_workload``): from a finished round, with the bytes the data plane
  actually serialized and the FLOPs the server actually executed (the training runtime).

Priced with the same allocation, the two agree to rounding when the traffic model is the
wire's own (``flsplit.wire_bytes.SerializedWire``); with the default ``ElementWire``
(``samples x smashed elements x bytes per element``, no headers, labels or weights) the
prediction is the planners' usual approximation.

EPSL's server work follows the paper's count: ``N b`` rows forwarded and
``(1 - phi) N b + phi b`` rows back-propagated per step (``ServerPart`` counts what it runs
the same way).

Server FLOPs per client (``ClientWork.server_flops``) are the nominal
``samples x (forward + backward)`` at the client's cut, scaled so that they sum to the
FLOPs the server executed on the clients' data (EPSL's aggregation executes fewer). They
are used only by the per-client server timing (``ServerTiming.PER_CLIENT``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np

if TYPE_CHECKING:  # pure: the profile is only read, torch is never imported here
    from flsplit.profile import CutProfile, ModelProfile

__all__ = [
    "Timing",
    "ClientWork",
    "RoundWorkload",
    "WireModel",
    "ElementWire",
    "SCHEMES",
    "TIMING_OF",
    "predict_workload",
    "measured_workload",
    "split_batches",
]


class Timing(str, Enum):
    """How the clients' chains combine into the round latency (the schedule's timing rule)."""

    PARALLEL = "parallel"  # lockstep and per-node schedules: the slowest chain sets the pace
    SEQUENTIAL = "sequential"  # the relay (vanilla SL): clients take turns, chains add up


# The schedule of each scheme and hence its timing rule.
TIMING_OF: dict[str, Timing] = {
    "sl": Timing.SEQUENTIAL,
    "sflv1": Timing.PARALLEL,
    "sflv2": Timing.PARALLEL,
    "psl": Timing.PARALLEL,
    "epsl": Timing.PARALLEL,
    "sflga": Timing.PARALLEL,
    "async": Timing.PARALLEL,
}
SCHEMES = tuple(TIMING_OF)


def _nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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
        object.__setattr__(self, "client_id", _int("client_id", self.client_id, 0))
        object.__setattr__(self, "cut", _int("cut", self.cut, 1))
        object.__setattr__(self, "samples", _int("samples", self.samples, 0))
        for name in ("flops", "uplink_bytes", "downlink_bytes", "server_flops"):
            object.__setattr__(self, name, _nonneg(f"client {self.client_id}: {name}", getattr(self, name)))


def _column(name: str, values, n: int, dtype, *, minimum: float = 0.0) -> np.ndarray:
    """One per-client column as a read-only array, checked once (finite, >= minimum)."""
    try:
        arr = np.array(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {values!r}") from None
    if arr.shape != (n,):
        raise ValueError(f"{name} has {arr.size} entries for {n} clients")
    bad = ~np.isfinite(arr) | (arr < minimum)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] must be finite and >= {minimum:g}, got {arr[i]!r}")
    if dtype is int:
        if np.any(arr != np.floor(arr)):
            i = int(np.argmax(arr != np.floor(arr)))
            raise ValueError(f"{name}[{i}] must be an integer, got {arr[i]!r}")
        arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


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
        set_(self, "client_ids", _column("client_ids", self.client_ids, n, int))
        if len(np.unique(self.client_ids)) != n:
            raise ValueError(f"client ids must be distinct, got {self.client_ids.tolist()}")
        set_(self, "cuts", _column("cuts", self.cuts, n, int, minimum=1))
        for name in ("flops", "uplink_bytes", "downlink_bytes"):
            set_(self, name, _column(name, getattr(self, name), n, float))
        set_(self, "client_server_flops", _column("client_server_flops", np.zeros(n) if self.client_server_flops is None
                                                  else self.client_server_flops, n, float))
        set_(self, "samples", _column("samples", np.zeros(n) if self.samples is None else self.samples, n, int))
        receives = np.ones(n, dtype=bool) if self.receives_broadcast is None else np.array(self.receives_broadcast, dtype=bool)
        if receives.shape != (n,):
            raise ValueError(f"receives_broadcast has {receives.size} entries for {n} clients")
        receives.setflags(write=False)
        set_(self, "receives_broadcast", receives)
        try:
            set_(self, "timing", Timing(self.timing))
        except ValueError:
            raise ValueError(f"timing must be one of {[t.value for t in Timing]}, got {self.timing!r}") from None
        set_(self, "server_flops", _nonneg("server_flops", self.server_flops))
        set_(self, "broadcast_bytes", _nonneg("broadcast_bytes", self.broadcast_bytes))
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


class WireModel(Protocol):
    """Bytes on the wire of the pieces of a round (a traffic model's unit costs)."""

    def up(self, cut: int, rows: float) -> float:
        """Bytes of one batch of ``rows`` smashed samples sent up (with its labels)."""

    def down(self, cut: int, rows: float) -> float:
        """Bytes of one unicast gradient of ``rows`` samples."""

    def broadcast(self, cut: int, rows: float) -> float:
        """Bytes of one broadcast gradient of ``rows`` samples."""

    def part(self, cut: int) -> float:
        """Bytes of the client part's weights (sent down at round start and back at the end)."""


@dataclass(frozen=True)
class ElementWire:
    """The planners' wire model: ``rows x smashed elements x bytes_per_element`` each way.

    Headers, labels and scales are left out (a planning approximation;
    ``flsplit.wire_bytes.SerializedWire`` counts them). The client part's weights, sent down
    at round start and back at round end, count only with ``include_weights`` (the
    profile's ``client_param_bytes``): the classic planners' models leave them out, a
    training run pays them.
    """

    profile: "ModelProfile"
    bytes_per_element: float = 4.0
    include_weights: bool = False

    def _bytes(self, cut: int, rows: float) -> float:
        return rows * self.profile.cut(cut).smashed_elements * self.bytes_per_element

    def up(self, cut: int, rows: float) -> float:
        return self._bytes(cut, rows)

    def down(self, cut: int, rows: float) -> float:
        return self._bytes(cut, rows)

    def broadcast(self, cut: int, rows: float) -> float:
        return self._bytes(cut, rows)

    def part(self, cut: int) -> float:
        return float(self.profile.cut(cut).client_param_bytes) if self.include_weights else 0.0


def split_batches(samples: int, batch_size: Optional[int]) -> list[int]:
    """Rows of each batch of ``samples`` samples (one batch of all when ``batch_size`` is None)."""
    if batch_size is None:
        return [samples] if samples > 0 else []
    full, rest = divmod(samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _nominal_server(cut: "CutProfile", samples: float) -> float:
    return samples * (cut.server_forward_flops + cut.server_backward_flops)


def _attributed(nominal: Sequence[float], executed: float) -> list[float]:
    """Per-client server FLOPs: the nominal ones scaled to sum to what was executed."""
    total = sum(nominal)
    if total <= 0:
        return [0.0] * len(nominal)
    return [v * executed / total for v in nominal]


def predict_workload(
    scheme: str,
    profile: "ModelProfile",
    *,
    cuts: Sequence[int],
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    phi: float = 0.0,
    wire: Optional[WireModel] = None,
    states: Optional[Mapping[int, str]] = None,
) -> RoundWorkload:
    """The workload a round of ``scheme`` will do (its traffic model).

    Parameters
    ----------
    scheme : {"sl", "sflv1", "sflv2", "psl", "epsl", "sflga", "async"}
        The scheme (its traffic, its server work, its schedule's timing rule).
    profile : ModelProfile
        Per-block FLOPs and sizes of the model.
    cuts, samples : sequence of int
        Per client: cut layer, and samples trained this round.
    client_ids : sequence of int, optional
        Scenario client ids; default ``0 .. N-1``.
    batch_size : int, optional
        Batch size of the split steps; ``None`` treats each client's round as one batch (the
        planners' continuous approximation: EPSL aggregates ``phi x samples`` positions).
    phi : float
        EPSL's aggregated fraction (``epsl`` only).
    wire : WireModel, optional
        Bytes of each piece; default ``ElementWire(profile)`` (fp32 payloads only).
    states : mapping of client position to {"A", "B", "C"}, optional
        Async SL: each client's state this round (default all ``A``). ``B`` uploads one way
        with a frozen client part; ``C`` sends nothing and the server trains on its cache.

    Returns
    -------
    RoundWorkload
        ``source="predicted"``. Clients in state ``C`` are not in ``clients`` (they do no
        work); their samples are still trained on by the server.

    Examples
    --------
    >>> w = predict_workload("psl", profile, cuts=[2, 3], samples=[64, 64])  # doctest: +SKIP
    >>> price(w, scenario).round_latency_s  # doctest: +SKIP
    """
    if scheme not in TIMING_OF:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    n = len(samples)
    if n == 0:
        raise ValueError("samples: at least one client is needed")
    samples = _column("samples", samples, n, int, minimum=1).tolist()
    cuts = list(cuts)
    if len(cuts) != n:
        raise ValueError(f"cuts has {len(cuts)} entries for {n} clients")
    num_blocks = len(profile.blocks)
    for k in cuts:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_blocks - 1:
            raise ValueError(f"cut {k!r} is outside the model: valid cuts are 1..{num_blocks - 1}")
    cuts = [int(k) for k in cuts]
    ids = list(range(n)) if client_ids is None else _column("client_ids", list(client_ids), len(client_ids), int).tolist()
    if len(ids) != n:
        raise ValueError(f"samples has {n} entries but client_ids has {len(ids)}")
    if batch_size is not None:
        batch_size = _int("batch_size", batch_size, 1)
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must be in [0, 1], got {phi!r}")
    if scheme != "epsl" and phi != 0.0:
        raise ValueError(f"phi applies to scheme 'epsl' only, not {scheme!r}")
    if scheme in ("epsl", "sflga") and len(set(cuts)) > 1:
        raise ValueError(f"{scheme} uses one cut for every client, got {cuts}")
    states = {i: "A" for i in range(n)} if states is None else {int(i): str(s) for i, s in states.items()}
    if scheme != "async" and any(s != "A" for s in states.values()):
        raise ValueError("states apply to scheme 'async' only")
    if any(s not in ("A", "B", "C") for s in states.values()):
        raise ValueError(f"states must be 'A', 'B' or 'C', got {sorted(set(states.values()))}")
    wire = wire or ElementWire(profile)
    if (type(wire) is ElementWire and batch_size is None and scheme not in ("epsl", "sflga")
            and all(v == "A" for v in states.values())):
        return _predict_elementwise(scheme, profile, wire, cuts, samples, ids)
    cps = [profile.cut(k) for k in cuts]
    batches = [split_batches(s, batch_size) for s in samples]
    up = [0.0] * n
    down = [0.0] * n
    flops = [0.0] * n
    broadcast = 0.0
    server_fwd_rows = [0.0] * n  # per client, rows forwarded / back-propagated on the server
    server_bwd_rows = [0.0] * n
    extra_fwd = extra_bwd = 0.0  # rows not attributable to one client (EPSL's mean rows)

    if scheme in ("epsl", "sflga"):
        steps = max(len(b) for b in batches)
        for t in range(steps):
            who = [i for i in range(n) if t < len(batches[i])]
            rows = [batches[i][t] for i in who]
            for i, r in zip(who, rows):
                up[i] += wire.up(cuts[i], r)
                server_fwd_rows[i] += r
                server_bwd_rows[i] += r
            if scheme == "sflga":  # unicast rows are empty, the average is broadcast
                for i in who:
                    down[i] += wire.down(cuts[i], 0)
                broadcast += wire.broadcast(cuts[who[0]], max(rows))
                continue
            b = min(rows)
            m = (phi * b if batch_size is None else math.ceil(phi * b)) if len(who) > 1 else 0
            for i, r in zip(who, rows):
                down[i] += wire.down(cuts[i], r - m)
                server_bwd_rows[i] -= m  # aggregated rows are forwarded without a graph ...
            if m:
                broadcast += wire.broadcast(cuts[who[0]], m)
                # ... and the m mean rows are back-propagated once. Their forward pass is
                # counted with that backward, as the EPSL paper counts it (m / (N b) more
                # forward FLOPs, under phi / N): server backward (1 - phi) N b + phi b.
                extra_bwd += m
    else:
        for i in range(n):
            state = states.get(i, "A")
            if state == "A":
                for r in batches[i]:
                    up[i] += wire.up(cuts[i], r)
                    down[i] += wire.down(cuts[i], r)
            elif state == "B":
                up[i] = sum(wire.up(cuts[i], r) for r in batches[i])
            server_fwd_rows[i] = server_bwd_rows[i] = samples[i]

    working = [i for i in range(n) if states.get(i, "A") != "C"]  # C clients do no work
    executed = sum(server_fwd_rows[i] * cps[i].server_forward_flops + server_bwd_rows[i] * cps[i].server_backward_flops
                   for i in range(n))
    unattributed = sum(server_fwd_rows[i] * cps[i].server_forward_flops + server_bwd_rows[i] * cps[i].server_backward_flops
                       for i in range(n) if states.get(i, "A") == "C")
    if extra_fwd or extra_bwd:
        cp = cps[0]
        executed += extra_fwd * cp.server_forward_flops + extra_bwd * cp.server_backward_flops
    for i in working:
        cp = cps[i]
        if states.get(i, "A") == "A":
            part = wire.part(cuts[i])
            up[i] += part
            down[i] += part
            flops[i] = samples[i] * (cp.client_forward_flops + cp.client_backward_flops)
        else:  # B: the frozen client only runs its forward pass
            flops[i] = samples[i] * cp.client_forward_flops
    nominal = [_nominal_server(cps[i], samples[i]) for i in working]
    return RoundWorkload(
        client_ids=[ids[i] for i in working],
        cuts=[cuts[i] for i in working],
        flops=[flops[i] for i in working],
        uplink_bytes=[up[i] for i in working],
        downlink_bytes=[down[i] for i in working],
        client_server_flops=_attributed(nominal, executed - unattributed),
        samples=[samples[i] for i in working],
        timing=TIMING_OF[scheme],
        server_flops=executed,
        broadcast_bytes=broadcast,
        scheme=scheme,
        source="predicted",
    )


def _predict_elementwise(scheme: str, profile: "ModelProfile", wire: ElementWire, cuts: list[int],
                         samples: list[int], ids: list[int]) -> RoundWorkload:
    """``predict_workload``'s columns for the per-sample schemes with ``ElementWire`` and whole
    rounds as one batch, computed as arrays (the same sums: planners price thousands of clients)."""
    table = {k: profile.cut(k) for k in set(cuts)}
    col = lambda f: np.array([f(table[k]) for k in cuts], dtype=float)  # noqa: E731
    n = np.array(samples, dtype=float)
    smashed = n * col(lambda c: c.smashed_elements) * wire.bytes_per_element
    part = col(lambda c: c.client_param_bytes) if wire.include_weights else 0.0
    server_fwd, server_bwd = col(lambda c: c.server_forward_flops), col(lambda c: c.server_backward_flops)
    executed = n * server_fwd + n * server_bwd
    return RoundWorkload(
        client_ids=ids,
        cuts=cuts,
        flops=n * (col(lambda c: c.client_forward_flops) + col(lambda c: c.client_backward_flops)),
        uplink_bytes=smashed + part,
        downlink_bytes=smashed + part,
        client_server_flops=executed,
        samples=samples,
        timing=TIMING_OF[scheme],
        server_flops=float(sum(executed.tolist())),
        scheme=scheme,
        source="predicted",
    )


def measured_workload(
    scheme: str,
    profile: "ModelProfile",
    *,
    client_ids: Sequence[int],
    cuts: Sequence[int],
    client_flops: Sequence[float],
    uplink_bytes: Sequence[float],
    downlink_bytes: Sequence[float],
    samples: Sequence[int],
    server_flops: float,
    unattributed_server_flops: float = 0.0,
    broadcast_bytes: float = 0.0,
    timing: Optional[Timing] = None,
) -> RoundWorkload:
    """The workload of a finished round, from what the runtime measured.

    Parameters
    ----------
    scheme : str
        The scheme (label; also gives the timing rule unless ``timing`` is given).
    profile : ModelProfile
        For the nominal per-client server FLOPs (attribution only).
    client_ids, cuts, client_flops, uplink_bytes, downlink_bytes, samples : sequences
        Per client that did work this round.
    server_flops : float
        FLOPs the server executed in the round (all of them).
    unattributed_server_flops : float
        Of those, FLOPs on data no client sent this round (async SL's caches).
    broadcast_bytes : float
        Bytes broadcast this round, each broadcast counted once.
    timing : Timing, optional
        The schedule's timing rule; default the scheme's.
    """
    n = len(client_ids)
    for name, seq in (("cuts", cuts), ("client_flops", client_flops), ("uplink_bytes", uplink_bytes),
                      ("downlink_bytes", downlink_bytes), ("samples", samples)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} clients")
    nominal = [_nominal_server(profile.cut(int(k)), s) for k, s in zip(cuts, samples)]
    attributable = max(_nonneg("server_flops", server_flops) - _nonneg("unattributed_server_flops", unattributed_server_flops), 0.0)
    return RoundWorkload(
        client_ids=list(client_ids),
        cuts=list(cuts),
        flops=list(client_flops),
        uplink_bytes=list(uplink_bytes),
        downlink_bytes=list(downlink_bytes),
        client_server_flops=_attributed(nominal, attributable),
        samples=list(samples),
        timing=timing if timing is not None else TIMING_OF.get(scheme, Timing.PARALLEL),
        server_flops=float(server_flops),
        broadcast_bytes=float(broadcast_bytes),
        scheme=scheme,
        source="measured",
    )
