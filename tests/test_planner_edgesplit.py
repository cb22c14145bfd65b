"""EdgeSplit planner against brute force and the equal-finish-time optimality condition.

The reference values are computed here, independently of the planner: the latency model is
re-written from its definition (DESIGN.md 3.6 and the planner's docstring) and the bandwidth
split for fixed cuts is solved with scipy's ``brentq`` (nested: the bandwidth a client needs
to meet a deadline, and the deadline at which the needs fill the band), not with the
planner's bisections. Brute force enumerates every combination of candidate cuts.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy.optimize import brentq

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile
from flsplit.planners.edgesplit import plan_edgesplit
from flsplit.planners.problem import PlanningProblem
from flsplit.model.profile import BlockProfile, ModelProfile

N0 = 10.0 ** ((-174.0 - 30.0) / 10.0)  # W/Hz


# --- random instances ------------------------------------------------------------------------


def random_instance(seed: int, num_clients: int = 3, num_blocks: int = 6):
    """A synthetic model, heterogeneous devices, a band and per-client samples."""
    rng = np.random.default_rng(seed)
    blocks = [
        BlockProfile(
            forward_flops=float(10 ** rng.uniform(5.5, 7.5)),
            backward_flops=float(10 ** rng.uniform(5.5, 7.8)),
            output_elements=int(10 ** rng.uniform(2.0, 4.0)),
            param_bytes=1000,
        )
        for _ in range(num_blocks)
    ]
    profile = ModelProfile(blocks)
    devices = tuple(
        DeviceProfile(
            cpu_hz=float(rng.uniform(0.5e9, 2e9)),
            flops_per_cycle=float(rng.choice([2.0, 4.0, 8.0])),
            kappa=1e-28,
            tx_power_w=float(rng.uniform(0.1, 0.2)),
            distance_m=float(rng.uniform(50.0, 400.0)),
        )
        for _ in range(num_clients)
    )
    scenario = Scenario(
        devices=devices,
        server=ServerProfile(cpu_hz=20e9, flops_per_cycle=8.0, tx_power_w=1.0),
        channel=Channel(bandwidth_hz=float(rng.uniform(1e6, 10e6))),
        seed=int(rng.integers(0, 1000)),
    )
    samples = [int(s) for s in rng.integers(16, 257, size=num_clients)]
    cands = sorted(int(k) for k in rng.choice(np.arange(1, num_blocks), size=4, replace=False))
    return profile, scenario, samples, cands


# --- independent reference model -------------------------------------------------------------


def client_terms(profile, scenario, samples, cut, client_id, server_round=0, bpe=4.0):
    """(compute seconds, bits each way, uplink SNR/Hz, downlink SNR/Hz) of one client."""
    blocks = profile.blocks
    dev, srv = scenario.devices[client_id], scenario.server
    client_f = sum(b.forward_flops + b.backward_flops for b in blocks[:cut])
    server_f = sum(b.forward_flops + b.backward_flops for b in blocks[cut:])
    compute = samples * client_f / (dev.cpu_hz * dev.flops_per_cycle) + samples * server_f / (
        srv.cpu_hz * srv.flops_per_cycle
    )
    bits = samples * blocks[cut - 1].output_elements * bpe * 8
    d_km = dev.distance_m / 1000.0
    gain = 10 ** (-(128.1 + 37.6 * math.log10(d_km)) / 10) * scenario.fading_power(client_id, server_round)
    return compute, bits, dev.tx_power_w * gain / N0, srv.tx_power_w * gain / N0


def finish_time(terms, bandwidth):
    compute, bits, a_up, a_down = terms
    r_up = bandwidth * math.log2(1 + a_up / bandwidth)
    r_down = bandwidth * math.log2(1 + a_down / bandwidth)
    return compute + bits / r_up + bits / r_down


def equal_finish_split(all_terms, total):
    """Makespan and bandwidths of the optimal split for fixed cuts, by nested brentq."""
    n = len(all_terms)

    def need(t, terms):
        if finish_time(terms, total) >= t:
            return total
        return brentq(lambda b: finish_time(terms, b) - t, total * 1e-12, total, xtol=total * 1e-15, rtol=1e-15)

    lo = max(finish_time(tm, total) for tm in all_terms)
    hi = max(finish_time(tm, total / n) for tm in all_terms)
    excess = lambda t: sum(need(t, tm) for tm in all_terms) - total  # noqa: E731
    if excess(hi) >= 0:  # the equal split already has equal finish times
        t = hi
    else:
        t = brentq(excess, lo, hi, xtol=hi * 1e-15, rtol=1e-15)
    return t, [need(t, tm) for tm in all_terms]


def brute_force(profile, scenario, samples, cands):
    """Optimal makespan over all cut combinations (each with its optimal bandwidth split)."""
    n, total = len(samples), scenario.channel.bandwidth_hz
    terms = {(i, k): client_terms(profile, scenario, samples[i], k, i) for i in range(n) for k in cands}
    best = (math.inf, None)
    for combo in itertools.product(cands, repeat=n):
        t, _ = equal_finish_split([terms[i, k] for i, k in enumerate(combo)], total)
        if t < best[0]:
            best = (t, combo)
    return best


# --- tests -----------------------------------------------------------------------------------


@pytest.fixture(params=["loop", "numpy"])
def bisection_path(request, monkeypatch):
    """Run a test through both implementations of the bandwidth bisections (the numpy one is
    used from ``_VECTORISE_FROM`` clients on; setting it to 0 forces it on small instances)."""
    if request.param == "numpy":
        monkeypatch.setattr("flsplit.planners.edgesplit._VECTORISE_FROM", 0)
    return request.param


def test_matches_brute_force_on_20_random_instances(bisection_path):
    start = time.perf_counter()
    ratios, naive_gaps = [], []
    for seed in range(20):
        profile, scenario, samples, cands = random_instance(seed)
        plan = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=samples, candidate_cuts=cands))
        opt, _ = brute_force(profile, scenario, samples, cands)
        # The plan's own numbers, re-derived from its cuts and bandwidths.
        total = scenario.channel.bandwidth_hz
        times = [
            finish_time(client_terms(profile, scenario, samples[i], k, i), b)
            for i, (k, b) in enumerate(zip(plan.cuts, plan.bandwidth_hz))
        ]
        assert plan.method == "edgesplit"
        assert all(k in cands for k in plan.cuts)
        assert sum(plan.bandwidth_hz) == pytest.approx(total, rel=1e-9)
        assert max(times) == pytest.approx(plan.latency_s, rel=1e-9)
        assert plan.latency_s >= opt * (1 - 1e-6), f"seed {seed}: below the brute-force optimum"
        assert plan.latency_s <= opt * 1.01, f"seed {seed}: {plan.latency_s} vs optimum {opt}"
        ratios.append(plan.latency_s / opt)
        # The check has teeth: an equal split of the band (each client's best cut) is worse.
        n, total = len(samples), scenario.channel.bandwidth_hz
        equal = max(
            min(finish_time(client_terms(profile, scenario, samples[i], k, i), total / n) for k in cands)
            for i in range(n)
        )
        naive_gaps.append(equal / opt - 1)
    assert sum(g > 0.01 for g in naive_gaps) >= 15, naive_gaps
    elapsed = time.perf_counter() - start
    print(f"20 instances: worst ratio to brute force {max(ratios):.9f}, {elapsed:.2f} s")


@pytest.mark.parametrize("seed", [0, 7, 13])
def test_fixed_cut_gives_equal_finish_times_and_fills_band(seed, bisection_path):
    profile, scenario, samples, cands = random_instance(seed)
    cut = cands[1]
    plan = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=samples, candidate_cuts=[cut]))
    total = scenario.channel.bandwidth_hz
    assert plan.cuts == [cut] * 3
    assert sum(plan.bandwidth_hz) == pytest.approx(total, rel=1e-9)
    times = [
        finish_time(client_terms(profile, scenario, samples[i], cut, i), b) for i, b in enumerate(plan.bandwidth_hz)
    ]
    assert (max(times) - min(times)) / max(times) < 1e-6
    # ... and they are the optimal split (solved independently).
    terms = [client_terms(profile, scenario, samples[i], cut, i) for i in range(3)]
    t_ref, b_ref = equal_finish_split(terms, total)
    assert plan.latency_s == pytest.approx(t_ref, rel=1e-6)
    assert plan.bandwidth_hz == pytest.approx(b_ref, rel=1e-5)


def test_single_client_gets_the_whole_band_and_energy_is_compute_plus_transmit():
    profile, scenario, samples, cands = random_instance(3)
    plan = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=samples[:1], candidate_cuts=cands))
    total = scenario.channel.bandwidth_hz
    assert plan.bandwidth_hz == pytest.approx([total], rel=1e-12)
    k = plan.cuts[0]
    terms = client_terms(profile, scenario, samples[0], k, 0)
    best = min(finish_time(client_terms(profile, scenario, samples[0], c, 0), total) for c in cands)
    assert plan.latency_s == pytest.approx(best, rel=1e-12)
    dev = scenario.devices[0]
    flops = samples[0] * sum(b.forward_flops + b.backward_flops for b in profile.blocks[:k])
    up = terms[1] / (total * math.log2(1 + terms[2] / total))
    energy = dev.kappa * dev.cpu_hz**2 * flops / dev.flops_per_cycle + dev.tx_power_w * up
    assert plan.energy_j == pytest.approx(energy, rel=1e-9)


def _bad_band(value: float) -> Scenario:
    """A scenario whose channel bandwidth was forced past Channel's own check."""
    _, scenario, _, _ = random_instance(0)
    channel = Channel(bandwidth_hz=1e6)
    object.__setattr__(channel, "bandwidth_hz", value)
    return Scenario(scenario.devices, scenario.server, channel)


@pytest.mark.parametrize("value", [0.0, -1e6])
def test_rejects_non_positive_bandwidth(value):
    profile, _, samples, cands = random_instance(0)
    with pytest.raises(ValueError, match="bandwidth"):
        Channel(bandwidth_hz=value)
    with pytest.raises(ValueError, match="bandwidth"):
        plan_edgesplit(PlanningProblem.build(profile, _bad_band(value), samples=samples, candidate_cuts=cands))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidate_cuts": []}, "candidate_cuts is empty"),
        ({"candidate_cuts": [0, 2]}, "candidate_cuts"),
        ({"candidate_cuts": [1, 6]}, "candidate_cuts"),
        ({"samples": [32, 32, 32], "client_ids": [0, 1]}, "client_ids"),
        ({"samples": []}, "samples"),
        ({"samples": [32, -1, 32]}, r"samples\[1\]"),
        ({"max_iter": 0}, "max_iter"),
        ({"bytes_per_element": 0.0}, "bytes_per_element"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    profile, scenario, samples, _ = random_instance(0)
    args = {"samples": samples, **kwargs}
    max_iter = args.pop("max_iter", 50)
    with pytest.raises(ValueError, match=match):
        plan_edgesplit(PlanningProblem.build(profile, scenario, **args), max_iter=max_iter)
