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
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Optional, Protocol

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


@dataclass(frozen=True)
class RoundWorkload:
    """The work of one round: per client, the broadcast, the server, and the timing rule.

    Attributes
    ----------
    clients : tuple of ClientWork
        The clients that did work this round (distinct ids).
    timing : Timing
        How their chains combine (``parallel`` or ``sequential``).
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

    clients: tuple[ClientWork, ...]
    timing: Timing = Timing.PARALLEL
    server_flops: float = 0.0
    broadcast_bytes: float = 0.0
    scheme: str = ""
    source: str = "predicted"

    def __post_init__(self) -> None:
        clients = tuple(self.clients)
        for i, c in enumerate(clients):
            if not isinstance(c, ClientWork):
                raise ValueError(f"clients[{i}] must be a ClientWork, got {type(c).__name__}")
        ids = [c.client_id for c in clients]
        if len(set(ids)) != len(ids):
            raise ValueError(f"client ids must be distinct, got {ids}")
        object.__setattr__(self, "clients", clients)
        try:
            object.__setattr__(self, "timing", Timing(self.timing))
        except ValueError:
            raise ValueError(f"timing must be one of {[t.value for t in Timing]}, got {self.timing!r}") from None
        object.__setattr__(self, "server_flops", _nonneg("server_flops", self.server_flops))
        object.__setattr__(self, "broadcast_bytes", _nonneg("broadcast_bytes", self.broadcast_bytes))
        if self.broadcast_bytes > 0 and not any(c.receives_broadcast for c in clients):
            raise ValueError("broadcast_bytes > 0 needs at least one receiver")

    @property
    def client_ids(self) -> list[int]:
        return [c.client_id for c in self.clients]

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        d = asdict(self)
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
    samples = [_int(f"samples[{i}]", s, 1) for i, s in enumerate(samples)]
    cuts = list(cuts)
    if len(cuts) != n:
        raise ValueError(f"cuts has {len(cuts)} entries for {n} clients")
    num_blocks = len(profile.blocks)
    for k in cuts:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_blocks - 1:
            raise ValueError(f"cut {k!r} is outside the model: valid cuts are 1..{num_blocks - 1}")
    cuts = [int(k) for k in cuts]
    ids = list(range(n)) if client_ids is None else [_int("client_ids", c, 0) for c in client_ids]
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

    clients_work: list[ClientWork] = []
    nominal, executed = [], 0.0
    for i in range(n):
        state = states.get(i, "A")
        cp = cps[i]
        executed += server_fwd_rows[i] * cp.server_forward_flops + server_bwd_rows[i] * cp.server_backward_flops
        if state == "C":
            continue
        if state == "A":
            part = wire.part(cuts[i])
            up[i] += part
            down[i] += part
            flops[i] = samples[i] * (cp.client_forward_flops + cp.client_backward_flops)
        else:  # B: the frozen client only runs its forward pass
            flops[i] = samples[i] * cp.client_forward_flops
        nominal.append(_nominal_server(cp, samples[i]))
        clients_work.append(
            ClientWork(ids[i], cuts[i], flops[i], up[i], down[i], receives_broadcast=True, samples=samples[i])
        )
    attributable = executed - sum(
        server_fwd_rows[i] * cps[i].server_forward_flops + server_bwd_rows[i] * cps[i].server_backward_flops
        for i in range(n)
        if states.get(i, "A") == "C"
    )
    if extra_fwd or extra_bwd:
        cp = cps[0]
        mean_rows = extra_fwd * cp.server_forward_flops + extra_bwd * cp.server_backward_flops
        executed += mean_rows
        attributable += mean_rows
    shares = _attributed(nominal, attributable)
    clients_work = [
        ClientWork(c.client_id, c.cut, c.flops, c.uplink_bytes, c.downlink_bytes, s, c.receives_broadcast, c.samples)
        for c, s in zip(clients_work, shares)
    ]
    return RoundWorkload(
        clients=tuple(clients_work),
        timing=TIMING_OF[scheme],
        server_flops=executed,
        broadcast_bytes=broadcast,
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
    shares = _attributed(nominal, attributable)
    clients = tuple(
        ClientWork(int(c), int(k), float(f), float(u), float(d), s, True, int(m))
        for c, k, f, u, d, s, m in zip(client_ids, cuts, client_flops, uplink_bytes, downlink_bytes, shares, samples)
    )
    return RoundWorkload(
        clients=clients,
        timing=timing if timing is not None else TIMING_OF.get(scheme, Timing.PARALLEL),
        server_flops=float(server_flops),
        broadcast_bytes=float(broadcast_bytes),
        scheme=scheme,
        source="measured",
    )
