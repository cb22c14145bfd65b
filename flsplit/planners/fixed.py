"""The baseline every planner is compared against: one cut for everyone, resources split evenly.

``plan_fixed`` prices one round of a scheme with the one price (``flsplit.sim.price`` of
``flsplit.sim.predict_workload``) at the same cut for every client, with an even split of the
band (the whole band to each client in turn for ``sl``) at each device's maximum power. The
scheme's traffic and work are its traffic model's (``flsplit.sim.traffic``); the server's time
comes after the slowest client's chain.

``best_fixed_cut`` evaluates every candidate cut of the problem and keeps the fastest: the
"best fixed cut" of the benchmarks and of ``flsplit plan``.

Example::

    problem = PlanningProblem.build(profile, scenario, samples=[32] * 4, server_round=1)
    base = best_fixed_cut(problem, scheme="sflga")
"""

from __future__ import annotations

from flsplit.planners.plan import Plan, client_costs
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PlanInputs
from flsplit.sim.checks import cut_arg, fraction_arg
from flsplit.sim.pricing import Allocation, ServerTiming, price, price_totals
from flsplit.sim.schemes import scheme_model
from flsplit.sim.traffic import ElementWire, predict_workload
from flsplit.sim.workload import RoundWorkload

__all__ = ["plan_fixed", "best_fixed_cut", "fixed_rounds"]


def _check(problem: PlanningProblem, scheme: str, phi: float) -> None:
    """The scheme and its ``phi`` for this problem (the problem itself is checked)."""
    if not isinstance(problem, PlanningProblem):
        raise ValueError(f"problem must be a PlanningProblem, got {type(problem).__name__}")
    if scheme_model(scheme).per_client_states:  # (an unknown scheme is refused there, naming the known ones)
        raise ValueError(f"scheme {scheme!r}: its traffic depends on each client's state, which a fixed plan does not know")
    if scheme == "epsl":
        fraction_arg("phi", phi)
        if len(set(problem.samples)) > 1:
            raise ValueError(f"epsl steps need one batch size for all clients, got samples {list(problem.samples)}")
    elif phi != 0.0:
        raise ValueError(f"phi applies to scheme 'epsl' only, not {scheme!r}")


def _even_split(problem: PlanningProblem, scheme: str) -> Allocation:
    """The baseline's allocation: an even split of the band (``sl``: all of it, in turn), full power."""
    return Allocation(bandwidth_hz=problem.scenario.channel.client_bandwidths_hz(problem.num_clients,
                                                                                 exclusive=scheme == "sl"))


def _workload(problem: PlanningProblem, cut: int, scheme: str, phi: float) -> RoundWorkload:
    """The scheme's predicted workload with ``cut`` for every client."""
    return predict_workload(
        scheme, problem.profile, cuts=[cut] * problem.num_clients, samples=list(problem.samples),
        client_ids=list(problem.client_ids), phi=phi,
        wire=ElementWire(problem.profile, problem.bytes_per_element, problem.include_weights),
    )


def plan_fixed(problem: PlanningProblem, *, cut: int, scheme: str = "psl", phi: float = 0.0) -> Plan:
    """Price one round with the same cut for every client and an even split of the resources.

    Parameters
    ----------
    problem : PlanningProblem
        The round, checked once (``PlanningProblem.build(profile, scenario, samples=...,
        client_ids=..., server_round=..., bytes_per_element=...)``).
    cut : int
        The cut of every client (``1 .. L-1``).
    scheme : {"psl", "sl", "epsl", "sflga", "sflv1", "sflv2"}
        Traffic and timing of the scheme (its traffic model, ``flsplit.sim.predict_workload``).
    phi : float
        EPSL's aggregated fraction (``scheme="epsl"`` only).

    Returns
    -------
    Plan
        ``method="fixed"``: the cuts, each client's bandwidth and power, the round latency and
        device energy; ``details`` holds the scheme, the timing rule and per-client costs.
    """
    _check(problem, scheme, phi)
    cut = cut_arg("cut", cut, len(problem.profile.blocks))
    cost = price(_workload(problem, cut, scheme, phi), problem.scenario, _even_split(problem, scheme),
                 server_round=problem.server_round, server_timing=ServerTiming.AFTER_CLIENTS)
    ids = list(problem.client_ids)
    costs = client_costs(cost)
    energy = costs.pop("energy_per_client_j")
    return Plan(
        method="fixed",
        cuts=[cut] * len(ids),
        latency_s=cost.round_latency_s,
        energy_j=cost.total_energy_j,
        bandwidth_hz=[c.bandwidth_hz for c in cost.clients],
        tx_power_w=[problem.scenario.device(c).tx_power_w for c in ids],
        details={"scheme": scheme, "phi": phi, "timing": cost.timing, "client_ids": ids, **costs,
                 "server_s": cost.server_latency_s, "energy_per_client_j": energy},
    )


def best_fixed_cut(problem: PlanningProblem, *, scheme: str = "psl", phi: float = 0.0) -> Plan:
    """The fastest single cut for everyone (``plan_fixed`` at every candidate cut of ``problem``).

    The returned plan's ``details["latency_by_cut"]`` and ``details["energy_by_cut"]`` list
    every candidate.
    """
    cuts = list(problem.candidate_cuts)
    # Check once (plan_fixed's checks, on the first cut), then price every cut's totals with
    # the same arithmetic and build the full plan for the best one only.
    first = plan_fixed(problem, cut=cuts[0], scheme=scheme, phi=phi)
    alloc = _even_split(problem, scheme)
    totals = {cuts[0]: (first.latency_s, first.energy_j)}
    for k in cuts[1:]:
        totals[k] = price_totals(_workload(problem, k, scheme, phi), problem.scenario, alloc,
                                 server_round=problem.server_round)
    best = min(totals, key=lambda k: (totals[k][0], k))
    plan = first if best == cuts[0] else plan_fixed(problem, cut=best, scheme=scheme, phi=phi)
    plan.details["latency_by_cut"] = {k: t[0] for k, t in totals.items()}
    plan.details["energy_by_cut"] = {k: t[1] for k, t in totals.items()}
    return plan


def fixed_rounds(inputs: PlanInputs):
    """``flsplit plan --method fixed``: the given cut (``--cut``), else the baseline's, for everyone."""
    cut = inputs.cut if inputs.cut is not None else inputs.baseline[0].cuts[0]
    return lambda server_round: plan_fixed(inputs.problem(server_round), cut=cut)
