"""EPSL planner against exhaustive search, the power step's closed form and the cost model.

The reference values are computed here, independently of the planner: EPSL's round latency
and energy are re-written from their definitions (DESIGN.md 2 item 1 and 3.6, the planner's
module docstring), the largest power meeting an energy budget is found with scipy's
``brentq`` on the transmit-energy formula (not with the planner's bisection), and the brute
force enumerates every subchannel assignment (every client at least one) and every cut.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy.optimize import brentq

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile
from flsplit.planners import epsl as epsl_module
from flsplit.planners.epsl import plan_epsl
from flsplit.planners.problem import PlanningProblem
from flsplit.model.profile import BlockProfile, ModelProfile
from tests.oracle import round_cost

N0 = 10.0 ** ((-174.0 - 30.0) / 10.0)  # W/Hz
BPE = 4.0


# --- random instances ------------------------------------------------------------------------


def _epsl(profile, scenario, *, samples, num_clients=None, client_ids=None, server_round=0, bytes_per_element=4.0,
          candidate_cuts=None, include_weights=False, **options):
    """``plan_epsl`` on the ``PlanningProblem`` of ``num_clients`` (or ``client_ids``) clients with
    ``samples`` samples each."""
    ids = list(range(num_clients)) if client_ids is None else list(client_ids)
    problem = PlanningProblem.build(profile, scenario, samples=[samples] * len(ids), client_ids=ids,
                                    server_round=server_round, bytes_per_element=bytes_per_element,
                                    candidate_cuts=candidate_cuts, include_weights=include_weights)
    return plan_epsl(problem, **options)


def random_instance(seed: int, num_clients: int = 3, num_blocks: int = 6):
    """A synthetic model, heterogeneous devices on an OFDMA band, samples and candidate cuts."""
    rng = np.random.default_rng(1000 + seed)
    blocks = [
        BlockProfile(
            forward_flops=float(10 ** rng.uniform(5.5, 7.5)),
            backward_flops=float(10 ** rng.uniform(5.5, 7.8)),
            output_elements=int(10 ** rng.uniform(2.0, 4.0)),
            param_bytes=1000,
        )
        for _ in range(num_blocks)
    ]
    devices = tuple(
        DeviceProfile(
            cpu_hz=float(rng.uniform(0.5e9, 2e9)),
            flops_per_cycle=float(rng.choice([2.0, 4.0, 8.0])),
            kappa=float(rng.uniform(0.5e-28, 2e-28)),
            tx_power_w=float(rng.uniform(0.1, 0.2)),
            distance_m=float(rng.uniform(50.0, 400.0)),
        )
        for _ in range(num_clients)
    )
    scenario = Scenario(
        devices=devices,
        server=ServerProfile(cpu_hz=20e9, flops_per_cycle=8.0, tx_power_w=1.0),
        channel=Channel(
            num_subchannels=int(rng.integers(6, 9)), subchannel_bandwidth_hz=float(rng.uniform(0.2e6, 2e6))
        ),
        seed=int(rng.integers(0, 1000)),
    )
    samples = int(rng.integers(16, 129))
    cands = sorted(int(k) for k in rng.choice(np.arange(1, num_blocks), size=4, replace=False))
    return ModelProfile(blocks), scenario, samples, cands


# --- independent reference model -------------------------------------------------------------


def gain(scenario, client_id, server_round=0):
    d_km = scenario.devices[client_id].distance_m / 1000.0
    return 10 ** (-(128.1 + 37.6 * math.log10(d_km)) / 10) * scenario.fading_power(client_id, server_round)


def rate(bandwidth, power, g):
    """Shannon rate in bit/s, written out."""
    return bandwidth * math.log1p(power * g / (bandwidth * N0)) / math.log(2)


class Reference:
    """EPSL's per-round quantities at one cut, from the formulas (no planner code)."""

    def __init__(self, profile, scenario, samples, cut, phi):
        blocks, n = profile.blocks, len(scenario.devices)
        self.scenario, self.n, self.phi = scenario, n, phi
        self.client_f = samples * sum(b.forward_flops + b.backward_flops for b in blocks[:cut])
        server_fwd = sum(b.forward_flops for b in blocks[cut:])
        server_bwd = sum(b.backward_flops for b in blocks[cut:])
        srv = scenario.server
        self.server_s = (n * samples * server_fwd + ((1 - phi) * n * samples + phi * samples) * server_bwd) / (
            srv.cpu_hz * srv.flops_per_cycle
        )
        self.bits = samples * blocks[cut - 1].output_elements * BPE * 8
        self.g = [gain(scenario, i) for i in range(n)]
        total = scenario.channel.num_subchannels * scenario.channel.subchannel_bandwidth_hz
        self.broadcast_s = phi * self.bits / rate(total, srv.tx_power_w, min(self.g)) if phi > 0 else 0.0

    def compute_s(self, i):
        d = self.scenario.devices[i]
        return self.client_f / (d.cpu_hz * d.flops_per_cycle)

    def compute_j(self, i):
        d = self.scenario.devices[i]
        return d.kappa * d.cpu_hz**2 * self.client_f / d.flops_per_cycle

    def tx_energy(self, i, m, p):
        b = m * self.scenario.channel.subchannel_bandwidth_hz
        return p * self.bits / rate(b, p, self.g[i])

    def power(self, i, m, budget):
        """Largest power <= pmax meeting the budget (None: no power meets it), by brentq."""
        pmax = self.scenario.devices[i].tx_power_w
        if budget is None:
            return pmax
        room = budget - self.compute_j(i)
        if room <= self.bits * N0 * math.log(2) / self.g[i]:  # below the p -> 0 limit
            return None
        if self.tx_energy(i, m, pmax) <= room:
            return pmax
        return brentq(lambda p: self.tx_energy(i, m, p) - room, pmax * 1e-12, pmax, xtol=1e-300, rtol=1e-15)

    def chain(self, i, m, p):
        b = m * self.scenario.channel.subchannel_bandwidth_hz
        ps = self.scenario.server.tx_power_w
        down = (1 - self.phi) * self.bits / rate(b, ps, self.g[i]) if self.phi < 1 else 0.0
        return self.compute_s(i) + self.bits / rate(b, p, self.g[i]) + down + self.broadcast_s


def brute_force(profile, scenario, samples, cands, phi, budgets):
    """Optimal round latency over every cut and every subchannel assignment (each >= 1)."""
    n, k_total = len(scenario.devices), scenario.channel.num_subchannels
    best = (math.inf, None)
    for cut in cands:
        ref = Reference(profile, scenario, samples, cut, phi)
        chains = {}
        for i in range(n):
            for m in range(1, k_total - n + 2):
                p = ref.power(i, m, None if budgets is None else budgets[i])
                chains[i, m] = math.inf if p is None else ref.chain(i, m, p)
        for ms in itertools.product(range(1, k_total - n + 2), repeat=n):
            if sum(ms) > k_total:
                continue
            t = max(chains[i, m] for i, m in enumerate(ms)) + ref.server_s
            if t < best[0]:
                best = (t, (cut, ms))
    return best


def random_budgets(profile, scenario, samples, cands, rng):
    """Budgets that some cut can meet and that bind: compute energy + a few times E0."""
    cut = cands[int(rng.integers(0, len(cands)))]
    ref = Reference(profile, scenario, samples, cut, 0.0)
    return [
        ref.compute_j(i) + float(rng.uniform(1.3, 8.0)) * ref.bits * N0 * math.log(2) / ref.g[i]
        for i in range(len(scenario.devices))
    ]


def epsl_cost(scenario, profile, plan, samples, phi):
    """``round_cost`` for a plan, with EPSL's traffic and work written out here."""
    n, cut = len(plan.cuts), plan.cuts[0]
    blocks = profile.blocks
    smashed = samples * blocks[cut - 1].output_elements * BPE
    client_f = samples * sum(b.forward_flops + b.backward_flops for b in blocks[:cut])
    server_fwd = sum(b.forward_flops for b in blocks[cut:])
    server_bwd = sum(b.backward_flops for b in blocks[cut:])
    server_f = n * samples * server_fwd + ((1 - phi) * n * samples + phi * samples) * server_bwd
    return round_cost(
        scenario,
        client_ids=plan.details["client_ids"],
        client_flops=[client_f] * n,
        uplink_bytes=[smashed] * n,
        downlink_bytes=[(1 - phi) * smashed] * n,
        server_flops=server_f,
        timing="parallel",
        broadcast_bytes=phi * smashed,
        subchannels=plan.subchannels,
        tx_power_w=plan.tx_power_w,
    )


def assert_finite(value, where="plan"):
    """No NaN or infinity anywhere in a plan (``None`` marks an infeasible cut)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert_finite(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            assert_finite(v, f"{where}[{k}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} is {value}"


# --- tests -----------------------------------------------------------------------------------


def test_matches_brute_force_on_20_random_instances():
    start = time.perf_counter()
    ratios, naive_gaps, binding = [], [], 0
    for seed in range(20):
        profile, scenario, samples, cands = random_instance(seed)
        rng = np.random.default_rng(seed)
        phi = (0.0, 0.5, 1.0, 0.25)[seed % 4]
        budgets = random_budgets(profile, scenario, samples, cands, rng) if seed % 2 else None
        plan = _epsl(
            profile, scenario, samples=samples, num_clients=3, phi=phi, candidate_cuts=cands, energy_budget_j=budgets
        )
        opt, (opt_cut, _) = brute_force(profile, scenario, samples, cands, phi, budgets)
        assert math.isfinite(opt)

        # The plan is well-formed, and its latency is re-derived here from its cut, subchannels and powers.
        assert plan.method == "epsl"
        assert_finite(plan.as_dict())
        cut = plan.cuts[0]
        assert plan.cuts == [cut] * 3 and cut in cands
        assert min(plan.subchannels) >= 1 and sum(plan.subchannels) <= scenario.channel.num_subchannels
        ref = Reference(profile, scenario, samples, cut, phi)
        chains = [ref.chain(i, m, p) for i, (m, p) in enumerate(zip(plan.subchannels, plan.tx_power_w))]
        assert max(chains) + ref.server_s == pytest.approx(plan.latency_s, rel=1e-9)
        for i, (m, p) in enumerate(zip(plan.subchannels, plan.tx_power_w)):
            assert 0 < p <= scenario.devices[i].tx_power_w
            if budgets is not None:
                energy = ref.compute_j(i) + ref.tx_energy(i, m, p)
                assert energy <= budgets[i] * (1 + 1e-12), f"seed {seed}: client {i} over budget"
                binding += p < scenario.devices[i].tx_power_w

        assert plan.latency_s >= opt * (1 - 1e-9), f"seed {seed}: below the brute-force optimum"
        assert plan.latency_s <= opt * 1.01, f"seed {seed}: {plan.latency_s} vs optimum {opt}"
        # Each block is solved exactly, so the plan is in fact optimal (module docstring).
        assert plan.latency_s <= opt * (1 + 1e-7), f"seed {seed}: {plan.latency_s} vs optimum {opt}"
        ratios.append(plan.latency_s / opt)

        # The check has teeth: subchannels split evenly (best cut, best powers) is worse.
        k_total = scenario.channel.num_subchannels
        even = [k_total // 3 + (i < k_total % 3) for i in range(3)]
        naive = math.inf
        for c in cands:
            r = Reference(profile, scenario, samples, c, phi)
            ps = [r.power(i, m, None if budgets is None else budgets[i]) for i, m in enumerate(even)]
            if None not in ps:
                naive = min(naive, max(r.chain(i, m, p) for i, (m, p) in enumerate(zip(even, ps))) + r.server_s)
        naive_gaps.append(naive / opt - 1)
    assert binding >= 5, "the budgets should bind for several clients"
    assert sum(g > 1e-3 for g in naive_gaps) >= 10, naive_gaps
    elapsed = time.perf_counter() - start
    print(f"20 instances: worst ratio to brute force {max(ratios):.12f}, {elapsed:.2f} s")


def test_power_step_meets_the_closed_form():
    """Budget-bound clients spend exactly their budget; the others transmit at full power."""
    profile, scenario, samples, cands = random_instance(4)
    cut = cands[1]
    ref = Reference(profile, scenario, samples, cut, 0.5)
    e0 = [ref.bits * N0 * math.log(2) / g for g in ref.g]
    # Client 0 has plenty of energy, clients 1 and 2 are tight.
    budgets = [ref.compute_j(0) + 1e3 * e0[0], ref.compute_j(1) + 1.5 * e0[1], ref.compute_j(2) + 3.0 * e0[2]]
    plan = _epsl(
        profile, scenario, samples=samples, num_clients=3, phi=0.5, candidate_cuts=[cut], energy_budget_j=budgets
    )
    assert_finite(plan.as_dict())
    assert plan.details["solver"] in ("CLARABEL", "ECOS", "SCS")
    kinds = []
    for i, (m, p) in enumerate(zip(plan.subchannels, plan.tx_power_w)):
        pmax = scenario.devices[i].tx_power_w
        p_ref = ref.power(i, m, budgets[i])
        assert p == pytest.approx(p_ref, rel=1e-6)
        energy = ref.compute_j(i) + ref.tx_energy(i, m, p)
        assert energy <= budgets[i] * (1 + 1e-12)
        if p < pmax * (1 - 1e-12):  # KKT: the budget is active ...
            assert energy == pytest.approx(budgets[i], rel=1e-6)
            assert ref.compute_j(i) + ref.tx_energy(i, m, p * (1 + 1e-5)) > budgets[i]
            kinds.append("budget")
        else:  # ... or the power bound is
            assert p == pytest.approx(pmax, rel=1e-12)
            kinds.append("pmax")
    assert kinds == ["pmax", "budget", "budget"]
    assert plan.details["budget_binding"] == [False, True, True]
    # The convex program itself (before polishing) lands on the same point and latency.
    step = plan.details["power_step"]
    assert step["status"] == "optimal"
    assert step["solver_tx_power_w"] == pytest.approx(plan.tx_power_w, rel=1e-3)
    assert step["solver_latency_s"] == pytest.approx(plan.latency_s, rel=1e-5)


def test_without_budgets_max_power_and_no_convex_program(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the convex program must not run without budgets")

    monkeypatch.setattr(epsl_module, "_PowerProgram", forbidden)
    profile, scenario, samples, cands = random_instance(2)
    plan = _epsl(profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands)
    assert plan.tx_power_w == [d.tx_power_w for d in scenario.devices]
    assert plan.details["solver"] is None
    assert sum(plan.subchannels) == scenario.channel.num_subchannels  # more bandwidth never hurts


@pytest.mark.parametrize("phi", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_budget", [False, True])
def test_plan_equals_round_cost(phi, with_budget):
    profile, scenario, samples, cands = random_instance(5, num_clients=4)
    rng = np.random.default_rng(5)
    scenario = Scenario(scenario.devices, scenario.server, Channel(num_subchannels=11, subchannel_bandwidth_hz=1e6), 7)
    ids = [3, 0, 2, 1]
    # Budgets by device (scenario position), handed to the planner in client_ids order.
    budgets = random_budgets(profile, scenario, samples, cands, rng) if with_budget else None
    ordered = None if budgets is None else [budgets[c] for c in ids]
    plan = _epsl(
        profile, scenario, samples=samples, client_ids=ids, phi=phi, candidate_cuts=cands, energy_budget_j=ordered
    )
    assert_finite(plan.as_dict())
    cost = epsl_cost(scenario, profile, plan, samples, phi)
    assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-9)
    assert plan.energy_j == pytest.approx(cost.total_energy_j, rel=1e-9)
    assert plan.details["client_latency_s"] == pytest.approx([c.latency_s for c in cost.clients], rel=1e-9)
    assert plan.details["energy_per_client_j"] == pytest.approx([c.energy_j for c in cost.clients], rel=1e-9)
    assert plan.details["client_ids"] == ids
    if with_budget:
        for c, b in zip(cost.clients, ordered):
            assert c.energy_j <= b
    # The latency of the chosen cut is the best of the per-cut latencies.
    per_cut = [v for v in plan.details["cut_latency_s"].values() if v is not None]
    assert min(per_cut) == pytest.approx(plan.latency_s, rel=1e-9)


def test_phi_one_beats_phi_zero_by_hand():
    """Two identical clients, one subchannel each, no fading: every term written out."""
    blocks = [
        BlockProfile(forward_flops=2e6, backward_flops=4e6, output_elements=1000, param_bytes=0),
        BlockProfile(forward_flops=5e6, backward_flops=1e7, output_elements=10, param_bytes=0),
    ]
    profile = ModelProfile(blocks)
    dev = DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.1, distance_m=100)
    server = ServerProfile(cpu_hz=10e9, flops_per_cycle=4, tx_power_w=1.0)
    scenario = Scenario((dev, dev), server, Channel(num_subchannels=2, subchannel_bandwidth_hz=1e6, fading="none"))
    n = 10  # samples per client
    g = 10 ** (-(128.1 + 37.6 * math.log10(0.1)) / 10)  # 100 m: 90.5 dB
    bits = n * 1000 * 4 * 8  # 320 kbit each way
    compute = n * 6e6 / 4e9  # 15 ms
    up = bits / (1e6 * math.log2(1 + 0.1 * g / (1e6 * N0)))
    down = bits / (1e6 * math.log2(1 + 1.0 * g / (1e6 * N0)))
    broadcast = bits / (2e6 * math.log2(1 + 1.0 * g / (2e6 * N0)))  # whole band, one transmission
    server_psl = (2 * n * 5e6 + 2 * n * 1e7) / 40e9  # forward and backward of 20 samples
    server_epsl = (2 * n * 5e6 + n * 1e7) / 40e9  # backward of (1-1)*20 + 1*10 samples
    psl = _epsl(profile, scenario, samples=n, num_clients=2, phi=0.0)
    epsl = _epsl(profile, scenario, samples=n, num_clients=2, phi=1.0)
    for plan in (psl, epsl):
        assert plan.cuts == [1, 1] and plan.subchannels == [1, 1] and plan.tx_power_w == [0.1, 0.1]
        assert_finite(plan.as_dict())
    assert psl.latency_s == pytest.approx(compute + up + down + server_psl, rel=1e-12)
    assert epsl.latency_s == pytest.approx(compute + up + broadcast + server_epsl, rel=1e-12)
    assert epsl.details["broadcast_s"] == pytest.approx(broadcast, rel=1e-12)
    assert epsl.latency_s < psl.latency_s
    # Energy does not depend on phi: the devices compute and transmit the same.
    assert epsl.energy_j == pytest.approx(psl.energy_j, rel=1e-12)


def test_greedy_gives_spare_subchannels_to_the_straggler():
    profile, scenario, samples, cands = random_instance(0)
    far = DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.1, distance_m=400)
    near = DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.1, distance_m=50)
    scenario = Scenario(
        (far, near, near), scenario.server, Channel(num_subchannels=8, subchannel_bandwidth_hz=1e6, fading="none")
    )
    plan = _epsl(profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands)
    assert plan.subchannels[0] > plan.subchannels[1] == plan.subchannels[2]
    assert sum(plan.subchannels) == 8


def test_cuts_whose_budget_cannot_be_met_are_skipped():
    profile, scenario, samples, cands = random_instance(1)
    refs = {c: Reference(profile, scenario, samples, c, 0.0) for c in cands}
    # Room for client 0 at the cut of least compute energy plus E0, and not at the others.
    cheap = min(cands, key=lambda c: refs[c].compute_j(0) + refs[c].bits * N0 * math.log(2) / refs[c].g[0])
    need = {c: refs[c].compute_j(0) + refs[c].bits * N0 * math.log(2) / refs[c].g[0] for c in cands}
    second = sorted(need.values())[1]
    budget0 = min(need[cheap] * 1.5, 0.5 * (need[cheap] + second))
    plan = _epsl(
        profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands, energy_budget_j=[budget0, 10.0, 10.0]
    )
    assert plan.cuts == [cheap] * 3
    assert [c for c, v in plan.details["cut_latency_s"].items() if v is not None] == [cheap]
    assert_finite(plan.as_dict())


def test_one_client_gets_every_subchannel():
    profile, scenario, samples, cands = random_instance(3)
    plan = _epsl(profile, scenario, samples=samples, client_ids=[2], candidate_cuts=cands, phi=0.5)
    assert plan.subchannels == [scenario.channel.num_subchannels]
    cost = epsl_cost(scenario, profile, plan, samples, 0.5)
    assert plan.latency_s == pytest.approx(cost.round_latency_s, rel=1e-12)


def test_converges_and_reports_history():
    profile, scenario, samples, cands = random_instance(6)
    plan = _epsl(profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands, max_iter=1)
    assert plan.details["iterations"] == 1 and not plan.details["converged"]
    plan = _epsl(profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands)
    assert plan.details["converged"] and plan.details["iterations"] == 2
    assert plan.details["latency_history"][-1] >= plan.details["latency_history"][0] * (1 - 1e-9)
    assert set(plan.details["cut_latency_s"]) == set(cands)
    assert plan.details["phi"] == 0.0 and plan.details["candidate_cuts"] == cands


# --- bad input -------------------------------------------------------------------------------


def _forced(channel: Channel, **fields) -> Channel:
    for k, v in fields.items():
        object.__setattr__(channel, k, v)  # past Channel's own checks
    return channel


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"phi": -0.1}, r"phi must be in \[0, 1\]"),
        ({"phi": 1.5}, r"phi must be in \[0, 1\]"),
        ({"phi": float("nan")}, r"phi must be in \[0, 1\]"),
        ({"phi": "half"}, "phi must be a number"),
        ({"samples": 0}, r"samples\[0\] must be >= 1"),
        ({"samples": -3}, r"samples\[0\] must be >= 1"),
        ({"samples": 2.5}, r"samples\[0\] must be an integer"),
        ({"candidate_cuts": []}, "candidate_cuts is empty"),
        ({"candidate_cuts": [0, 2]}, "candidate_cuts: cut 0 is outside the model: valid cuts are 1..5"),
        ({"candidate_cuts": [1, 6]}, "candidate_cuts: cut 6 is outside the model: valid cuts are 1..5"),
        ({"energy_budget_j": [1.0, 1.0]}, "energy_budget_j has 2 entries for 3 clients"),
        ({"energy_budget_j": [1.0, float("nan"), 1.0]}, r"energy_budget_j\[1\] must be a finite number > 0"),
        ({"energy_budget_j": [1.0, 1.0, 0.0]}, r"energy_budget_j\[2\] must be a finite number > 0"),
        ({"energy_budget_j": -1.0}, r"energy_budget_j\[0\] must be a finite number > 0"),
        ({"energy_budget_j": float("inf")}, r"energy_budget_j\[0\] must be a finite number > 0"),
        ({"num_clients": 0}, "samples: at least one client is needed"),
        ({"num_clients": None, "client_ids": [0, 1, 1]}, "client_ids must be distinct"),
        ({"num_clients": None, "client_ids": []}, "samples: at least one client is needed"),
        ({"num_clients": None, "client_ids": [0, -1]}, r"client_ids\[1\] must be >= 0"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"bytes_per_element": 0.0}, "bytes_per_element must be > 0"),
        ({"server_round": -1}, "server_round must be >= 0"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    profile, scenario, samples, _ = random_instance(0)
    args = {"samples": samples, "num_clients": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        _epsl(profile, scenario, **args)


def test_rejects_a_shared_band():
    profile, scenario, samples, _ = random_instance(0)
    shared = Scenario(scenario.devices, scenario.server, Channel(bandwidth_hz=10e6))
    with pytest.raises(ValueError, match="EPSL assigns OFDMA subchannels"):
        _epsl(profile, shared, samples=samples, num_clients=3)


def test_rejects_fewer_subchannels_than_clients():
    profile, scenario, samples, _ = random_instance(0)
    with pytest.raises(ValueError, match="at least one subchannel: .* subchannels for 20 clients"):
        _epsl(profile, scenario, samples=samples, num_clients=20)


@pytest.mark.parametrize("value", [0.0, -1e6, float("nan")])
def test_rejects_a_bad_subchannel_bandwidth(value):
    profile, scenario, samples, _ = random_instance(0)
    with pytest.raises(ValueError, match="subchannel_bandwidth_hz"):
        Channel(num_subchannels=8, subchannel_bandwidth_hz=value)
    channel = _forced(Channel(num_subchannels=8, subchannel_bandwidth_hz=1e6), subchannel_bandwidth_hz=value)
    bad = Scenario(scenario.devices, scenario.server, channel)
    with pytest.raises(ValueError, match="bandwidth.* must be > 0 Hz"):
        _epsl(profile, bad, samples=samples, num_clients=3)


def test_rejects_a_model_without_cuts():
    _, scenario, samples, _ = random_instance(0)
    one_block = ModelProfile([BlockProfile(1e6, 2e6, 10, 0)])
    with pytest.raises(ValueError, match="no cut is possible"):
        _epsl(one_block, scenario, samples=samples, num_clients=3)


def test_infeasible_budget_names_the_client_and_budget():
    profile, scenario, samples, cands = random_instance(0)
    # Client 1's budget is below its compute energy at every cut.
    least = min(Reference(profile, scenario, samples, c, 0.0).compute_j(1) for c in cands)
    budgets = [10.0, least / 2, 10.0]
    with pytest.raises(ValueError, match=r"infeasible at every candidate cut: client 1: budget .* J"):
        _epsl(profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands, energy_budget_j=budgets)
    # Client 2's budget covers the compute but not the transmit limit D*N0*ln2/g as p -> 0.
    refs = [Reference(profile, scenario, samples, c, 0.0) for c in cands]
    below = min(r.compute_j(2) + 0.99 * r.bits * N0 * math.log(2) / r.g[2] for r in refs)
    assert below > min(r.compute_j(2) for r in refs)  # the compute alone would fit somewhere
    with pytest.raises(ValueError, match=r"client 2: budget .* \(D\*N0\*ln2/g, as power -> 0\)"):
        _epsl(
            profile, scenario, samples=samples, num_clients=3, candidate_cuts=cands, energy_budget_j=[10.0, 10.0, below]
        )
