"""One price for a round: a finished run's measured workload and the workload predicted by the
scheme's traffic model (with the wire's own byte counts) price identically."""

from __future__ import annotations

import math

import pytest

from flsplit.model.profile import profile_model
from flsplit.sim.scenario_files import load_scenario
from flsplit.sim import Allocation, ServerTiming, predict_workload, price
from flsplit.wire.wire_bytes import SerializedWire
from flsplit.strategies import EPSL, PSL, SFLGA, SFLV1, SFLV2, SL, AsyncSL
from tests.helpers import model_fn, random_data, run_strategy

SIZES = [20, 20, 20]  # batches of 8, 8 and 4 rows
BATCH = 8


def _predicted_cost(strategy, scheme, entry, server_round, *, phi=0.0, states=None, samples=None):
    """Predict the round from the configuration alone and price it like the runtime does."""
    nodes = sorted(int(n) for n in entry["cuts"])
    cuts = [entry["cuts"][str(n)] for n in nodes]
    steps = strategy.train_settings["max_steps"]
    if samples is None:
        samples = [min(steps * BATCH, SIZES[n - 1000]) if steps else SIZES[n - 1000] for n in nodes]
    wire = SerializedWire(model_fn(), (1, 8, 8), strategy.train_settings["codec_up"], strategy.train_settings["codec_down"])
    work = predict_workload(
        scheme, profile_model(model_fn(), (1, 8, 8)), cuts=cuts, samples=samples,
        client_ids=[n - 1000 for n in nodes], batch_size=BATCH, phi=phi, wire=wire, states=states,
    )
    return work, price(work, load_scenario("heterogeneous"), server_round=server_round)


@pytest.mark.parametrize(
    "cls, scheme, kwargs",
    [
        (PSL, "psl", {"cut_layer": [2, 3]}),
        (SL, "sl", {"cut_layer": 3}),
        (SFLV1, "sflv1", {"cut_layer": [2, 4]}),
        (SFLV2, "sflv2", {"cut_layer": 3}),
        (SFLGA, "sflga", {"cut_layer": 3}),
        (EPSL, "epsl", {"cut_layer": 3, "phi": 0.25}),
        (EPSL, "epsl", {"cut_layer": 2, "phi": 0.5}),
        (EPSL, "epsl", {"cut_layer": 3, "phi": 1.0}),
        (EPSL, "epsl", {"cut_layer": 3, "phi": 0.5, "codec_up": "fp8-e4m3", "codec_down": "fp8-e5m2"}),
    ],
)
def test_measured_round_prices_like_the_predicted_round(cls, scheme, kwargs, one_torch_thread):
    parts = [random_data(s, seed=i) for i, s in enumerate(SIZES)]
    strategy, _, _ = run_strategy(cls, parts, num_rounds=2, batch_size=BATCH, scenario=load_scenario("heterogeneous"), **kwargs)
    for r, entry in enumerate(strategy.history.rounds, start=1):
        work, cost = _predicted_cost(strategy, scheme, entry, r, phi=kwargs.get("phi", 0.0))
        sim = entry["sim"]
        assert sim["round_latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-9, abs=0)
        assert sim["energy_j"] == pytest.approx(cost.total_energy_j, rel=1e-9, abs=0)
        assert sim["server_flops"] == pytest.approx(work.server_flops, rel=1e-12)
        assert sim["broadcast_bytes"] == work.broadcast_bytes
        measured_up = sorted(c["uplink_bytes"] for c in sim["clients"].values())
        assert measured_up == sorted(c.uplink_bytes for c in work.clients)


def test_epsl_server_backward_is_reduced_by_phi(one_torch_thread):
    """The runtime charges EPSL the backward rows it runs: (1 - phi) N b + phi b per step."""
    parts = [random_data(16, seed=i) for i in range(4)]
    scenario = load_scenario("heterogeneous")
    flops = {}
    for phi in (0.0, 0.5, 1.0):
        strategy, _, _ = run_strategy(EPSL, parts, batch_size=8, cut_layer=3, phi=phi, scenario=scenario)
        flops[phi] = strategy.history.rounds[0]["sim"]["server_flops"]
    cut = profile_model(model_fn(), (1, 8, 8)).cut(3)
    n, b, steps = 4, 8, 2
    for phi, got in flops.items():
        m = math.ceil(phi * b)
        expected = steps * (n * b * cut.server_forward_flops + ((n * (b - m)) + m) * cut.server_backward_flops)
        assert got == pytest.approx(expected, rel=1e-12)
    assert flops[1.0] < flops[0.5] < flops[0.0]


def test_async_states_price_like_their_traffic_model(one_torch_thread):
    """A, then B (one-way upload, frozen client), then C (nothing sent, server on its cache)."""
    parts = [random_data(16, seed=3), random_data(16, seed=4)]
    strategy, _, _ = run_strategy(
        AsyncSL, parts, num_rounds=4, batch_size=BATCH, max_steps=2, cut_layer=2, loss_threshold=1e9,
        scenario=load_scenario("heterogeneous"),
    )
    seen = set()
    for r, entry in enumerate(strategy.history.rounds, start=1):
        nodes = sorted(int(n) for n in entry["cuts"])
        states = {i: entry["async"][str(n)]["state"] for i, n in enumerate(nodes)}
        seen |= set(states.values())
        _, cost = _predicted_cost(strategy, "async", entry, r, states=states)
        assert entry["sim"]["round_latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-9, abs=0)
        assert entry["sim"]["energy_j"] == pytest.approx(cost.total_energy_j, rel=1e-9, abs=0)
    assert seen == {"A", "B", "C"}


def test_price_takes_a_planned_allocation_and_the_server_timing_option():
    """Bandwidth, power, clocks and server shares change the price as the formulas say."""
    profile = profile_model(model_fn(), (1, 8, 8))
    scenario = load_scenario("heterogeneous")
    work = predict_workload("psl", profile, cuts=[2, 5], samples=[64, 32], client_ids=[0, 5])
    band = scenario.channel.total_bandwidth_hz
    alloc = Allocation(bandwidth_hz=[0.75 * band, 0.25 * band], tx_power_w=[0.05, 0.2], cpu_hz=[0.25e9, 2e9],
                       server_cpu_share=[0.6, 0.4])
    after = price(work, scenario, alloc)
    per_client = price(work, scenario, alloc, server_timing=ServerTiming.PER_CLIENT)
    n0 = 10 ** ((-174 - 30) / 10)
    speed = scenario.server.cpu_hz * scenario.server.flops_per_cycle
    chains, energy = [], 0.0
    for i, (cid, cut, n) in enumerate(((0, 2, 64), (5, 5, 32))):
        dev = scenario.device(cid)
        cp = profile.cut(cut)
        g = scenario.channel_gain(cid, 0)
        bw = alloc.bandwidth_hz[i]
        bits = n * cp.smashed_elements * 4 * 8
        t_up = bits / (bw * math.log2(1 + alloc.tx_power_w[i] * g / (bw * n0)))
        t_down = bits / (bw * math.log2(1 + scenario.server.tx_power_w * g / (bw * n0)))
        cycles = n * (cp.client_forward_flops + cp.client_backward_flops) / dev.flops_per_cycle
        server = n * (cp.server_forward_flops + cp.server_backward_flops) / speed
        chains.append((cycles / alloc.cpu_hz[i] + t_up + t_down, server))
        energy += dev.kappa * alloc.cpu_hz[i] ** 2 * cycles + alloc.tx_power_w[i] * t_up
    total_server = sum(s for _, s in chains)
    assert after.round_latency_s == pytest.approx(max(c for c, _ in chains) + total_server, rel=1e-9)
    shares = alloc.server_cpu_share
    assert per_client.round_latency_s == pytest.approx(max(c + s / sh for (c, s), sh in zip(chains, shares)), rel=1e-9)
    assert after.total_energy_j == pytest.approx(energy, rel=1e-9)
    assert per_client.server_timing == "per-client" and after.server_timing == "after-clients"


@pytest.mark.parametrize(
    "alloc, message",
    [
        (Allocation(bandwidth_hz=[1e9, 1e9]), "more than the band"),
        (Allocation(cpu_hz=[1e12, 1e9]), r"cpu_hz\[0\].*above client 0's clock"),
        (Allocation(tx_power_w=[0.1]), "tx_power_w has 1 entries for 2 clients"),
        (Allocation(tx_power_w=[0.1, float("nan")]), r"tx_power_w\[1\] must be finite"),
        (Allocation(server_cpu_share=[0.7, 0.7]), "server_cpu_share sums to"),
    ],
)
def test_price_refuses_an_impossible_allocation(alloc, message):
    work = predict_workload("psl", profile_model(model_fn(), (1, 8, 8)), cuts=[2, 2], samples=[8, 8])
    with pytest.raises(ValueError, match=message):
        price(work, load_scenario("heterogeneous"), alloc)
