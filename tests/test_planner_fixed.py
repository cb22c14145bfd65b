"""The fixed-cut baseline and the per-scheme pricing, against formulas written out here.

The instance has no fading and round numbers, so every latency and energy is a short hand
calculation: Shannon rates ``B log2(1 + p g / (B N0))``, compute ``FLOPs / (f c)``, energy
``kappa f^2 FLOPs / c + p * uplink time``.
"""

from __future__ import annotations

import math

import pytest

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile
from flsplit.planners import PlanningProblem, best_fixed_cut, plan_fixed
from tests.oracle import scheme_round_cost
from flsplit.model.profile import BlockProfile, ModelProfile

N0 = 10.0 ** ((-174.0 - 30.0) / 10.0)
BLOCKS = [
    BlockProfile(forward_flops=2e6, backward_flops=3e6, output_elements=4000, param_bytes=100),
    BlockProfile(forward_flops=4e6, backward_flops=8e6, output_elements=1000, param_bytes=100),
    BlockProfile(forward_flops=8e6, backward_flops=16e6, output_elements=200, param_bytes=100),
    BlockProfile(forward_flops=1e6, backward_flops=2e6, output_elements=10, param_bytes=100),
]
PROFILE = ModelProfile(BLOCKS)
DEVICES = (
    DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.2, distance_m=100),
    DeviceProfile(cpu_hz=0.5e9, flops_per_cycle=2, kappa=2e-28, tx_power_w=0.1, distance_m=200),
)
SERVER = ServerProfile(cpu_hz=10e9, flops_per_cycle=4, tx_power_w=1.0)
BAND = Scenario(DEVICES, SERVER, Channel(bandwidth_hz=10e6, fading="none"))
OFDMA = Scenario(DEVICES, SERVER, Channel(num_subchannels=4, subchannel_bandwidth_hz=2.5e6, fading="none"))
SAMPLES = [16, 16]


def problem(scenario: Scenario, samples=SAMPLES, **kwargs) -> PlanningProblem:
    return PlanningProblem.build(PROFILE, scenario, samples=samples, **kwargs)


def gain(d: DeviceProfile) -> float:
    return 10.0 ** (-(128.1 + 37.6 * math.log10(d.distance_m / 1000.0)) / 10.0)


def rate(bandwidth: float, power: float, g: float) -> float:
    return bandwidth * math.log2(1.0 + power * g / (bandwidth * N0))


def hand(cut: int, scheme: str, phi: float = 0.0, bandwidth=(5e6, 5e6), bpe: float = 4.0):
    """Round latency and energy from the definitions (two clients, 16 samples each)."""
    client = BLOCKS[:cut]
    server = BLOCKS[cut:]
    s = client[-1].output_elements
    cf = sum(b.forward_flops + b.backward_flops for b in client)
    chains, energy = [], 0.0
    bits = [n * s * bpe * 8 for n in SAMPLES]
    down_bits = {"psl": bits, "sl": bits, "epsl": [(1 - phi) * b for b in bits], "sflga": [0.0, 0.0]}[scheme]
    bcast_bits = {"psl": 0.0, "sl": 0.0, "epsl": phi * bits[0], "sflga": max(bits)}[scheme]
    bcast = bcast_bits / min(rate(10e6, SERVER.tx_power_w, gain(d)) for d in DEVICES) if bcast_bits else 0.0
    for d, n, bw, up_bits, dn_bits in zip(DEVICES, SAMPLES, bandwidth, bits, down_bits):
        flops = n * cf
        up = up_bits / rate(bw, d.tx_power_w, gain(d))
        down = dn_bits / rate(bw, SERVER.tx_power_w, gain(d)) + bcast
        chains.append(flops / (d.cpu_hz * d.flops_per_cycle) + up + down)
        energy += d.kappa * d.cpu_hz**2 * flops / d.flops_per_cycle + d.tx_power_w * up
    fwd = sum(b.forward_flops for b in server)
    bwd = sum(b.backward_flops for b in server)
    total = sum(SAMPLES)
    back = (1 - phi) * total + phi * SAMPLES[0] if scheme == "epsl" else total
    server_s = (total * fwd + back * bwd) / SERVER.flops_per_s
    clients = sum(chains) if scheme == "sl" else max(chains)
    return clients + server_s, energy


@pytest.mark.parametrize("cut", [1, 2, 3])
@pytest.mark.parametrize("scheme,phi", [("psl", 0.0), ("epsl", 0.0), ("epsl", 0.5), ("epsl", 1.0), ("sflga", 0.0)])
def test_parallel_schemes_match_hand_computation(cut, scheme, phi):
    plan = plan_fixed(problem(BAND), cut=cut, scheme=scheme, phi=phi)
    latency, energy = hand(cut, scheme, phi)
    assert plan.latency_s == pytest.approx(latency, rel=1e-12)
    assert plan.energy_j == pytest.approx(energy, rel=1e-12)
    assert plan.cuts == [cut, cut]
    assert plan.bandwidth_hz == [5e6, 5e6]


def test_sequential_sl_gives_each_client_the_whole_band():
    plan = plan_fixed(problem(BAND), cut=2, scheme="sl")
    latency, energy = hand(2, "sl", bandwidth=(10e6, 10e6))
    assert plan.latency_s == pytest.approx(latency, rel=1e-12)
    assert plan.energy_j == pytest.approx(energy, rel=1e-12)


def test_allocation_is_priced_as_given():
    cost = scheme_round_cost(PROFILE, BAND, cuts=[2, 2], samples=SAMPLES, bandwidth_shares=[0.8, 0.2])
    assert cost.round_latency_s == pytest.approx(hand(2, "psl", bandwidth=(8e6, 2e6))[0], rel=1e-12)
    cost = scheme_round_cost(PROFILE, OFDMA, cuts=[1, 1], samples=SAMPLES, subchannels=[3, 1])
    assert cost.round_latency_s == pytest.approx(hand(1, "psl", bandwidth=(7.5e6, 2.5e6))[0], rel=1e-12)


def test_mixed_cuts_add_each_clients_server_work():
    cost = scheme_round_cost(PROFILE, BAND, cuts=[1, 3], samples=SAMPLES)
    work = 16 * sum(b.forward_flops + b.backward_flops for b in BLOCKS[1:])
    work += 16 * sum(b.forward_flops + b.backward_flops for b in BLOCKS[3:])
    assert cost.server_flops == pytest.approx(work, rel=1e-12)


def test_best_fixed_cut_is_the_fastest_of_all_cuts():
    plan = best_fixed_cut(problem(BAND))
    by_hand = {k: hand(k, "psl")[0] for k in (1, 2, 3)}
    assert plan.cuts[0] == min(by_hand, key=by_hand.get)
    assert plan.latency_s == pytest.approx(min(by_hand.values()), rel=1e-12)
    assert set(plan.details["latency_by_cut"]) == {1, 2, 3}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cut=4), "outside the model"),
        (dict(cut=0), "outside the model"),
        (dict(cut=2, scheme="fedavg"), "scheme must be one of"),
        (dict(cut=2, scheme="epsl", phi=1.5), "phi must be in"),
        (dict(cut=2, scheme="psl", phi=0.5), "phi applies to scheme 'epsl' only"),
        (dict(cut=2, samples=[16, 0]), r"samples\[1\] must be >= 1"),
        (dict(cut=2, samples=[]), "at least one client"),
        (dict(cut=2, client_ids=[0, 0]), "client_ids must be distinct"),
        (dict(cut=2, bytes_per_element=float("nan")), "bytes_per_element"),
        (dict(cut=2, scheme="epsl", samples=[16, 8]), "one batch size"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    kwargs = dict(kwargs)
    plan_args = {k: kwargs.pop(k) for k in ("cut", "scheme", "phi") if k in kwargs}
    with pytest.raises(ValueError, match=match):
        plan_fixed(problem(BAND, **kwargs), **plan_args)
