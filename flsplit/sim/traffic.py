"""Traffic models: the workload a round of a scheme does, predicted or measured.

``predict_workload`` runs each scheme's traffic model (which batches go up, which gradients
come down, what is broadcast, which rows the server runs) with a ``WireModel`` giving the
bytes of each piece (the traffic models, one table keyed by scheme beside each scheme's
timing rule, are ``flsplit.sim.schemes``); ``measured_workload`` builds the same ``RoundWorkload`` from what a
finished round measured. EPSL's server work follows the paper's count: ``N b`` rows
forwarded and ``(1 - phi) N b + phi b`` back-propagated per step (``ServerPart`` counts what it
runs the same way). Per-client server FLOPs are the nominal ``samples x (forward +
backward)`` at the client's cut, scaled to sum to what the server executed on the clients'
data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.sim.checks import column_arg, cut_list, fraction_arg, int_arg, real_arg
from flsplit.sim.schemes import AsyncState, SchemeRound, Traffic, WireModel, scheme_model
from flsplit.sim.workload import RoundWorkload, Timing

if TYPE_CHECKING:  # pure: the profile is only read, torch is never imported here
    from flsplit.model.profile import CutProfile, ModelProfile

__all__ = ["ElementWire", "split_batches", "predict_workload",
           "measured_workload"]

@dataclass(frozen=True)
class ElementWire:
    """The planners' wire model: ``rows x smashed elements x bytes_per_element`` each way.

    Headers, labels and scales are left out (a planning approximation;
    ``flsplit.wire.wire_bytes.SerializedWire`` counts them). The client part's weights, sent down
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
    model = scheme_model(scheme)
    samples, cuts, ids, batch_size, states = _checked(scheme, profile, cuts, samples, client_ids, batch_size, phi,
                                                      states)
    wire = wire or ElementWire(profile)
    if (type(wire) is ElementWire and batch_size is None and scheme not in ("epsl", "sflga")
            and all(v == AsyncState.A for v in states.values())):
        return _predict_elementwise(scheme, profile, wire, cuts, samples, ids)
    round_ = SchemeRound(wire, cuts, samples, [split_batches(s, batch_size) for s in samples], batch_size, phi, states)
    traffic = model.traffic(round_)
    return _predicted(scheme, profile, round_, traffic, ids)


def _checked(scheme: str, profile: "ModelProfile", cuts, samples, client_ids, batch_size, phi, states):
    """``predict_workload``'s arguments, checked: ``(samples, cuts, ids, batch_size, states)``."""
    n = len(samples)
    if n == 0:
        raise ValueError("samples: at least one client is needed")
    samples = column_arg("samples", samples, n, integer=True, minimum=1).tolist()
    cuts = cut_list(cuts, n, len(profile.blocks))
    ids = list(range(n)) if client_ids is None else column_arg("client_ids", list(client_ids), len(client_ids), integer=True).tolist()
    if len(ids) != n:
        raise ValueError(f"samples has {n} entries but client_ids has {len(ids)}")
    if batch_size is not None:
        batch_size = int_arg("batch_size", batch_size, minimum=1)
    fraction_arg("phi", phi)
    if scheme != "epsl" and phi != 0.0:
        raise ValueError(f"phi applies to scheme 'epsl' only, not {scheme!r}")
    if scheme in ("epsl", "sflga") and len(set(cuts)) > 1:
        raise ValueError(f"{scheme} uses one cut for every client, got {cuts}")
    try:
        states = {i: AsyncState.A for i in range(n)} if states is None else {
            int(i): AsyncState(s) for i, s in states.items()}
    except (TypeError, ValueError):
        raise ValueError(f"states must be 'A', 'B' or 'C', got {list(states.values())}") from None
    if scheme != "async" and any(s != AsyncState.A for s in states.values()):
        raise ValueError("states apply to scheme 'async' only")
    return samples, cuts, ids, batch_size, states


def _predicted(scheme: str, profile: "ModelProfile", r: SchemeRound, t: Traffic, ids: list[int]) -> RoundWorkload:
    """The workload of a scheme's traffic: client FLOPs and weights, server FLOPs attributed."""
    n, cuts, samples, states = r.n, r.cuts, r.samples, r.states
    cps = [profile.cut(k) for k in cuts]
    up, down, flops = t.up, t.down, [0.0] * n
    working = [i for i in range(n) if states.get(i, AsyncState.A) != AsyncState.C]  # C clients do no work
    executed = sum(t.fwd_rows[i] * cps[i].server_forward_flops + t.bwd_rows[i] * cps[i].server_backward_flops
                   for i in range(n))
    unattributed = sum(t.fwd_rows[i] * cps[i].server_forward_flops + t.bwd_rows[i] * cps[i].server_backward_flops
                       for i in range(n) if states.get(i, AsyncState.A) == AsyncState.C)
    if t.extra_bwd:  # EPSL's mean rows: back-propagated once, at the (common) cut
        executed += t.extra_bwd * cps[0].server_backward_flops
    for i in working:
        cp = cps[i]
        if states.get(i, "A") == "A":
            part = r.wire.part(cuts[i])
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
        timing=scheme_model(scheme).timing,
        server_flops=executed,
        broadcast_bytes=t.broadcast,
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
        timing=scheme_model(scheme).timing,
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
    attributable = max(real_arg("server_flops", server_flops, nonnegative=True)
                       - real_arg("unattributed_server_flops", unattributed_server_flops, nonnegative=True), 0.0)
    return RoundWorkload(
        client_ids=list(client_ids),
        cuts=list(cuts),
        flops=list(client_flops),
        uplink_bytes=list(uplink_bytes),
        downlink_bytes=list(downlink_bytes),
        client_server_flops=_attributed(nominal, attributable),
        samples=list(samples),
        timing=timing if timing is not None else scheme_model(scheme).timing,
        server_flops=float(server_flops),
        broadcast_bytes=float(broadcast_bytes),
        scheme=scheme,
        source="measured",
    )
