"""The OPEN (ASL) planner against brute force, the min-max KKT conditions and its long-term behaviour.

Reference values are computed here from the model's formulas (DESIGN.md 3.6), not read off the
planner: PL(dB) = 128.1 + 37.6 log10(d_km), g = 10^(-PL/10) |h|^2 with |h|^2 from
``rayleigh_power(seed, round, id)``, N0 = 10^((-174 - 30)/10) W/Hz, rate = B log2(1 + p g / (B N0))
with B = total band / N, compute time F / (c f), compute energy kappa f^2 F / c, transmit
energy p * uplink time, server time with share s = server FLOPs / (s * server FLOP/s).
The optimal shares of the brute force come from a grid over the 2-simplex.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile, rayleigh_power
from flsplit.planners import Plan
from flsplit.planners.open import OpenPlanner, min_makespan_shares
from flsplit.planners.problem import PlanningProblem
from flsplit.model.profile import BlockProfile, ModelProfile

N0 = 10 ** ((-174 - 30) / 10)  # W/Hz
BAND = 20e6


def _open(profile, scenario, *, samples, client_ids=None, bytes_per_element=4.0, candidate_cuts=None, **options):
    """``OpenPlanner`` on the ``PlanningProblem`` of these clients."""
    problem = PlanningProblem.build(profile, scenario, samples=samples, client_ids=client_ids,
                                    bytes_per_element=bytes_per_element, candidate_cuts=candidate_cuts)
    return OpenPlanner(problem, **options)


def _gain(distance_m: float, seed: int, server_round: int, client_id: int) -> float:
    pl = 128.1 + 37.6 * math.log10(distance_m / 1000)
    return 10 ** (-pl / 10) * rayleigh_power(seed, server_round, client_id)


def _client_terms(blocks, device, seed, server_round, client_id, n_clients, samples, cut):
    """(a = compute + uplink time, w = server time with the whole server / its FLOP/s, energy) by hand."""
    client = blocks[:cut]
    flops = samples * sum(b.forward_flops + b.backward_flops for b in client)
    compute = flops / (device.cpu_hz * device.flops_per_cycle)
    b = BAND / n_clients
    rate = b * math.log2(1 + device.tx_power_w * _gain(device.distance_m, seed, server_round, client_id) / (b * N0))
    uplink = samples * client[-1].output_elements * 4 * 8 / rate
    energy = device.kappa * device.cpu_hz**2 * flops / device.flops_per_cycle + device.tx_power_w * uplink
    server = samples * sum(b.forward_flops + b.backward_flops for b in blocks[cut:])
    return compute + uplink, server, energy


def _simplex_grid(steps: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(1, steps), np.arange(1, steps), indexing="ij")
    keep = i + j < steps
    s1, s2 = i[keep] / steps, j[keep] / steps
    return np.stack([s1, s2, 1 - s1 - s2], axis=1)


GRID = _simplex_grid(300)


def _random_instance(seed: int):
    rng = np.random.default_rng(seed)
    fwd = rng.uniform(1e5, 1e7, size=5)
    blocks = [
        BlockProfile(float(f), float(2 * f), int(o), 0)
        for f, o in zip(fwd, rng.integers(10, 20000, size=5))
    ]
    devices = tuple(
        DeviceProfile(
            cpu_hz=float(rng.uniform(0.5e9, 2e9)),
            flops_per_cycle=4,
            kappa=float(rng.uniform(1e-29, 1e-27)),
            tx_power_w=float(rng.uniform(0.1, 0.2)),
            distance_m=float(rng.uniform(50, 400)),
        )
        for _ in range(3)
    )
    server = ServerProfile(cpu_hz=float(rng.uniform(5e9, 30e9)), flops_per_cycle=4, tx_power_w=1.0)
    scenario = Scenario(devices, server, Channel(bandwidth_hz=BAND, fading="rayleigh"), seed=seed)
    samples = [int(s) for s in rng.integers(16, 128, size=3)]
    queues = [float(q) for q in rng.uniform(0, 20, size=3)]
    V = float(rng.uniform(0.1, 10))
    return blocks, scenario, samples, queues, V


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force(seed):
    blocks, scenario, samples, queues, V = _random_instance(seed)
    server_round = seed + 1
    planner = _open(
        ModelProfile(blocks), scenario, energy_budget_j=[1.0] * 3, V=V, samples=samples, initial_queues=queues
    )
    assert planner.candidate_cuts == [1, 2, 3, 4]
    plan = planner.plan(server_round)

    server_speed = scenario.server.cpu_hz * scenario.server.flops_per_cycle
    best = math.inf
    for cuts in itertools.product([1, 2, 3, 4], repeat=3):
        terms = [
            _client_terms(blocks, scenario.devices[i], seed, server_round, i, 3, samples[i], cuts[i]) for i in range(3)
        ]
        a = np.array([t[0] for t in terms])
        w = np.array([t[1] for t in terms]) / server_speed
        energy = sum(q * t[2] for q, t in zip(queues, terms))
        makespan = (a[None, :] + w[None, :] / GRID).max(axis=1).min()
        best = min(best, V * makespan + energy)

    assert plan.details["objective"] == pytest.approx(best, rel=0.01)
    assert plan.details["objective"] <= best * (1 + 1e-9)  # exact shares beat the grid
    # The objective is what the plan reports: V * latency + sum Q_i E_i.
    recomputed = V * plan.latency_s + sum(q * e for q, e in zip(queues, plan.details["energy_per_client_j"]))
    assert plan.details["objective"] == pytest.approx(recomputed, rel=1e-12)
    # The plan's own cuts, recomputed by hand.
    terms = [
        _client_terms(blocks, scenario.devices[i], seed, server_round, i, 3, samples[i], plan.cuts[i]) for i in range(3)
    ]
    assert plan.details["energy_per_client_j"] == pytest.approx([t[2] for t in terms], rel=1e-9)
    assert plan.energy_j == pytest.approx(sum(t[2] for t in terms), rel=1e-9)


def test_inner_allocation_equalises_finishing_times():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7):
        for _ in range(20):
            a = rng.uniform(0, 2, size=n)
            w = rng.uniform(0.01, 3, size=n)
            t, shares = min_makespan_shares(a, w)
            finish = a + w / shares
            assert np.all(shares > 0)
            assert shares.sum() == pytest.approx(1.0, abs=1e-12)
            assert np.max(np.abs(finish - t)) <= 1e-6 * t
            # KKT of the min-max: moving CPU from any client to another makes that one later.
            for i, j in itertools.permutations(range(n), 2):
                moved = shares.copy()
                moved[i] -= 1e-3 * shares[i]
                moved[j] += 1e-3 * shares[i]
                assert (a + w / moved).max() > t
    # A client without server work: it finishes at a_i; every share stays > 0.
    t, shares = min_makespan_shares([5.0, 0.1, 0.2], [0.0, 1.0, 1.0])
    assert t == pytest.approx(5.0)
    assert np.all(shares > 0) and shares.sum() == pytest.approx(1.0)
    assert np.all(np.array([0.1, 0.2]) + 1.0 / shares[1:] <= 5.0 + 1e-12)


def test_plan_fields_and_queue_update():
    blocks, scenario, samples, _, _ = _random_instance(99)
    planner = _open(ModelProfile(blocks), scenario, energy_budget_j=[0.01, 0.02, 0.03], V=1.0, samples=samples)
    q0 = planner.queues
    plan = planner.plan(0)
    assert isinstance(plan, Plan) and plan.method == "asl"
    assert len(plan.cuts) == 3 and all(1 <= k <= 4 for k in plan.cuts)
    assert sum(plan.server_cpu_share) == pytest.approx(1.0) and min(plan.server_cpu_share) > 0
    finish = np.array(plan.details["finish_s"])
    assert plan.latency_s == pytest.approx(finish.max(), rel=1e-9)
    e = np.array(plan.details["energy_per_client_j"])
    assert plan.details["queues_before"] == q0.tolist()
    assert plan.details["queues_after"] == pytest.approx(np.maximum(q0 + e - [0.01, 0.02, 0.03], 0).tolist())
    assert planner.queues.tolist() == plan.details["queues_after"]
    plan.as_dict()  # JSON-able


# --- long-term behaviour under fading -------------------------------------------------------------

# Compute is cheap in energy (kappa f^3 = 0.02 W) and transmitting costs 0.2 W: the early cuts,
# with large smashed data, are fast but spend energy; the deep cuts save energy but are slow.
TRADEOFF_BLOCKS = [
    BlockProfile(f, 2 * f, o, 0) for f, o in [(2e6, 12000), (8e6, 4000), (8e6, 1000), (4e6, 200), (1e6, 10)]
]
TRADEOFF_SCENARIO = Scenario(
    tuple(DeviceProfile(1e9, 4, 2e-29, 0.2, d) for d in (100, 200, 300)),
    ServerProfile(10e9, 4, 1.0),
    Channel(bandwidth_hz=BAND, fading="rayleigh"),
    seed=3,
)
ROUNDS = 200


def _run(V: float, budgets) -> tuple[float, np.ndarray]:
    planner = _open(
        ModelProfile(TRADEOFF_BLOCKS), TRADEOFF_SCENARIO, energy_budget_j=list(budgets), V=V, samples=[64] * 3
    )
    plans = [planner.plan(r) for r in range(ROUNDS)]
    return float(np.mean([p.latency_s for p in plans])), np.mean([p.details["energy_per_client_j"] for p in plans], 0)


def test_long_term_energy_budget_and_V_tradeoff():
    # Per-round energy of each cut, by hand; the budget lies halfway between the cheapest cut
    # and the cut that minimises the client's own chain (a + w), on average over the rounds.
    speed = 10e9 * 4
    e_min, e_fast = np.zeros(3), np.zeros(3)
    for r in range(ROUNDS):
        for i in range(3):
            terms = [
                _client_terms(TRADEOFF_BLOCKS, TRADEOFF_SCENARIO.devices[i], 3, r, i, 3, 64, k) for k in (1, 2, 3, 4)
            ]
            e_min[i] += min(t[2] for t in terms) / ROUNDS
            e_fast[i] += min(terms, key=lambda t: t[0] + t[1] / speed)[2] / ROUNDS
    assert np.all(e_fast > 1.5 * e_min)  # a real trade-off
    budgets = 0.5 * (e_min + e_fast)

    lat_small, energy_small = _run(0.01, budgets)
    lat_large, energy_large = _run(1.0, budgets)
    assert np.all(energy_small <= 1.05 * budgets), energy_small / budgets
    assert lat_large < lat_small
    assert energy_large.sum() > energy_small.sum()


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"energy_budget_j": [1.0, 0.0, 1.0]}, "energy_budget_j"),
        ({"energy_budget_j": [1.0, -1.0, 1.0]}, "energy_budget_j"),
        ({"energy_budget_j": [1.0, 1.0]}, "energy_budget_j"),
        ({"V": -0.5}, "V"),
        ({"samples": [8, 8]}, "energy_budget_j"),
        ({"samples": [8, 0, 8]}, "samples"),
        ({"client_ids": [0, 1]}, "client_ids"),
        ({"candidate_cuts": [1, 5]}, "outside the model"),
        ({"candidate_cuts": [0, 2]}, "outside the model"),
        ({"initial_queues": [0.0, 1.0]}, "initial_queues"),
        ({"bytes_per_element": 0}, "bytes_per_element"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"energy_budget_j": [1.0] * 3, "V": 1.0, "samples": [8] * 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        _open(ModelProfile(TRADEOFF_BLOCKS), TRADEOFF_SCENARIO, **args)


def test_bad_round():
    planner = _open(
        ModelProfile(TRADEOFF_BLOCKS), TRADEOFF_SCENARIO, energy_budget_j=[1.0] * 3, V=1.0, samples=[8] * 3
    )
    with pytest.raises(ValueError, match="server_round"):
        planner.plan(-1)


def test_coordinate_descent_on_large_problems_is_close_to_enumeration():
    blocks, scenario, samples, queues, V = _random_instance(5)
    kwargs = dict(energy_budget_j=[1.0] * 3, V=V, samples=samples, initial_queues=queues)
    exact = _open(ModelProfile(blocks), scenario, **kwargs).plan(2)
    descent = _open(ModelProfile(blocks), scenario, max_enumeration=1, **kwargs).plan(2)
    assert descent.details["search"] == "coordinate-descent" and exact.details["search"] == "enumeration"
    assert exact.details["objective"] <= descent.details["objective"] * (1 + 1e-12)
    assert descent.details["objective"] <= 1.1 * exact.details["objective"]


@pytest.mark.parametrize("seed", range(10))
def test_coordinate_descent_reaches_the_enumerated_optimum(seed):
    """Beyond ``max_enumeration`` combinations the planner searches client by client; on 5
    clients x 6 cuts (7,776 combinations, enumerated here as the reference) it lands on the
    optimum. The enumeration is checked against independent brute force above."""
    rng = np.random.default_rng(seed)
    blocks = [
        BlockProfile(
            forward_flops=float(10 ** rng.uniform(5.5, 7.5)),
            backward_flops=float(10 ** rng.uniform(5.5, 7.8)),
            output_elements=int(10 ** rng.uniform(2.0, 4.0)),
            param_bytes=1000,
        )
        for _ in range(7)
    ]
    devices = tuple(
        DeviceProfile(cpu_hz=float(rng.uniform(0.5e9, 2e9)), flops_per_cycle=4, kappa=1e-28,
                      tx_power_w=float(rng.uniform(0.1, 0.2)), distance_m=float(rng.uniform(50, 250)))
        for _ in range(5)
    )
    scenario = Scenario(devices, ServerProfile(cpu_hz=20e9, flops_per_cycle=4, tx_power_w=1.0),
                        Channel(bandwidth_hz=BAND), seed=seed)
    kwargs = dict(
        energy_budget_j=list(rng.uniform(0.001, 0.01, 5)), V=float(rng.uniform(0.001, 0.1)),
        samples=[int(s) for s in rng.integers(16, 128, 5)], initial_queues=list(rng.uniform(0, 0.5, 5)),
    )
    searched = _open(ModelProfile(blocks), scenario, max_enumeration=100, **kwargs).plan(seed)
    enumerated = _open(ModelProfile(blocks), scenario, max_enumeration=10**5, **kwargs).plan(seed)
    assert searched.details["search"] == "coordinate-descent"
    assert enumerated.details["search"] == "enumeration"
    assert searched.details["objective"] <= enumerated.details["objective"] * 1.01
