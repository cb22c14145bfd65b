"""CCC (SFL-GA) planner: the allocation against brute force and the cost model; the Double-DQN agent.

The references are computed here, independently of the planner: the SFL-GA round model is
written out from its definition (DESIGN.md 3.6 and the planner's docstring) in terms of the
bandwidth ``B``, CPU frequency ``f`` and power ``p`` (the planner works with the spectral
efficiency instead), the fading is drawn from numpy directly, and the allocations are checked
with ``tests.oracle.round_cost`` and ``tests.oracle.scheme_round_cost``. Brute force searches
client 0's share of the band on a grid (refined locally), splits the rest between clients 1
and 2 with a root finder (equal finishing times of two decreasing functions) and, under
energy budgets, searches each client's power on a two-level grid with the fastest clock the
remaining budget allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize_scalar

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile
from flsplit.planners.ccc import (
    CCCAgent,
    CCCEnvironment,
    CCCPlanner,
    allocate_sflga,
    train_ccc_agent,
)
from flsplit.planners.problem import PlanningProblem
from flsplit.model.profile import BlockProfile, ModelProfile
from tests.oracle import round_cost, scheme_round_cost

N0 = 10.0 ** ((-174.0 - 30.0) / 10.0)  # W/Hz

# --- the problem-based API, called with the problem's keywords --------------------------------


def allocate(profile, scenario, *, cut, energy_budget_j=None, solver="exact", **problem):
    """``allocate_sflga`` on ``PlanningProblem.build(profile, scenario, **problem)``."""
    return allocate_sflga(PlanningProblem.build(profile, scenario, **problem), cut=cut,
                          energy_budget_j=energy_budget_j, solver=solver)


def environment(profile, scenario, *, samples, client_ids=None, candidate_cuts=None, **options):
    """A ``CCCEnvironment`` of these clients and cuts."""
    problem = PlanningProblem.build(profile, scenario, samples=samples, client_ids=client_ids,
                                    candidate_cuts=candidate_cuts)
    return CCCEnvironment(problem, **options)


def train(profile, scenario, *, num_clients, samples, episodes, rounds_per_episode, seed, client_ids=None,
          candidate_cuts=None, min_client_depth=1, energy_budget_j=None, **agent_options):
    """``train_ccc_agent`` on ``environment(...)`` (``samples``: one for all or one per client)."""
    samples = [samples] * num_clients if isinstance(samples, int) else samples
    env = environment(profile, scenario, samples=samples, client_ids=client_ids, candidate_cuts=candidate_cuts,
                      min_client_depth=min_client_depth, num_rounds=rounds_per_episode,
                      energy_budget_j=energy_budget_j)
    return train_ccc_agent(env, episodes=episodes, seed=seed, **agent_options)


def ccc_planner(agent, profile, scenario, *, samples, energy_budget_j=None):
    """A ``CCCPlanner`` of these clients, the agent's cuts as the candidates."""
    problem = PlanningProblem.build(profile, scenario, samples=samples, candidate_cuts=agent.candidate_cuts)
    return CCCPlanner(agent, problem, energy_budget_j=energy_budget_j)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- random instances ------------------------------------------------------------------------


def random_instance(seed: int, num_clients: int = 3, num_blocks: int = 6, ofdma: bool = False):
    """A synthetic model, heterogeneous devices, a band and per-client samples."""
    rng = np.random.default_rng(seed)
    blocks = [
        BlockProfile(
            forward_flops=float(10 ** rng.uniform(5.5, 7.5)),
            backward_flops=float(10 ** rng.uniform(5.5, 7.8)),
            output_elements=int(10 ** rng.uniform(2.0, 4.0)),
            param_bytes=int(10 ** rng.uniform(3.0, 6.0)),
        )
        for _ in range(num_blocks)
    ]
    devices = tuple(
        DeviceProfile(
            cpu_hz=float(rng.uniform(0.5e9, 2e9)),
            flops_per_cycle=float(rng.choice([2.0, 4.0, 8.0])),
            kappa=float(10 ** rng.uniform(-28.5, -27.5)),
            tx_power_w=float(rng.uniform(0.1, 0.2)),
            distance_m=float(rng.uniform(50.0, 400.0)),
        )
        for _ in range(num_clients)
    )
    band = float(rng.uniform(1e6, 10e6))
    channel = Channel(num_subchannels=16, subchannel_bandwidth_hz=band / 16) if ofdma else Channel(bandwidth_hz=band)
    scenario = Scenario(
        devices=devices,
        server=ServerProfile(cpu_hz=20e9, flops_per_cycle=8.0, tx_power_w=1.0),
        channel=channel,
        seed=int(rng.integers(0, 1000)),
    )
    samples = [int(s) for s in rng.integers(16, 257, size=num_clients)]
    cut = int(rng.integers(1, num_blocks))
    return ModelProfile(blocks), scenario, samples, cut


# --- independent reference model -------------------------------------------------------------


def gain(scenario: Scenario, client_id: int, server_round: int) -> float:
    dev = scenario.devices[client_id % len(scenario.devices)]
    pl_db = 128.1 + 37.6 * math.log10(dev.distance_m / 1000.0)
    fading = np.random.default_rng([scenario.seed, server_round, client_id]).exponential(1.0)
    return 10 ** (-pl_db / 10) * fading


class Client:
    """One client's constants at a cut: cycles, uplink bits, gain, limits."""

    def __init__(self, profile, scenario, samples, cut, i, server_round=0, bpe=4.0):
        blocks, dev = profile.blocks, scenario.devices[i]
        self.cycles = samples * sum(b.forward_flops + b.backward_flops for b in blocks[:cut]) / dev.flops_per_cycle
        self.bits = samples * blocks[cut - 1].output_elements * bpe * 8
        self.g = gain(scenario, i, server_round)
        self.fmax, self.pmax, self.kappa = dev.cpu_hz, dev.tx_power_w, dev.kappa

    def rate(self, b, p):
        return b * np.log2(1.0 + p * self.g / (b * N0))

    def time(self, b, f, p):
        return self.cycles / f + self.bits / self.rate(b, p)

    def energy(self, b, f, p):
        return self.kappa * f**2 * self.cycles + p * self.bits / self.rate(b, p)


def fixed_terms(profile, scenario, samples, cut, server_round=0, bpe=4.0):
    """(broadcast seconds, server seconds): the parts of the latency no allocation changes."""
    total = scenario.channel.total_bandwidth_hz
    g_min = min(gain(scenario, i, server_round) for i in range(len(samples)))
    bc_bits = max(samples) * profile.blocks[cut - 1].output_elements * bpe * 8
    bc = bc_bits / (total * math.log2(1 + scenario.server.tx_power_w * g_min / (total * N0)))
    srv = sum(samples) * sum(b.forward_flops + b.backward_flops for b in profile.blocks[cut:])
    return bc, srv / (scenario.server.cpu_hz * scenario.server.flops_per_cycle)


_P_GRID = np.logspace(-8.0, 0.0, 400)
_P_FINE = np.linspace(0.0, 1.0, 401)


def best_time(c: Client, b: float, budget) -> float:
    """Fastest chain of a client with bandwidth ``b``: full clock and power without a budget;
    with one, the power searched on a two-level grid and the fastest clock the rest allows."""
    if budget is None:
        return float(c.time(b, c.fmax, c.pmax))

    def times(p):
        rate = c.rate(b, p)
        up = c.bits / rate
        room = budget - p * up
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.minimum(c.fmax, np.sqrt(np.maximum(room, 0.0) / (c.kappa * c.cycles)))
            return np.where(room > 0, c.cycles / f + up, np.inf)

    p = c.pmax * _P_GRID
    t = times(p)
    j = int(np.argmin(t))
    lo, hi = p[max(j - 1, 0)], p[min(j + 1, len(p) - 1)]
    return float(min(t[j], times(lo + (hi - lo) * _P_FINE).min()))


def brute_force(clients: list[Client], total: float, budgets) -> float:
    """Least makespan over bandwidth splits (3 clients; see the module docstring)."""
    budgets = budgets if budgets is not None else [None] * len(clients)
    big = 1e30

    def t(i, share):
        return min(best_time(clients[i], share * total, budgets[i]), big) if share > 0 else big

    def rest(r):  # clients 1 and 2 share r: equal finishing times (both decrease in their share)
        d = lambda s: t(1, s) - t(2, r - s)  # noqa: E731
        s = brentq(d, r * 1e-9, r * (1 - 1e-9), xtol=r * 1e-12, rtol=1e-12)
        return max(t(1, s), t(2, r - s))

    value = lambda s0: max(t(0, s0), rest(1.0 - s0))  # noqa: E731
    grid = np.linspace(0.01, 0.99, 50)
    vals = [value(s) for s in grid]
    j = int(np.argmin(vals))
    res = minimize_scalar(
        value, bounds=(grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]), method="bounded",
        options={"xatol": 1e-10},
    )
    return min(vals[j], res.fun)


def costmodel_check(plan, profile, scenario, samples, cut, server_round=0):
    """The plan priced by ``round_cost`` (devices at the planned clocks) and ``scheme_round_cost``."""
    ids = plan.details["client_ids"]
    clocked = scenario.with_devices(
        {c: replace(scenario.device(c), cpu_hz=f) for c, f in zip(ids, plan.details["cpu_hz"])}, num_clients=len(ids)
    )
    cp = profile.cut(cut)
    up = [s * cp.smashed_elements * 4.0 for s in samples]
    total = scenario.channel.total_bandwidth_hz
    shares = [b / total for b in plan.bandwidth_hz]
    rc = round_cost(
        clocked,
        client_ids=ids,
        client_flops=[s * (cp.client_forward_flops + cp.client_backward_flops) for s in samples],
        uplink_bytes=up,
        downlink_bytes=[0.0] * len(ids),
        server_flops=sum(samples) * (cp.server_forward_flops + cp.server_backward_flops),
        server_round=server_round,
        broadcast_bytes=max(up),
        bandwidth_shares=shares,
        tx_power_w=plan.tx_power_w,
    )
    sc = scheme_round_cost(
        profile, clocked, cuts=plan.cuts, samples=samples, client_ids=ids, server_round=server_round,
        scheme="sflga", bandwidth_shares=shares, tx_power_w=plan.tx_power_w,
    )
    return rc, sc


def budgets_for(plan, seed: int) -> list[float]:
    """Budgets between 40 % and 120 % of each client's energy in the unconstrained plan."""
    rng = np.random.default_rng(1000 + seed)
    return [e * float(rng.uniform(0.4, 1.2)) for e in plan.details["energy_per_client_j"]]


# --- allocation: brute force, KKT, cost model ------------------------------------------------


@pytest.mark.parametrize("with_budgets", [False, True], ids=["no-budget", "budgets"])
def test_allocation_matches_brute_force_on_20_random_instances(with_budgets):
    start = time.perf_counter()
    ratios, naive_gaps, binding = [], [], 0
    for seed in range(20):
        profile, scenario, samples, cut = random_instance(seed)
        free = allocate(profile, scenario, cut=cut, samples=samples)
        budgets = budgets_for(free, seed) if with_budgets else None
        plan = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
        clients = [Client(profile, scenario, samples[i], cut, i) for i in range(3)]
        total = scenario.channel.total_bandwidth_hz
        bc, srv = fixed_terms(profile, scenario, samples, cut)
        opt = brute_force(clients, total, budgets) + bc + srv

        # The plan is feasible and its latency is what its allocation achieves.
        f, p, b = plan.details["cpu_hz"], plan.tx_power_w, plan.bandwidth_hz
        assert sum(b) <= total * (1 + 1e-12)
        for i, c in enumerate(clients):
            assert 0 < f[i] <= c.fmax * (1 + 1e-12) and 0 < p[i] <= c.pmax * (1 + 1e-12)
            if budgets is not None:
                assert c.energy(b[i], f[i], p[i]) <= budgets[i] * (1 + 1e-9)
                binding += c.energy(b[i], f[i], p[i]) >= budgets[i] * (1 - 1e-6)
        achieved = max(c.time(b[i], f[i], p[i]) for i, c in enumerate(clients)) + bc + srv
        assert achieved == pytest.approx(plan.latency_s, rel=1e-9)
        # Within 1 % of brute force, and never worse than it (it is exact).
        assert plan.latency_s <= opt * (1 + 1e-6), f"seed {seed}: {plan.latency_s} vs brute force {opt}"
        assert plan.latency_s >= opt * 0.99, f"seed {seed}: {plan.latency_s} far below brute force {opt}"
        ratios.append(plan.latency_s / opt)
        equal = max(best_time(c, total / 3, None if budgets is None else budgets[i]) for i, c in enumerate(clients))
        naive_gaps.append((equal + bc + srv) / opt - 1)
        if with_budgets:
            assert plan.latency_s >= free.latency_s * (1 - 1e-12)  # budgets can only slow it down
    # The check has teeth: an equal split of the band (best clock and power) is clearly worse.
    assert sum(g > 0.01 for g in naive_gaps) >= 15, naive_gaps
    if with_budgets:
        assert binding >= 20, "the budgets should bind for many clients"
    print(f"worst ratio to brute force {max(ratios):.9f}, best {min(ratios):.9f}, "
          f"{time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_no_budget_kkt_equal_finish_times_full_band_full_clock_and_power(seed):
    profile, scenario, samples, cut = random_instance(seed, num_clients=5)
    plan = allocate(profile, scenario, cut=cut, samples=samples)
    clients = [Client(profile, scenario, samples[i], cut, i) for i in range(5)]
    total = scenario.channel.total_bandwidth_hz
    assert sum(plan.bandwidth_hz) == pytest.approx(total, rel=1e-12)
    assert plan.details["cpu_hz"] == [c.fmax for c in clients]
    assert plan.tx_power_w == [c.pmax for c in clients]
    times = [c.time(b, c.fmax, c.pmax) for c, b in zip(clients, plan.bandwidth_hz)]
    assert (max(times) - min(times)) / max(times) < 1e-9
    # Equal finishing times are optimal: moving bandwidth from any client to another makes
    # the donor slower than the common time.
    for i in range(5):
        b = list(plan.bandwidth_hz)
        b[i] *= 1 - 1e-6
        assert clients[i].time(b[i], clients[i].fmax, clients[i].pmax) > max(times)


@pytest.mark.parametrize("seed", [1, 2])
def test_budgeted_plan_has_equal_finish_times_and_meets_budgets(seed):
    profile, scenario, samples, cut = random_instance(seed, num_clients=4)
    free = allocate(profile, scenario, cut=cut, samples=samples)
    budgets = [0.6 * e for e in free.details["energy_per_client_j"]]
    plan = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
    clients = [Client(profile, scenario, samples[i], cut, i) for i in range(4)]
    f, p, b = plan.details["cpu_hz"], plan.tx_power_w, plan.bandwidth_hz
    times = [c.time(b[i], f[i], p[i]) for i, c in enumerate(clients)]
    assert (max(times) - min(times)) / max(times) < 1e-9
    energies = [c.energy(b[i], f[i], p[i]) for i, c in enumerate(clients)]
    assert energies == pytest.approx(budgets, rel=1e-9)  # 60 % of the free energy: all bind
    assert plan.latency_s > free.latency_s
    assert sum(b) == pytest.approx(scenario.channel.total_bandwidth_hz, rel=1e-12)


def test_random_budgets_give_equal_finish_times_and_per_client_optimality():
    """Equal finishing times, a full band and no client able to finish earlier with its own
    bandwidth (any clock and power within its budget) together mean the makespan is optimal:
    any other split gives some client less bandwidth. Budgets range from just above the
    Shannon-limit energy (very slow rounds) to non-binding; some clients have none."""
    rng = np.random.default_rng(7)
    checked = 0
    for seed in range(40):
        n = int(rng.integers(2, 7))
        profile, scenario, samples, cut = random_instance(100 + seed, num_clients=n, ofdma=bool(seed % 2))
        server_round = seed % 5
        free = allocate(profile, scenario, cut=cut, samples=samples, server_round=server_round)
        clients = [Client(profile, scenario, samples[i], cut, i, server_round=server_round) for i in range(n)]
        e0 = [c.bits * N0 * math.log(2) / c.g for c in clients]
        budgets = []
        for i in range(n):
            kind = int(rng.integers(0, 3))
            if kind == 0:
                budgets.append(None)
            elif kind == 1:
                budgets.append(e0[i] * (1 + 10 ** rng.uniform(-3, 1)))
            else:
                budgets.append(free.details["energy_per_client_j"][i] * float(rng.uniform(0.05, 1.5)))
        plan = allocate(profile, scenario, cut=cut, samples=samples, server_round=server_round,
                              energy_budget_j=budgets)
        f, p, b = plan.details["cpu_hz"], plan.tx_power_w, plan.bandwidth_hz
        times = [c.time(b[i], f[i], p[i]) for i, c in enumerate(clients)]
        makespan = max(times)
        assert (makespan - min(times)) / makespan < 1e-9, seed
        assert sum(b) == pytest.approx(scenario.channel.total_bandwidth_hz, rel=1e-12)
        for i, c in enumerate(clients):
            assert best_time(c, b[i], budgets[i]) >= makespan * (1 - 1e-7), (seed, i)
            if budgets[i] is not None:
                assert c.energy(b[i], f[i], p[i]) <= budgets[i] * (1 + 1e-9), (seed, i)
        checked += 1
    assert checked == 40


@pytest.mark.parametrize(("seed", "ofdma", "with_budgets"), [(3, False, False), (4, True, False), (6, False, True),
                                                             (8, True, True)])
def test_prediction_equals_the_cost_model(seed, ofdma, with_budgets):
    profile, scenario, samples, cut = random_instance(seed, num_clients=4, ofdma=ofdma)
    ids = [7, 2, 5, 0]
    scenario = scenario.with_devices({7: scenario.devices[3], 5: scenario.devices[1]}, num_clients=8)
    kwargs = dict(cut=cut, samples=samples, client_ids=ids, server_round=3)
    budgets = None
    if with_budgets:
        free = allocate(profile, scenario, **kwargs)
        budgets = [0.7 * e for e in free.details["energy_per_client_j"]]
    plan = allocate(profile, scenario, energy_budget_j=budgets, **kwargs)
    rc, sc = costmodel_check(plan, profile, scenario, samples, cut, server_round=3)
    for priced in (rc, sc):
        assert priced.round_latency_s == pytest.approx(plan.latency_s, rel=1e-6)
        assert priced.total_energy_j == pytest.approx(plan.energy_j, rel=1e-6)
        assert [c.energy_j for c in priced.clients] == pytest.approx(plan.details["energy_per_client_j"], rel=1e-6)
        assert [c.latency_s for c in priced.clients] == pytest.approx(plan.details["client_latency_s"], rel=1e-6)
    assert plan.method == "ccc" and plan.cuts == [cut] * 4
    assert plan.details["ofdma_relaxed"] is ofdma
    assert plan.details["broadcast_s"] == pytest.approx(rc.broadcast_latency_s, rel=1e-12)


def test_infinite_and_none_budgets_equal_the_unconstrained_plan():
    profile, scenario, samples, cut = random_instance(9)
    free = allocate(profile, scenario, cut=cut, samples=samples)
    for budgets in ([None, None, None], math.inf, [1e9, None, math.inf]):
        plan = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
        assert plan.latency_s == pytest.approx(free.latency_s, rel=1e-9)
        assert plan.bandwidth_hz == pytest.approx(free.bandwidth_hz, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 4, 12])
def test_cvxpy_program_agrees_without_budgets_and_bounds_with_them(seed):
    profile, scenario, samples, cut = random_instance(seed)
    exact = allocate(profile, scenario, cut=cut, samples=samples)
    convex = allocate(profile, scenario, cut=cut, samples=samples, solver="cvxpy")
    assert convex.latency_s == pytest.approx(exact.latency_s, rel=1e-5)
    assert convex.latency_s >= exact.latency_s * (1 - 1e-9)
    budgets = [1.1 * e for e in exact.details["energy_per_client_j"]]
    budgets[0] *= 0.7
    with_b = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
    try:
        convex_b = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets, solver="cvxpy")
    except ValueError as err:  # power at its maximum cannot meet the budget at all
        assert "energy_budget_j" in str(err)
    else:
        assert convex_b.latency_s >= with_b.latency_s * (1 - 1e-7)  # fixing the power can only hurt
        assert all(e <= b * (1 + 1e-5) for e, b in zip(convex_b.details["energy_per_client_j"], budgets))


# --- bad input -------------------------------------------------------------------------------


def _bad_band(value: float) -> Scenario:
    """A scenario whose channel bandwidth was forced past Channel's own check."""
    _, scenario, _, _ = random_instance(0)
    channel = Channel(bandwidth_hz=1e6)
    object.__setattr__(channel, "bandwidth_hz", value)
    return Scenario(scenario.devices, scenario.server, channel)


@pytest.mark.parametrize("value", [0.0, -1e6, math.nan])
def test_rejects_zero_bandwidth(value):
    profile, _, samples, cut = random_instance(0)
    with pytest.raises(ValueError, match="bandwidth"):
        allocate(profile, _bad_band(value), cut=cut, samples=samples)


def test_infeasible_budget_names_the_client():
    profile, scenario, samples, cut = random_instance(2)
    clients = [Client(profile, scenario, samples[i], cut, i) for i in range(3)]
    e0 = clients[1].bits * N0 * math.log(2) / clients[1].g  # the Shannon-limit energy
    free = allocate(profile, scenario, cut=cut, samples=samples)
    budgets = list(free.details["energy_per_client_j"])
    budgets[1] = 0.99 * e0
    with pytest.raises(ValueError, match=r"energy_budget_j\[1\].*client 1"):
        allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
    budgets[1] = 1.001 * e0  # just above: feasible, slowly
    plan = allocate(profile, scenario, cut=cut, samples=samples, energy_budget_j=budgets)
    assert math.isfinite(plan.latency_s) and plan.latency_s > free.latency_s
    assert plan.details["energy_per_client_j"][1] <= budgets[1] * (1 + 1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cut": 0}, "outside the model"),
        ({"cut": 6}, "outside the model"),
        ({"cut": 2.5}, "outside the model"),
        ({"samples": []}, "samples"),
        ({"samples": [32, 0, 32]}, r"samples\[1\]"),
        ({"samples": [32, 32, 32], "client_ids": [0, 1]}, "client_ids"),
        ({"client_ids": [0, 0, 1]}, "distinct"),
        ({"bytes_per_element": 0.0}, "bytes_per_element"),
        ({"energy_budget_j": [1.0, -1.0, 1.0]}, r"energy_budget_j\[1\]"),
        ({"energy_budget_j": [1.0, math.nan, 1.0]}, r"energy_budget_j\[1\]"),
        ({"energy_budget_j": [1.0, 1.0]}, "energy_budget_j"),
        ({"server_round": -1}, "server_round"),
        ({"solver": "magic"}, "solver"),
    ],
)
def test_allocation_rejects_bad_input(kwargs, match):
    profile, scenario, samples, _ = random_instance(0)
    args = {"cut": 2, "samples": samples, **kwargs}
    with pytest.raises(ValueError, match=match):
        allocate(profile, scenario, **args)


def test_never_a_nan_plan_on_extreme_instances():
    for seed in range(12):
        profile, scenario, samples, cut = random_instance(seed, num_clients=6)
        devices = list(scenario.devices)
        devices[0] = replace(devices[0], distance_m=5000.0)  # far away: a weak, saturating link
        devices[1] = replace(devices[1], cpu_hz=1e6)  # a very slow CPU
        scenario = Scenario(tuple(devices), scenario.server, scenario.channel, scenario.seed)
        samples = [samples[0] * 50, *samples[1:]]
        for r in range(3):
            plan = allocate(profile, scenario, cut=cut, samples=samples, server_round=r)
            values = [plan.latency_s, plan.energy_j, *plan.bandwidth_hz, *plan.tx_power_w, *plan.details["cpu_hz"]]
            assert all(math.isfinite(v) and v > 0 for v in values)
            budgets = [2 * e for e in plan.details["energy_per_client_j"]]
            budgets[1] = plan.details["energy_per_client_j"][1] * 0.5
            planned = allocate(profile, scenario, cut=cut, samples=samples, server_round=r,
                                     energy_budget_j=budgets)
            values = [planned.latency_s, planned.energy_j, *planned.bandwidth_hz, *planned.tx_power_w]
            assert all(math.isfinite(v) and v > 0 for v in values)


# --- the agent: Double-DQN target, learning, persistence --------------------------------------


def _numpy_q(net, states: np.ndarray) -> np.ndarray:
    """An MLP's Q-values computed by hand from its weights (ReLU between layers)."""
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    x = states.astype(np.float64)
    for i, lin in enumerate(layers):
        x = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def test_double_dqn_target_by_hand_with_masked_actions():
    agent = CCCAgent(num_clients=2, candidate_cuts=[1, 2, 3, 4], min_client_depth=2, hidden=[8], gamma=0.8, seed=3)
    with torch.no_grad():
        # The masked action dominates the online net; the online and target nets disagree on
        # the best allowed action, so Double DQN differs from plain DQN and from ignoring the mask.
        agent.online[-1].bias.copy_(torch.tensor([100.0, 0.0, 5.0, 0.0]))
        agent.target[-1].bias.copy_(torch.tensor([0.0, 7.0, 0.0, 3.0]))
    rng = np.random.default_rng(0)
    next_states = rng.normal(size=(6, 4)).astype(np.float32)
    rewards = rng.normal(size=6).astype(np.float32)
    dones = np.array([0, 1, 0, 0, 1, 0], dtype=np.float32)
    y = agent.double_dqn_targets(rewards, next_states, dones).numpy()

    q_on, q_tg = _numpy_q(agent.online, next_states), _numpy_q(agent.target, next_states)
    allowed = np.array([False, True, True, True])
    best = np.argmax(np.where(allowed, q_on, -np.inf), axis=1)
    expected = rewards + 0.8 * (1 - dones) * q_tg[np.arange(6), best]
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert np.all(best == 2)
    # Teeth: the unmasked argmax and plain DQN's max give other values.
    plain = rewards + 0.8 * (1 - dones) * q_tg[:, allowed].max(axis=1)
    unmasked = rewards + 0.8 * (1 - dones) * q_tg[np.arange(6), np.argmax(q_on, axis=1)]
    assert not np.allclose(y, plain) and not np.allclose(y, unmasked)
    # Greedy and epsilon-greedy actions never pick the masked action.
    assert agent.greedy(next_states[0]) == 2
    assert all(agent.act(next_states[0], 1.0, rng) != 0 for _ in range(200))


def learning_instance():
    """Five blocks: cut 1 is the fastest but masked (min depth 2); cut 2 clearly best allowed."""
    blocks = [
        BlockProfile(forward_flops=1e5, backward_flops=1e5, output_elements=16, param_bytes=400),
        BlockProfile(forward_flops=2e5, backward_flops=2e5, output_elements=64, param_bytes=400),
        BlockProfile(forward_flops=5e8, backward_flops=1e9, output_elements=50_000, param_bytes=2_000_000),
        BlockProfile(forward_flops=1e8, backward_flops=2e8, output_elements=20_000, param_bytes=1_000_000),
        BlockProfile(forward_flops=1e4, backward_flops=2e4, output_elements=10, param_bytes=4000),
    ]
    devices = tuple(
        DeviceProfile(cpu_hz=1e9, flops_per_cycle=4.0, kappa=1e-28, tx_power_w=0.2, distance_m=d)
        for d in (100.0, 200.0, 300.0)
    )
    scenario = Scenario(devices, ServerProfile(cpu_hz=20e9, flops_per_cycle=8.0, tx_power_w=1.0),
                        Channel(bandwidth_hz=5e6), seed=11)
    return ModelProfile(blocks), scenario


def test_environment_state_reward_and_loss_model_by_hand():
    profile, scenario = learning_instance()
    env = environment(profile, scenario, samples=[32, 16, 48], min_client_depth=2, num_rounds=4,
                         w_lat=2.0, w_conv=3.0, eta=0.2, rho=0.7)
    # latency_ref: the best allowed cut's optimal latency without fading.
    still = Scenario(scenario.devices, scenario.server, replace(scenario.channel, fading="none"), scenario.seed)
    ref = min(allocate(profile, still, cut=k, samples=[32, 16, 48]).latency_s for k in (2, 3, 4))
    assert env.latency_ref == pytest.approx(ref, rel=1e-9)
    total = sum(b.param_bytes for b in profile.blocks)
    frac = {k: sum(b.param_bytes for b in profile.blocks[:k]) / total for k in (2, 3, 4)}
    pl = [10 ** (-(128.1 + 37.6 * math.log10(d.distance_m / 1000)) / 10) for d in scenario.devices]
    mu = float(np.mean(np.log(pl))) - 0.5772156649015329
    sigma = math.pi / math.sqrt(6)
    state = env.reset(episode=3)
    loss = 1.0
    for t, action in enumerate([1, 2, 1, 3]):
        key = 3 * 4 + t  # episode 3, round t
        gains = [gain(scenario, i, key) for i in range(3)]
        expected = [(math.log(g) - mu) / sigma for g in gains] + [t / 4, loss]
        assert state == pytest.approx(np.array(expected, dtype=np.float32), rel=1e-5, abs=1e-6)
        k = env.candidate_cuts[action]
        lat = allocate(profile, scenario, cut=k, samples=[32, 16, 48], server_round=key).latency_s
        loss = loss * (1 - 0.2 * (1 - 0.7 * frac[k]))
        assert env.reward_of(action) == pytest.approx(-(2.0 * lat / ref + 3.0 * loss), rel=1e-9)
        state, reward, done, info = env.step(action)
        assert reward == pytest.approx(-(2.0 * lat / ref + 3.0 * loss), rel=1e-9)
        assert info["latency_s"] == pytest.approx(lat, rel=1e-12) and info["cut"] == k
        assert done == (t == 3)


def test_environment_penalises_an_infeasible_cut_and_does_not_train():
    profile, scenario = learning_instance()
    c3 = [Client(profile, scenario, 32, 3, i, server_round=0) for i in range(3)]
    budgets = [0.5 * c.bits * N0 * math.log(2) / c.g for c in c3]  # cut 3 can never meet these
    env = environment(profile, scenario, samples=[32] * 3, min_client_depth=2, num_rounds=3,
                         energy_budget_j=budgets, infeasible_penalty=10.0)
    env.reset(0)
    assert math.isinf(env.latency(2)) and math.isfinite(env.latency(1))
    state, reward, _, info = env.step(2)  # cut 3
    assert not info["feasible"] and reward == pytest.approx(-(10.0 + 1.0)) and info["loss"] == 1.0
    _, reward, _, info = env.step(1)  # cut 2: feasible
    assert info["feasible"] and info["loss"] < 1.0 and reward > -(10.0 + 1.0)


def test_agent_learns_the_best_allowed_cut_and_never_picks_a_masked_one():
    profile, scenario = learning_instance()
    start = time.perf_counter()
    agent = train(profile, scenario, num_clients=3, samples=32, episodes=40, rounds_per_episode=10,
                            seed=0, min_client_depth=2, batch_size=32, target_sync=50)
    elapsed = time.perf_counter() - start
    env = environment(profile, scenario, samples=[32] * 3, min_client_depth=2, num_rounds=10)
    assert env.candidate_cuts == [1, 2, 3, 4] and env.allowed.tolist() == [False, True, True, True]
    # Cut 1 really is the fastest: the mask, not the reward, keeps the agent off it.
    env.reset(500)
    assert env.latency(0) < min(env.latency(j) for j in (1, 2, 3))
    greedy_total = oracle_total = 0.0
    hits = rounds = 0
    for episode in range(500, 505):
        state = env.reset(episode)
        done = False
        while not done:
            rewards = {j: env.reward_of(j) for j in (1, 2, 3)}
            oracle = max(rewards, key=rewards.get)
            action = agent.greedy(state)
            assert agent.allowed[action]
            hits += action == oracle
            rounds += 1
            oracle_total += rewards[oracle]
            state, reward, done, info = env.step(action)
            greedy_total += reward
            assert info["cut"] >= 2
    assert hits >= 0.9 * rounds
    assert greedy_total >= oracle_total * 1.05  # rewards are negative: within 5 %
    with pytest.raises(ValueError, match="masked"):
        env.step(0)
    print(f"trained in {elapsed:.2f} s; greedy {greedy_total:.3f} vs oracle {oracle_total:.3f}, {hits}/{rounds}")


def test_training_is_deterministic_and_leaves_global_rng_alone():
    profile, scenario = learning_instance()
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    kwargs = dict(num_clients=3, samples=[16, 32, 48], episodes=6, rounds_per_episode=8, seed=5, batch_size=16)
    a = train(profile, scenario, **kwargs)
    b = train(profile, scenario, **kwargs)
    for (ka, va), (kb, vb) in zip(a.online.state_dict().items(), b.online.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.history == b.history
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    c = train(profile, scenario, **{**kwargs, "seed": 6})
    assert not torch.equal(a.online[0].weight, c.online[0].weight)


def test_save_load_round_trip_and_mismatches(tmp_path):
    profile, scenario = learning_instance()
    agent = train(profile, scenario, num_clients=3, samples=32, episodes=3, rounds_per_episode=8,
                            seed=1, min_client_depth=2, batch_size=8)
    path = tmp_path / "agent.pt"
    agent.save(path)
    loaded = CCCAgent.load(path)
    states = np.random.default_rng(0).normal(size=(10, agent.state_dim)).astype(np.float32)
    for s in states:
        assert np.array_equal(loaded.q_values(s), agent.q_values(s))
    assert loaded.config == agent.config
    assert loaded.candidate_cuts == [1, 2, 3, 4] and loaded.allowed.tolist() == [False, True, True, True]
    assert CCCAgent.load(path, num_clients=3, candidate_cuts=[1, 2, 3, 4]).num_clients == 3

    with pytest.raises(ValueError, match="3 clients, not 4"):
        CCCAgent.load(path, num_clients=4)
    with pytest.raises(ValueError, match="cuts"):
        CCCAgent.load(path, candidate_cuts=[2, 3, 4])
    with pytest.raises(ValueError, match="trained for 3 clients"):
        ccc_planner(loaded, profile, scenario, samples=[32, 32])
    short = ModelProfile(profile.blocks[:3])  # cuts 1..2 only: the agent's cut 3 and 4 are not there
    with pytest.raises(ValueError, match="outside the model"):
        ccc_planner(loaded, short, scenario, samples=[32, 32, 32])

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="not a readable CCC agent"):
        CCCAgent.load(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file at all" * 10)
    with pytest.raises(ValueError, match="not a readable CCC agent"):
        CCCAgent.load(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a CCC agent file"):
        CCCAgent.load(other)
    blob = torch.load(path, weights_only=True)
    blob["online"]["0.weight"] = torch.zeros(2, 2)
    torch.save(blob, other)
    with pytest.raises(ValueError, match="corrupt"):
        CCCAgent.load(other)


# --- the planner ------------------------------------------------------------------------------


def test_planner_plans_greedy_allowed_cuts_priced_by_the_cost_model():
    profile, scenario = learning_instance()
    agent = train(profile, scenario, num_clients=3, samples=32, episodes=20, rounds_per_episode=10,
                            seed=0, min_client_depth=2, batch_size=32, target_sync=50)
    planner = ccc_planner(agent, profile, scenario, samples=[32] * 3)
    for r in range(6):
        plan = planner.plan(r, recent_loss=None if r % 2 else 2.3 / (r + 1))
        d = plan.details
        assert plan.cuts[0] >= 2 and d["allowed"][d["action"]]
        q = np.array(d["q_values"])
        assert d["action"] == int(np.argmax(np.where(d["allowed"], q, -np.inf)))
        assert not d["fallback"]
        same = allocate(profile, scenario, cut=plan.cuts[0], samples=[32] * 3, server_round=r)
        assert plan.latency_s == pytest.approx(same.latency_s, rel=1e-12)
        rc, _ = costmodel_check(plan, profile, scenario, [32] * 3, plan.cuts[0], server_round=r)
        assert rc.round_latency_s == pytest.approx(plan.latency_s, rel=1e-6)
    with pytest.raises(ValueError, match="recent_loss"):
        planner.plan(7, recent_loss=math.nan)
    with pytest.raises(ValueError, match="recent_loss"):
        planner.plan(7, recent_loss=-1.0)
    with pytest.raises(ValueError, match="server_round"):
        planner.plan(-1)


def test_planner_loss_feature_follows_the_proxy_or_the_reported_loss():
    profile, scenario = learning_instance()
    agent = CCCAgent(num_clients=3, candidate_cuts=[1, 2, 3, 4], min_client_depth=2, seed=0,
                     reward={"w_lat": 1.0, "w_conv": 1.0, "eta": 0.2, "rho": 0.5})
    total = sum(b.param_bytes for b in profile.blocks)
    planner = ccc_planner(agent, profile, scenario, samples=[32] * 3)
    first = planner.plan(0)
    assert first.details["loss_fraction"] == 1.0 and first.details["state"][-1] == 1.0
    k = first.cuts[0]
    q = sum(b.param_bytes for b in profile.blocks[:k]) / total
    second = planner.plan(1)
    assert second.details["loss_fraction"] == pytest.approx(1 - 0.2 * (1 - 0.5 * q))
    assert second.details["state"][-2] == pytest.approx(1 / agent.num_rounds)
    # A reported loss replaces the proxy; the first one sets the scale.
    assert planner.plan(2, recent_loss=2.5).details["loss_fraction"] == 1.0
    assert planner.plan(3, recent_loss=1.25).details["loss_fraction"] == pytest.approx(0.5)


def test_planner_falls_back_when_the_greedy_cut_is_infeasible():
    profile, scenario = learning_instance()
    agent = CCCAgent(num_clients=3, candidate_cuts=[1, 2, 3, 4], min_client_depth=2, seed=0)
    with torch.no_grad():
        agent.online[-1].bias.copy_(torch.tensor([50.0, 0.0, 10.0, -10.0]))  # greedy: cut 3
    # Budgets that the 50k-element smashed data of cut 3 cannot meet, but cut 2's 64 elements can.
    c3 = [Client(profile, scenario, 32, 3, i) for i in range(3)]
    budgets = [0.5 * c.bits * N0 * math.log(2) / c.g for c in c3]
    c2 = [Client(profile, scenario, 32, 2, i) for i in range(3)]
    assert all(b > 10 * c.bits * N0 * math.log(2) / c.g for b, c in zip(budgets, c2))  # feasible (slower clock)
    planner = ccc_planner(agent, profile, scenario, samples=[32] * 3, energy_budget_j=budgets)
    plan = planner.plan(0)
    assert plan.cuts == [2, 2, 2] and plan.details["fallback"] and plan.details["action"] == 1
    tight = ccc_planner(agent, profile, scenario, samples=[32] * 3, energy_budget_j=1e-15)
    with pytest.raises(ValueError, match="no allowed cut is feasible"):
        tight.plan(0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_client_depth": 5}, "min_client_depth=5 is beyond the model"),
        ({"min_client_depth": 0}, "min_client_depth"),
        ({"candidate_cuts": [1]}, "no candidate cut keeps"),
        ({"candidate_cuts": [0, 2]}, "outside the model"),
        ({"client_ids": [0, 1]}, "client_ids"),
        ({"hiden": [8]}, "unknown agent option"),
        ({"episodes": 0}, "episodes"),
    ],
)
def test_training_rejects_bad_input(kwargs, match):
    profile, scenario = learning_instance()
    args = dict(num_clients=3, samples=32, episodes=1, rounds_per_episode=2, seed=0, min_client_depth=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train(profile, scenario, **args)
