"""The baseline every planner is compared against, and one pricing rule for all of them.

``scheme_round_cost`` prices one round of a scheme with the cost model
(``flsplit.sim.price``) for any cuts (one per client, mixed allowed) and any allocation
(bandwidth shares, OFDMA subchannels, transmit powers; by default an even split at each
device's maximum power). The traffic and work of each scheme, for client ``i`` with ``n_i``
samples at cut ``k_i`` (``s_i`` smashed elements per sample, ``q`` bytes per element):

* ``psl`` (PSL, SFL; clients in parallel): uplink ``n_i s_i q`` bytes, unicast downlink the
  gradient of the same shape (the same bytes); client FLOPs ``client_flops(cut, n_i)``
  (forward + backward); server FLOPs the sum of ``server_flops(cut_i, n_i)``.
* ``sl`` (vanilla SL): the same traffic and work, but the clients take turns, each owning the
  whole band while it is active (``timing="sequential"``).
* ``epsl`` (EPSL with aggregated fraction ``phi``; one cut, one batch size ``n``): uplink
  ``n s q``; unicast downlink ``(1 - phi) n s q``; one broadcast of ``phi n s q`` bytes over
  the whole band (the weakest receiver sets its pace); the server back-propagates
  ``(1 - phi) N n + phi n`` samples.
* ``sflga`` (SFL-GA; one cut): uplink ``n_i s q``; no unicast downlink; one broadcast of the
  averaged gradient, ``max_i n_i s q`` bytes.

The server's time comes after the slowest client's chain, as the cost model says.

``plan_fixed`` is the baseline: one cut for everyone, resources split evenly.
``best_fixed_cut`` evaluates every candidate cut and keeps the fastest: the "best fixed cut"
of the benchmarks and of ``flsplit plan``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from flsplit.sim.pricing import RoundCost
from flsplit.sim.scenario import Scenario
from flsplit.planners.plan import Plan
from flsplit.sim.checks import cut_list
from flsplit.sim.pricing import Allocation, ServerTiming, price, price_totals
from flsplit.sim.traffic import ElementWire, predict_workload

if TYPE_CHECKING:  # pure: the profile is only read
    from flsplit.profile import ModelProfile

__all__ = ["plan_fixed", "best_fixed_cut", "scheme_round_cost", "SCHEMES"]

SCHEMES = ("psl", "sl", "epsl", "sflga", "sflv1", "sflv2")  # async needs per-client states: predict_workload


def _client_list(samples: Sequence[int], client_ids: Optional[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Validated per-client samples and ids."""
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a sequence of per-client sample counts, got {samples!r}")
    n = len(samples)
    if n == 0:
        raise ValueError("samples: at least one client is needed")
    for i, s in enumerate(samples):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0:
            raise ValueError(f"samples[{i}] must be a positive integer, got {s!r}")
    ids = list(range(n)) if client_ids is None else list(client_ids)
    if len(ids) != n:
        raise ValueError(f"samples has {n} entries but client_ids has {len(ids)}")
    for i, c in enumerate(ids):
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 0:
            raise ValueError(f"client_ids[{i}] must be a non-negative integer, got {c!r}")
    if len(set(ids)) != n:
        raise ValueError(f"client_ids must be distinct, got {ids}")
    return [int(s) for s in samples], [int(c) for c in ids]


def scheme_round_cost(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    cuts: Sequence[int],
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    server_round: int = 0,
    bytes_per_element: float = 4.0,
    scheme: str = "psl",
    phi: float = 0.0,
    bandwidth_shares: Optional[Sequence[float]] = None,
    subchannels: Optional[Sequence[int]] = None,
    tx_power_w: Optional[Sequence[float]] = None,
    server_timing: ServerTiming = ServerTiming.AFTER_CLIENTS,
) -> RoundCost:
    """The cost model's price of one round of ``scheme`` with the given cuts and allocation.

    Parameters
    ----------
    profile : ModelProfile
        Per-block costs of the model.
    scenario : Scenario
        Devices, server and channel.
    cuts : sequence of int
        Cut per client (``1 .. L-1``); ``epsl`` and ``sflga`` need one cut for all.
    samples : sequence of int
        Samples each client trains on in the round (``epsl``: all equal).
    client_ids : sequence of int, optional
        Scenario client ids (device profile and fading key); default ``0 .. N-1``.
    server_round : int
        Round number (keys the fading).
    bytes_per_element : float
        Wire bytes per smashed element (4 for fp32, 1 for fp8).
    scheme : {"psl", "sl", "epsl", "sflga", "sflv1", "sflv2"}
        The traffic and timing rule (module docstring).
    phi : float
        EPSL's aggregated fraction (``epsl`` only).
    bandwidth_shares, subchannels, tx_power_w : sequence, optional
        The allocation, as ``flsplit.sim.Allocation`` holds it (default: even split, maximum
        power).
    server_timing : ServerTiming
        Where the server's time goes (``flsplit.sim.pricing``).

    Notes
    -----
    This is ``flsplit.sim.predict_workload`` (the scheme's traffic model with
    ``ElementWire``) priced by ``flsplit.sim.price``: the one price, kept under its old name.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    samples, ids = _client_list(samples, client_ids)
    n = len(ids)
    cuts = cut_list(cuts, n, len(profile.blocks))
    if isinstance(bytes_per_element, bool) or not isinstance(bytes_per_element, numbers.Real) \
            or not math.isfinite(bytes_per_element) or bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be a number > 0, got {bytes_per_element!r}")
    if scheme in ("epsl", "sflga") and len(set(cuts)) > 1:
        raise ValueError(f"{scheme} uses one cut for every client, got {cuts}")
    if scheme == "epsl":
        if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not 0.0 <= phi <= 1.0:
            raise ValueError(f"phi must be in [0, 1], got {phi!r}")
        if len(set(samples)) > 1:
            raise ValueError(f"epsl steps need one batch size for all clients, got samples {samples}")
    elif phi != 0.0:
        raise ValueError(f"phi applies to scheme 'epsl' only, not {scheme!r}")
    work = predict_workload(
        scheme, profile, cuts=cuts, samples=samples, client_ids=ids, phi=phi,
        wire=ElementWire(profile, float(bytes_per_element)),
    )
    bandwidth = None
    if bandwidth_shares is not None or subchannels is None:
        bandwidth = scenario.channel.client_bandwidths_hz(n, shares=bandwidth_shares, exclusive=scheme == "sl")
    return price(
        work,
        scenario,
        Allocation(bandwidth_hz=bandwidth, subchannels=subchannels, tx_power_w=tx_power_w),
        server_round=server_round,
        server_timing=server_timing,
    )


def plan_fixed(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    cut: int,
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    server_round: int = 0,
    bytes_per_element: float = 4.0,
    scheme: str = "psl",
    phi: float = 0.0,
) -> Plan:
    """Price one round with the same cut for every client and an even split of the resources.

    Parameters
    ----------
    profile : ModelProfile
        Per-block costs of the model.
    scenario : Scenario
        Devices, server and channel.
    cut : int
        The cut of every client (``1 .. L-1``).
    samples : sequence of int
        Samples each client trains on in the round.
    client_ids : sequence of int, optional
        Scenario client ids (device profile and fading key); default ``0 .. N-1``.
    server_round : int
        Round number (keys the fading).
    bytes_per_element : float
        Wire bytes per smashed element (4 for fp32, 1 for fp8).
    scheme : {"psl", "sl", "epsl", "sflga", "sflv1", "sflv2"}
        Traffic and timing of the scheme (``scheme_round_cost``).
    phi : float
        EPSL's aggregated fraction (``scheme="epsl"`` only).

    Returns
    -------
    Plan
        ``method="fixed"``: the cuts, each client's bandwidth and power, the round latency and
        device energy; ``details`` holds the scheme, the timing rule and per-client costs.
    """
    samples, ids = _client_list(samples, client_ids)
    cost = scheme_round_cost(
        profile, scenario, cuts=[cut] * len(ids), samples=samples, client_ids=ids, server_round=server_round,
        bytes_per_element=bytes_per_element, scheme=scheme, phi=phi,
    )
    return Plan(
        method="fixed",
        cuts=[int(cut)] * len(ids),
        latency_s=cost.round_latency_s,
        energy_j=cost.total_energy_j,
        bandwidth_hz=[c.bandwidth_hz for c in cost.clients],
        tx_power_w=[scenario.device(c).tx_power_w for c in ids],
        details={
            "scheme": scheme,
            "phi": phi,
            "timing": cost.timing,
            "client_ids": ids,
            "client_latency_s": [c.latency_s for c in cost.clients],
            "compute_s": [c.compute_latency_s for c in cost.clients],
            "uplink_s": [c.uplink_latency_s for c in cost.clients],
            "downlink_s": [c.downlink_latency_s for c in cost.clients],
            "server_s": cost.server_latency_s,
            "energy_per_client_j": [c.energy_j for c in cost.clients],
        },
    )


def best_fixed_cut(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    samples: Sequence[int],
    candidate_cuts: Optional[Sequence[int]] = None,
    **kwargs,
) -> Plan:
    """The fastest single cut for everyone (``plan_fixed`` at every candidate cut).

    Keyword arguments other than ``candidate_cuts`` go to ``plan_fixed``. The returned plan's
    ``details["latency_by_cut"]`` and ``details["energy_by_cut"]`` list every candidate.
    """
    num_blocks = len(profile.blocks)
    cuts = list(range(1, num_blocks)) if candidate_cuts is None else list(candidate_cuts)
    if not cuts:
        raise ValueError("candidate_cuts is empty")
    unknown = set(kwargs) - {"client_ids", "server_round", "bytes_per_element", "scheme", "phi"}
    if unknown:
        raise TypeError(f"best_fixed_cut() got unexpected keyword arguments {sorted(unknown)}")
    # Check once (plan_fixed's checks, on the first cut), then price every cut's totals with
    # the same arithmetic and build the full plan for the best one only.
    first = plan_fixed(profile, scenario, cut=cuts[0], samples=samples, **kwargs)
    samples, ids = _client_list(samples, kwargs.get("client_ids"))
    scheme, phi = kwargs.get("scheme", "psl"), kwargs.get("phi", 0.0)
    wire = ElementWire(profile, float(kwargs.get("bytes_per_element", 4.0)))
    alloc = Allocation(bandwidth_hz=scenario.channel.client_bandwidths_hz(len(ids), exclusive=scheme == "sl"))
    totals = {cuts[0]: (first.latency_s, first.energy_j)}
    for k in cuts[1:]:
        cut_list([k], 1, num_blocks)
        work = predict_workload(scheme, profile, cuts=[k] * len(ids), samples=samples, client_ids=ids, phi=phi, wire=wire)
        totals[k] = price_totals(work, scenario, alloc, server_round=kwargs.get("server_round", 0))
    best = min(totals, key=lambda k: (totals[k][0], k))
    plan = first if best == cuts[0] else plan_fixed(profile, scenario, cut=best, samples=samples, **kwargs)
    plan.details["latency_by_cut"] = {k: t[0] for k, t in totals.items()}
    plan.details["energy_by_cut"] = {k: t[1] for k, t in totals.items()}
    return plan
