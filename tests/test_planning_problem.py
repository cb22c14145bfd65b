"""PlanningProblem's checks, every planner's reported numbers against the one price, fast paths
against slow ones.

The prices here are computed independently of the planners: ``flsplit.sim.predict_workload``
with the planner's scheme, ``flsplit.sim.price`` with ``Allocation.from_plan`` and the planner's
server timing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile
from flsplit.planners.ccc import CCCEnvironment, CCCPlanner, train_ccc_agent
from flsplit.planners.edgesplit import plan_edgesplit
from flsplit.planners.epsl import plan_epsl
from flsplit.planners.open import OpenPlanner
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.sflga_allocation import allocate_sflga
from flsplit.model.profile import BlockProfile, ModelProfile
from flsplit.sim import Allocation, ElementWire, ServerTiming, predict_workload, price

BLOCKS = [
    BlockProfile(f, 2 * f, o, 1000)
    for f, o in [(2e6, 12000), (8e6, 4000), (8e6, 1000), (4e6, 200), (1e6, 10)]
]
PROFILE = ModelProfile(BLOCKS)
DEVICES = tuple(
    DeviceProfile(cpu_hz=c, flops_per_cycle=4, kappa=k, tx_power_w=p, distance_m=d)
    for c, k, p, d in [(1e9, 1e-28, 0.2, 100), (0.5e9, 2e-28, 0.1, 250), (2e9, 5e-29, 0.15, 400), (1.5e9, 1e-28, 0.2, 50)]
)
SERVER = ServerProfile(cpu_hz=10e9, flops_per_cycle=4, tx_power_w=1.0)


def scenario(n: int, *, ofdma: bool = True) -> Scenario:
    channel = Channel(num_subchannels=2 * n, subchannel_bandwidth_hz=20e6 / (2 * n)) if ofdma else Channel(bandwidth_hz=20e6)
    return Scenario(DEVICES, SERVER, channel, seed=5)


def priced(plan, sc: Scenario, *, scheme: str, samples, timing: ServerTiming, server_round: int = 0, phi: float = 0.0):
    """The one price of ``plan``, computed here."""
    ids = plan.details["client_ids"]
    work = predict_workload(scheme, PROFILE, cuts=plan.cuts, samples=samples, client_ids=ids, phi=phi,
                            wire=ElementWire(PROFILE, 4.0))
    return price(work, sc, Allocation.from_plan(plan), server_round=server_round, server_timing=timing)


# --- checks ----------------------------------------------------------------------------------


def _forced_band(value: float) -> Scenario:
    channel = Channel(bandwidth_hz=1e6)
    object.__setattr__(channel, "bandwidth_hz", value)  # past Channel's own check
    return Scenario(DEVICES, SERVER, channel)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": [32, math.nan, 32]}, r"samples\[1\]"),
        ({"samples": [32, 0, 32]}, r"samples\[1\] must be >= 1"),
        ({"samples": [32, 2.5]}, r"samples\[1\]"),
        ({"samples": []}, "samples"),
        ({"samples": "32"}, "samples"),
        ({"candidate_cuts": [1, 5]}, "candidate_cuts: cut 5 is outside the model: valid cuts are 1..4"),
        ({"candidate_cuts": [0]}, "candidate_cuts"),
        ({"candidate_cuts": []}, "candidate_cuts is empty"),
        ({"client_ids": [0, 1, 1]}, "client_ids must be distinct"),
        ({"client_ids": [0, 1]}, "client_ids"),
        ({"client_ids": [0, -1, 2]}, r"client_ids\[1\]"),
        ({"server_round": -1}, "server_round"),
        ({"bytes_per_element": 0.0}, "bytes_per_element"),
        ({"bytes_per_element": math.nan}, "bytes_per_element"),
    ],
)
def test_rejects_bad_input_naming_the_argument(kwargs, match):
    args = {"samples": [32, 32, 32], **kwargs}
    with pytest.raises(ValueError, match=match):
        PlanningProblem.build(PROFILE, scenario(3), **args)


@pytest.mark.parametrize("value", [0.0, -1e6, math.nan])
def test_rejects_a_non_positive_band(value):
    with pytest.raises(ValueError, match="bandwidth"):
        PlanningProblem.build(PROFILE, _forced_band(value), samples=[32, 32])


def test_rejects_what_is_not_a_scenario_or_profile():
    with pytest.raises(ValueError, match="scenario"):
        PlanningProblem.build(PROFILE, "heterogeneous", samples=[32])
    with pytest.raises(ValueError, match="profile"):
        PlanningProblem.build(object(), scenario(1), samples=[32])


def test_arrays_are_the_profile_and_devices():
    sc = scenario(4)
    problem = PlanningProblem.build(PROFILE, sc, samples=[8, 16, 24, 32], client_ids=[3, 0, 5, 1], server_round=2,
                                    candidate_cuts=[3, 1, 3])
    assert problem.candidate_cuts == (1, 3)
    for j, k in enumerate(problem.candidate_cuts):
        cp = PROFILE.cut(k)
        assert problem.client_flops[j] == cp.client_forward_flops + cp.client_backward_flops
        assert problem.server_flops[j] == cp.server_forward_flops + cp.server_backward_flops
        assert problem.smashed_elements[j] == cp.smashed_elements
    for i, c in enumerate(problem.client_ids):
        d = sc.device(c)
        assert (problem.cpu_hz[i], problem.kappa[i], problem.tx_power_w[i]) == (d.cpu_hz, d.kappa, d.tx_power_w)
        assert problem.gains[i] == pytest.approx(sc.channel_gain(c, 2), rel=1e-12)
    assert not problem.gains.flags.writeable
    later = problem.at_round(7)
    assert later.server_round == 7 and later.gains[0] == pytest.approx(sc.channel_gain(3, 7), rel=1e-12)
    with pytest.raises(ValueError, match="server_round"):
        problem.at_round(-1)


# --- every planner reports the one price -------------------------------------------------------


def test_edgesplit_reports_the_price():
    sc = scenario(6, ofdma=False)
    samples = [16, 32, 48, 64, 32, 16]
    plan = plan_edgesplit(PlanningProblem.build(PROFILE, sc, samples=samples, server_round=3))
    cost = priced(plan, sc, scheme="psl", samples=samples, timing=ServerTiming.PER_CLIENT, server_round=3)
    assert plan.scheme == "psl" and plan.server_timing == "per-client"
    assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-9)
    assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)
    assert "objective_latency_s" not in plan.details  # its own model is the price
    # The same through a PlanningProblem that admits empty clients.
    problem = PlanningProblem.build(PROFILE, sc, samples=samples, server_round=3, min_samples=0)
    again = plan_edgesplit(problem)
    assert again.cuts == plan.cuts and again.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
    with pytest.raises(ValueError, match="must be a PlanningProblem"):
        plan_edgesplit(PROFILE)


def test_open_reports_the_price_beside_its_own_latency():
    sc = scenario(4, ofdma=False)
    samples = [32, 32, 64, 16]
    planner = OpenPlanner(PlanningProblem.build(PROFILE, sc, samples=samples), energy_budget_j=[0.05] * 4, V=1.0)
    for r in range(3):
        plan = planner.plan(r)
        cost = priced(plan, sc, scheme="psl", samples=samples, timing=ServerTiming.PER_CLIENT, server_round=r)
        assert plan.scheme == "psl" and plan.server_timing == "per-client"
        assert plan.details["priced_latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-9)
        assert plan.details["priced_energy_j"] == pytest.approx(cost.total_energy_j, rel=1e-9)
        assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)
        # OPEN's own latency leaves out the gradients' downlink: the price is later.
        assert cost.round_latency_s > plan.latency_s


@pytest.mark.parametrize("phi", [0.0, 0.5])
@pytest.mark.parametrize("budget", [None, "tight"])
def test_epsl_reports_the_price(phi, budget):
    sc = scenario(4)
    budgets = None
    if budget:
        free = plan_epsl(PlanningProblem.build(PROFILE, sc, samples=[32] * 4), phi=phi)
        budgets = [0.9 * e for e in free.details["energy_per_client_j"]]
    plan = plan_epsl(PlanningProblem.build(PROFILE, sc, samples=[32] * 4, server_round=1), phi=phi, energy_budget_j=budgets)
    cost = priced(plan, sc, scheme="epsl", samples=[32] * 4, timing=ServerTiming.AFTER_CLIENTS, phi=phi,
                  server_round=1)
    assert plan.scheme == "epsl" and plan.server_timing == "after-clients"
    assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-9)
    assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)
    if budgets is not None:
        assert plan.details["power_step"]["status"] in ("optimal", "optimal_inaccurate")
        assert all(c.energy_j <= b for c, b in zip(cost.clients, budgets))


@pytest.mark.parametrize("budget", [None, 0.8])
def test_sflga_allocation_reports_the_price(budget):
    sc = scenario(5, ofdma=False)
    samples = [16, 32, 32, 48, 16]
    budgets = None
    problem = PlanningProblem.build(PROFILE, sc, samples=samples, server_round=4)
    if budget:
        free = allocate_sflga(problem, cut=2)
        budgets = [budget * e for e in free.details["energy_per_client_j"]]
    plan = allocate_sflga(problem, cut=2, energy_budget_j=budgets)
    cost = priced(plan, sc, scheme="sflga", samples=samples, timing=ServerTiming.AFTER_CLIENTS, server_round=4)
    assert plan.scheme == "sflga" and plan.server_timing == "after-clients"
    assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-9)
    assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)


def test_ccc_planner_reports_the_price():
    sc = scenario(3, ofdma=False)
    samples = [32, 16, 48]
    problem = PlanningProblem.build(PROFILE, sc, samples=samples)
    agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=3), episodes=2, seed=0)
    planner = CCCPlanner(agent, problem)
    for r in range(3):
        plan = planner.plan(r)
        cost = priced(plan, sc, scheme="sflga", samples=samples, timing=ServerTiming.AFTER_CLIENTS, server_round=r)
        assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-9)
        assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)


# --- fast paths against the slow ones, 200 clients ---------------------------------------------


def test_edgesplit_newton_path_equals_the_bisection_loop_at_200_clients(monkeypatch):
    n = 200
    sc = scenario(n, ofdma=False)
    samples = [16 + 8 * (i % 7) for i in range(n)]
    fast = plan_edgesplit(PlanningProblem.build(PROFILE, sc, samples=samples, server_round=1))
    monkeypatch.setattr("flsplit.planners.edgesplit._VECTORISE_FROM", 10**9)  # the per-client bisections
    slow = plan_edgesplit(PlanningProblem.build(PROFILE, sc, samples=samples, server_round=1))
    assert fast.cuts == slow.cuts
    assert fast.bandwidth_hz == pytest.approx(slow.bandwidth_hz, rel=1e-9)
    assert fast.latency_s == pytest.approx(slow.latency_s, rel=1e-12)
    assert fast.energy_j == pytest.approx(slow.energy_j, rel=1e-12)


def _exhaustive_descent(planner: OpenPlanner, a, w, e, choice):
    """OPEN's coordinate descent solving every trial (the implementation before the bounds)."""
    n, k = a.shape
    best = float(planner._objective(a, w, e, choice[None, :])[0])
    sweeps, improved = 0, True
    while improved and sweeps < 100:
        improved = False
        sweeps += 1
        for i in range(n):
            trial = np.repeat(choice[None, :], k, axis=0)
            trial[:, i] = np.arange(k)
            values = planner._objective(a, w, e, trial)
            j = int(np.argmin(values))
            if values[j] < best * (1 - 1e-12) - 1e-300 and j != choice[i]:
                choice, best, improved = trial[j], float(values[j]), True
    return choice, sweeps


@pytest.mark.parametrize("V", [1.0, 0.01])
def test_open_bounded_descent_equals_the_exhaustive_one_at_200_clients(V):
    n = 200
    sc = scenario(n, ofdma=False)
    samples = [16 + 8 * (i % 5) for i in range(n)]
    rng = np.random.default_rng(0)
    queues = list(rng.uniform(0, 50, size=n))
    planner = OpenPlanner(PlanningProblem.build(PROFILE, sc, samples=samples), energy_budget_j=[0.05] * n, V=V,
                          initial_queues=queues)
    for r in range(2):
        terms = planner.round_terms(r)
        a, w, e = terms["ready_s"], terms["server_s"], terms["energy_j"]
        start = np.argmin(a + w, axis=1)
        ref, _ = _exhaustive_descent(planner, a, w, e, start.copy())
        plan = planner.plan(r)
        assert plan.details["search"] == "coordinate-descent"
        assert plan.cuts == [planner.candidate_cuts[j] for j in ref]
