"""The wireless edge cost model against numbers worked out by hand, and its scenario loaders.

Expected values are explicit arithmetic on the model's formulas (DESIGN.md 3.6), never
numbers read off the code under test:
PL(dB) = 128.1 + 37.6 log10(d_km), g = 10^(-PL/10) |h|^2, N0 = 10^((-174 - 30)/10) W/Hz,
rate = B log2(1 + p g / (B N0)), time = bytes * 8 / rate, compute time = F / (c f),
compute energy = kappa f^2 F / c, transmit energy = p * uplink time.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile, dbm_to_w, path_loss_db, rayleigh_power
from flsplit.sim.workload import client_flops, server_flops, smashed_bytes
from flsplit.model.profile import BlockProfile, ModelProfile
from flsplit.sim.scenario_files import (
    device_from_node_config,
    load_scenario,
    scenario_from_dict,
    scenario_from_flat,
    scenario_from_run_config,
    scenario_from_toml,
    shipped_scenarios,
)

from tests.oracle import broadcast_time_s, round_cost, shannon_rate_bps

N0 = 10 ** ((-174 - 30) / 10)  # W/Hz


def gain_at(distance_m: float) -> float:
    """Path-loss-only gain, by hand."""
    return 10 ** (-(128.1 + 37.6 * math.log10(distance_m / 1000)) / 10)


def rate(bandwidth_hz: float, power_w: float, gain: float) -> float:
    return bandwidth_hz * math.log2(1 + power_w * gain / (bandwidth_hz * N0))


DEVICE = DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.2, distance_m=100)
SERVER = ServerProfile(cpu_hz=20e9, flops_per_cycle=4, tx_power_w=1.0)


def flat_scenario(devices=(DEVICE,), **channel) -> Scenario:
    """No fading: every number below is deterministic."""
    return Scenario(devices, SERVER, Channel(**{"bandwidth_hz": 20e6, "fading": "none", **channel}), seed=7)


# --- formulas ----------------------------------------------------------------------------------


def test_unit_conversions_and_path_loss():
    assert dbm_to_w(-174) == pytest.approx(N0, rel=1e-12)
    assert dbm_to_w(30) == pytest.approx(1.0)
    # d = 100 m = 0.1 km: 128.1 + 37.6 * (-1) = 90.5 dB; d = 1 km: 128.1 dB.
    assert path_loss_db(100) == pytest.approx(90.5)
    assert path_loss_db(1000) == pytest.approx(128.1)
    assert Channel(bandwidth_hz=1e6).noise_psd_w_per_hz == pytest.approx(N0, rel=1e-12)


def test_shannon_rate_by_hand():
    g = 10 ** (-90.5 / 10)
    snr = 0.2 * g / (5e6 * N0)  # about 7.1e3: 38.5 dB
    assert shannon_rate_bps(5e6, 0.2, g, N0) == pytest.approx(5e6 * math.log2(1 + snr), rel=1e-12)
    assert shannon_rate_bps(0.0, 0.2, g, N0) == 0.0  # an unused share carries nothing


def test_one_client_round_by_hand():
    s = flat_scenario()
    cost = round_cost(
        s,
        client_ids=[0, 1, 2, 3],
        client_flops=[2e9, 0, 0, 0],
        uplink_bytes=[1e6, 0, 0, 0],
        downlink_bytes=[5e5, 0, 0, 0],
        server_flops=8e9,
    )
    c = cost.clients[0]
    b = 20e6 / 4  # the band split equally among 4 clients
    g = 10 ** (-90.5 / 10)
    up_rate = b * math.log2(1 + 0.2 * g / (b * N0))
    down_rate = b * math.log2(1 + 1.0 * g / (b * N0))
    assert c.bandwidth_hz == pytest.approx(b)
    assert c.channel_gain == pytest.approx(g, rel=1e-12)
    assert c.uplink_rate_bps == pytest.approx(up_rate, rel=1e-12)
    assert c.downlink_rate_bps == pytest.approx(down_rate, rel=1e-12)
    assert c.compute_latency_s == pytest.approx(2e9 / (4 * 1e9))  # 0.5 s
    assert c.uplink_latency_s == pytest.approx(8e6 / up_rate, rel=1e-12)
    assert c.downlink_latency_s == pytest.approx(4e6 / down_rate, rel=1e-12)
    assert c.latency_s == pytest.approx(0.5 + 8e6 / up_rate + 4e6 / down_rate, rel=1e-12)
    assert c.compute_energy_j == pytest.approx(1e-28 * (1e9) ** 2 * (2e9 / 4), rel=1e-12)  # 0.05 J
    assert c.transmit_energy_j == pytest.approx(0.2 * 8e6 / up_rate, rel=1e-12)
    assert c.energy_j == pytest.approx(0.05 + 0.2 * 8e6 / up_rate, rel=1e-12)
    # The idle clients cost nothing.
    assert [x.latency_s for x in cost.clients[1:]] == [0, 0, 0]
    assert cost.server_latency_s == pytest.approx(8e9 / (4 * 20e9))  # 0.1 s
    assert cost.round_latency_s == pytest.approx(c.latency_s + 0.1, rel=1e-12)
    assert cost.total_energy_j == pytest.approx(c.energy_j, rel=1e-12)


def test_per_device_distance_power_and_allocation_overrides():
    far = DeviceProfile(cpu_hz=0.5e9, flops_per_cycle=2, kappa=2e-28, tx_power_w=0.1, distance_m=200)
    s = flat_scenario(devices=(DEVICE, far))
    cost = round_cost(
        s,
        client_ids=[0, 1],
        client_flops=[1e9, 1e9],
        uplink_bytes=[1e6, 1e6],
        downlink_bytes=[0, 0],
        bandwidth_shares=[0.25, 0.75],
        tx_power_w=[0.2, 0.15],
    )
    near_c, far_c = cost.clients
    assert far_c.bandwidth_hz == pytest.approx(15e6)
    assert far_c.uplink_rate_bps == pytest.approx(rate(15e6, 0.15, gain_at(200)), rel=1e-12)
    assert near_c.uplink_rate_bps == pytest.approx(rate(5e6, 0.2, gain_at(100)), rel=1e-12)
    assert far_c.compute_latency_s == pytest.approx(1e9 / (2 * 0.5e9))  # 1 s
    assert far_c.compute_energy_j == pytest.approx(2e-28 * 0.25e18 * 0.5e9, rel=1e-12)
    assert far_c.transmit_energy_j == pytest.approx(0.15 * 8e6 / rate(15e6, 0.15, gain_at(200)), rel=1e-12)


def test_ofdma_subchannels():
    ch = Channel(num_subchannels=16, subchannel_bandwidth_hz=1.25e6, fading="none")
    assert ch.total_bandwidth_hz == pytest.approx(20e6)
    # As even as possible: 16 = 6 + 5 + 5.
    assert list(ch.client_bandwidths_hz(3)) == pytest.approx([7.5e6, 6.25e6, 6.25e6])
    assert list(ch.client_bandwidths_hz(2, subchannels=[3, 1])) == pytest.approx([3.75e6, 1.25e6])
    assert list(ch.client_bandwidths_hz(2, exclusive=True)) == pytest.approx([20e6, 20e6])
    s = Scenario((DEVICE,), SERVER, ch)
    cost = round_cost(s, client_ids=[0, 1], client_flops=[0, 0], uplink_bytes=[1e3, 1e3], downlink_bytes=[0, 0],
                      subchannels=[3, 1])
    assert cost.clients[0].uplink_rate_bps == pytest.approx(rate(3.75e6, 0.2, gain_at(100)), rel=1e-12)
    with pytest.raises(ValueError, match="subchannels"):
        ch.client_bandwidths_hz(2, subchannels=[10, 10])
    with pytest.raises(ValueError, match="17 clients cannot share 16 subchannels"):
        ch.client_bandwidths_hz(17)
    with pytest.raises(ValueError, match="OFDMA"):
        Channel(bandwidth_hz=1e6).client_bandwidths_hz(1, subchannels=[1])


# --- fading ------------------------------------------------------------------------------------


def test_fading_is_reproducible_and_varies_per_round_and_client():
    s = Scenario((DEVICE,), SERVER, Channel(bandwidth_hz=20e6), seed=3)
    assert s.fading_power(2, 5) == s.fading_power(2, 5)
    assert s.fading_power(2, 5) == Scenario((DEVICE,), SERVER, Channel(bandwidth_hz=20e6), seed=3).fading_power(2, 5)
    assert s.fading_power(2, 5) != s.fading_power(2, 6)  # per round
    assert s.fading_power(2, 5) != s.fading_power(1, 5)  # per client
    assert rayleigh_power(3, 5, 2) != rayleigh_power(4, 5, 2)  # per seed
    # Keyed by (seed, round, client id): |h|^2 ~ Exp(1) from numpy's generator on that key.
    assert s.fading_power(2, 5) == np.random.default_rng([3, 5, 2]).exponential(1.0)
    assert s.channel_gain(2, 5) == pytest.approx(gain_at(100) * s.fading_power(2, 5), rel=1e-12)
    # Unit mean, as Exp(1): 4000 draws, standard error about 0.016.
    draws = [rayleigh_power(0, r, c) for r in range(400) for c in range(10)]
    assert np.mean(draws) == pytest.approx(1.0, abs=0.08)
    # A client's draw does not depend on who else is in the round.
    alone = round_cost(s, client_ids=[2], client_flops=[0], uplink_bytes=[1e3], downlink_bytes=[0], server_round=5)
    crowd = round_cost(s, client_ids=[0, 2, 5], client_flops=[0] * 3, uplink_bytes=[1e3] * 3, downlink_bytes=[0] * 3,
                       server_round=5)
    assert alone.clients[0].channel_gain == crowd.clients[1].channel_gain
    assert crowd.clients[1].uplink_rate_bps == pytest.approx(
        rate(20e6 / 3, 0.2, gain_at(100) * s.fading_power(2, 5)), rel=1e-12
    )


def test_no_fading_option():
    s = flat_scenario()
    assert s.fading_power(0, 1) == 1.0
    assert s.channel_gain(4, 9) == pytest.approx(gain_at(100), rel=1e-12)


# --- broadcast and timing rules ----------------------------------------------------------------


def test_broadcast_is_limited_by_the_weakest_receiver():
    devices = tuple(
        DeviceProfile(cpu_hz=1e9, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.2, distance_m=d) for d in (50, 100, 200)
    )
    s = flat_scenario(devices=devices)
    cost = round_cost(s, client_ids=[0, 1, 2], client_flops=[0] * 3, uplink_bytes=[0] * 3, downlink_bytes=[0] * 3,
                      broadcast_bytes=1e5)
    # One transmission over the whole 20 MHz at the server's 1 W, paced by the 200 m client.
    expected = 8e5 / rate(20e6, 1.0, gain_at(200))
    assert cost.broadcast_latency_s == pytest.approx(expected, rel=1e-12)
    assert [c.downlink_latency_s for c in cost.clients] == pytest.approx([expected] * 3, rel=1e-12)
    assert cost.round_latency_s == pytest.approx(expected, rel=1e-12)
    # Only clients 0 and 1 receive it: the 100 m client is now the weakest.
    cost = round_cost(s, client_ids=[0, 1, 2], client_flops=[0] * 3, uplink_bytes=[0] * 3, downlink_bytes=[0] * 3,
                      broadcast_bytes=1e5, broadcast_receivers=[0, 1])
    assert cost.broadcast_latency_s == pytest.approx(8e5 / rate(20e6, 1.0, gain_at(100)), rel=1e-12)
    assert cost.clients[2].downlink_latency_s == 0.0
    assert broadcast_time_s(10, [3.0, 1.0, 2.0]) == pytest.approx(80.0)
    assert broadcast_time_s(0, []) == 0.0


def test_parallel_versus_sequential_round_latency():
    s = flat_scenario()
    work = dict(client_ids=[0, 1], client_flops=[4e9, 2e9], uplink_bytes=[2e6, 1e6], downlink_bytes=[2e6, 1e6],
                server_flops=16e9)
    server = 16e9 / (4 * 20e9)  # 0.2 s
    g = gain_at(100)

    par = round_cost(s, timing="parallel", **work)
    b = 10e6  # two clients share the band at once
    chains = [f / 4e9 + n * 8 / rate(b, 0.2, g) + n * 8 / rate(b, 1.0, g) for f, n in ((4e9, 2e6), (2e9, 1e6))]
    assert [c.latency_s for c in par.clients] == pytest.approx(chains, rel=1e-12)
    assert par.round_latency_s == pytest.approx(max(chains) + server, rel=1e-12)

    seq = round_cost(s, timing="sequential", **work)
    b = 20e6  # the clients take turns, each owns the whole band
    chains = [f / 4e9 + n * 8 / rate(b, 0.2, g) + n * 8 / rate(b, 1.0, g) for f, n in ((4e9, 2e6), (2e9, 1e6))]
    assert seq.round_latency_s == pytest.approx(sum(chains) + server, rel=1e-12)
    # Same work, same energy per FLOP; less transmit energy on the wider band.
    assert seq.total_energy_j < par.total_energy_j

    # A broadcast reaches every receiver at once: counted once in a sequential round.
    seq_b = round_cost(s, timing="sequential", broadcast_bytes=1e5, **work)
    bcast = 8e5 / rate(20e6, 1.0, g)
    assert seq_b.round_latency_s == pytest.approx(sum(chains) + bcast + server, rel=1e-12)


def test_result_is_plain_json():
    s = load_scenario("heterogeneous")
    cost = round_cost(s, client_ids=range(8), client_flops=[1e8] * 8, uplink_bytes=[1e5] * 8,
                      downlink_bytes=[1e5] * 8, server_flops=1e9, server_round=2, broadcast_bytes=1e4)
    d = json.loads(json.dumps(cost.as_dict()))
    assert d["round_latency_s"] == cost.round_latency_s
    assert d["clients"][3]["client_id"] == 3 and len(d["clients"]) == 8
    assert d["total_energy_j"] == pytest.approx(sum(c["energy_j"] for c in d["clients"]))
    assert cost.round_latency_s == pytest.approx(max(c.latency_s for c in cost.clients) + cost.server_latency_s)


# --- FLOPs from a profile ----------------------------------------------------------------------


def test_flops_from_a_profile():
    # What profile_model measures for Linear(4,3) | ReLU | Linear(3,2) (see test_profile.py):
    # cut 1 -> client fwd 24, bwd 24; server fwd 12, bwd 24; 3 smashed elements.
    blocks = [BlockProfile(24, 24, 3, 60), BlockProfile(0, 0, 3, 0), BlockProfile(12, 24, 2, 32)]
    cut = ModelProfile(blocks).cut(1)
    assert client_flops(cut, 10) == 10 * (24 + 24)
    assert client_flops(cut, 10, backward=False) == 10 * 24
    assert server_flops(cut, 10) == 10 * (12 + 24)
    assert server_flops(cut, 10, backward_samples=4) == 10 * 12 + 4 * 24
    assert smashed_bytes(cut, 10) == 10 * 3 * 4
    assert smashed_bytes(cut, 10, bytes_per_element=1) == 30


# --- scenarios -------------------------------------------------------------------------------


def test_shipped_scenarios_load():
    assert {"homogeneous", "heterogeneous"} <= set(shipped_scenarios())
    homo = load_scenario("homogeneous")
    assert homo.name == "homogeneous" and len(homo.devices) == 8 and len(set(homo.devices)) == 1
    assert homo.channel.bandwidth_hz == 20e6 and homo.channel.fading == "rayleigh"
    d = homo.devices[0]
    assert 0.5e9 <= d.cpu_hz <= 2e9 and d.kappa == 1e-28 and 0.1 <= d.tx_power_w <= 0.2 and 50 <= d.distance_m <= 200
    hetero = load_scenario("heterogeneous")
    assert len(hetero.devices) == 8 and len(set(hetero.devices)) == 8
    assert len({x.cpu_hz for x in hetero.devices}) > 1 and len({x.distance_m for x in hetero.devices}) > 1
    assert hetero.channel.ofdma and hetero.channel.total_bandwidth_hz == pytest.approx(20e6)
    assert hetero.device(9) == hetero.devices[1]  # cycled
    # as_dict is a scenario file's shape
    assert scenario_from_dict(hetero.as_dict()) == hetero


CUSTOM = """
name = "lab"
seed = 11

[server]
cpu_hz = 10e9          # snake_case is accepted too
flops-per-cycle = 8
tx-power-w = 0.5

[channel]
bandwidth-hz = 10e6
fading = "none"

[[devices]]
cpu-hz = 1e9
flops-per-cycle = 4
kappa = 1e-28
tx-power-w = 0.1
distance-m = 100
count = 2

[[devices]]
cpu-hz = 2e9
flops-per-cycle = 4
kappa = 1e-28
tx-power-w = 0.2
distance-m = 50
"""


def test_custom_toml(tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text(CUSTOM)
    for s in (load_scenario(path), load_scenario(str(path)), scenario_from_toml(path)):
        assert s.name == "lab" and s.seed == 11
        assert s.server == ServerProfile(cpu_hz=10e9, flops_per_cycle=8, tx_power_w=0.5)
        assert s.channel == Channel(bandwidth_hz=10e6, fading="none")
        assert [d.cpu_hz for d in s.devices] == [1e9, 1e9, 2e9]
    (tmp_path / "unnamed.toml").write_text(CUSTOM.replace('name = "lab"', ""))
    assert load_scenario(tmp_path / "unnamed.toml").name == "unnamed"


@pytest.mark.parametrize(
    "edit, match",
    [
        (("bandwidth-hz = 10e6", "bandwidth-hz = -1"), "bandwidth_hz must be > 0"),
        (("bandwidth-hz = 10e6", "bandwidth-hz = 0"), "bandwidth_hz must be > 0"),
        (("cpu-hz = 2e9", "cpu-hz = 0"), r"devices\[1\].*cpu_hz must be > 0"),
        (("cpu_hz = 10e9", "cpu_hz = -10e9"), r"server.*cpu_hz must be > 0"),
        (("distance-m = 50", ""), r"devices\[1\].*missing 'distance-m'"),
        (("kappa = 1e-28\ntx-power-w = 0.2", "kappa = -1e-28\ntx-power-w = 0.2"), "kappa must be >= 0"),
        (("distance-m = 50", "distance-m = 50\ncolor = 'red'"), r"devices\[1\].*unknown key 'color'"),
        (("seed = 11", "seed = 11\nextra = 1"), "unknown key 'extra'"),
        (("fading = \"none\"", "fading = \"rician\""), "fading must be one of"),
        (("bandwidth-hz = 10e6", "bandwidth-hz = 10e6\nnum-subchannels = 4"), "not both"),
        (("bandwidth-hz = 10e6", "num-subchannels = 4"), "subchannel_bandwidth_hz"),
        (("count = 2", "count = 0"), "count must be an integer >= 1"),
        (("tx-power-w = 0.5", "tx-power-w = true"), "tx_power_w must be a number"),
        (("[server]", "[serverr]"), "unknown key 'serverr'"),
        (("name = \"lab\"", "name = "), "not valid TOML"),
    ],
)
def test_bad_toml_names_the_field(tmp_path, edit, match):
    path = tmp_path / "bad.toml"
    old, new = edit
    assert old in CUSTOM
    path.write_text(CUSTOM.replace(old, new, 1))
    with pytest.raises(ValueError, match=match):
        load_scenario(path)


def test_unknown_scenario_name(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped scenario .*homogeneous"):
        load_scenario("homogenous")
    with pytest.raises(ValueError, match="neither"):
        load_scenario(tmp_path / "missing.toml")


# --- run config and node config ----------------------------------------------------------------


def test_scenario_from_run_config():
    config = {
        "strategy": "psl",  # not a cost-model key: ignored
        "num-server-rounds": 3,
        "cost-device-cpu-hz": "1e9, 2e9",  # per device
        "cost-device-flops-per-cycle": 4,
        "cost-device-kappa": 1e-28,
        "cost-device-tx-power-w": 0.2,
        "cost-device-distance-m": "100,50",
        "cost-server-cpu-hz": 20e9,
        "cost-server-flops-per-cycle": 4,
        "cost-server-tx-power-w": 1.0,
        "cost-bandwidth-hz": 10e6,
        "cost-fading": "none",
        "cost-seed": 5,
    }
    s = scenario_from_run_config(config)
    assert s.seed == 5 and s.channel == Channel(bandwidth_hz=10e6, fading="none")
    assert s.devices == (
        DeviceProfile(1e9, 4, 1e-28, 0.2, 100),
        DeviceProfile(2e9, 4, 1e-28, 0.2, 50),
    )
    assert s.server == SERVER
    assert scenario_from_run_config({"strategy": "psl"}) is None
    assert scenario_from_run_config({"cost-scenario": "none"}) is None
    # Un-prefixed keys through scenario_from_flat, or any prefix.
    flat = {k[len("cost-"):]: v for k, v in config.items() if k.startswith("cost-")}
    assert scenario_from_flat(flat) == s
    assert scenario_from_run_config({"sim." + k: v for k, v in flat.items()}, prefix="sim.") == s


def test_run_config_overrides_a_base_scenario():
    s = scenario_from_run_config({"cost-scenario": "heterogeneous", "cost-device-tx-power-w": 0.15, "cost-seed": 2})
    base = load_scenario("heterogeneous")
    assert s.seed == 2 and s.channel == base.channel
    assert [d.tx_power_w for d in s.devices] == [0.15] * 8
    assert [d.cpu_hz for d in s.devices] == [d.cpu_hz for d in base.devices]
    # bandwidth-hz on an OFDMA base switches to a shared band; a list sets the device count.
    s = scenario_from_run_config({"cost-scenario": "heterogeneous", "cost-bandwidth-hz": 5e6,
                                  "cost-device-distance-m": "10,20,30"})
    assert s.channel.bandwidth_hz == 5e6 and not s.channel.ofdma
    assert [d.distance_m for d in s.devices] == [10, 20, 30]
    assert [d.cpu_hz for d in s.devices] == [d.cpu_hz for d in base.devices[:3]]
    s = scenario_from_run_config({"cost-scenario": "homogeneous", "cost-num-subchannels": 8,
                                  "cost-subchannel-bandwidth-hz": 1e6})
    assert s.channel.ofdma and s.channel.total_bandwidth_hz == 8e6


@pytest.mark.parametrize(
    "config, match",
    [
        ({"cost-scenario": "homogeneous", "cost-device-cpu-hx": 1e9}, "unknown key 'device-cpu-hx'"),
        ({"cost-scenario": "homogeneous", "cost-bandwidth-hz": 0}, "bandwidth_hz must be > 0"),
        ({"cost-scenario": "homogeneous", "cost-device-cpu-hz": "1e9,fast"}, "cpu-hz must be a number, got 'fast'"),
        ({"cost-scenario": "homogeneous", "cost-device-cpu-hz": "1e9,2e9", "cost-device-kappa": "1,2,3"}, "one length"),
        ({"cost-scenario": "homogeneous", "cost-server-cpu-hz": -1}, r"server.*cpu_hz must be > 0"),
        ({"cost-device-cpu-hz": 1e9}, "missing 'server-cpu-hz'"),
        (
            {"cost-device-cpu-hz": 1e9, "cost-server-cpu-hz": 1e9, "cost-server-flops-per-cycle": 4,
             "cost-server-tx-power-w": 1, "cost-bandwidth-hz": 1e6},
            "device 0: missing 'device-flops-per-cycle'",
        ),
        ({"cost-scenario": "homogeneous", "cost-fading": "rician"}, "fading must be one of"),
        ({"cost-scenario": "nowhere"}, "neither a shipped scenario"),
        ({"cost-scenario": "none", "cost-seed": 1}, "cost model off"),
    ],
)
def test_bad_run_config(config, match):
    with pytest.raises(ValueError, match=match):
        scenario_from_run_config(config)


def test_device_from_node_config():
    nc = {"partition-id": 3, "num-partitions": 8, "cpu-hz": "1.5e9", "flops-per-cycle": 8, "kappa": 1e-28,
          "tx-power-w": 0.1, "distance-m": 120}
    assert device_from_node_config(nc) == DeviceProfile(1.5e9, 8, 1e-28, 0.1, 120)
    # Partial: the rest from a default; none of the keys: the default itself.
    assert device_from_node_config({"partition-id": 0, "distance-m": 30}, default=DEVICE) == DeviceProfile(
        1e9, 4, 1e-28, 0.2, 30
    )
    assert device_from_node_config({"partition-id": 0}, default=DEVICE) is DEVICE
    assert device_from_node_config({"partition-id": 0}) is None
    with pytest.raises(ValueError, match="node config: missing 'flops-per-cycle'"):
        device_from_node_config({"cpu-hz": 1e9})
    with pytest.raises(ValueError, match="cpu-hz must be a number"):
        device_from_node_config({"cpu-hz": "fast"}, default=DEVICE)
    with pytest.raises(ValueError, match="distance_m must be > 0"):
        device_from_node_config({"distance-m": 0}, default=DEVICE)
    # Devices reporting their profiles override the scenario's for their ids only.
    s = load_scenario("heterogeneous").with_devices({9: DEVICE}, num_clients=40)
    base = load_scenario("heterogeneous")
    assert s.device(9) == DEVICE and s.device(1) == base.device(1)
    assert all(s.device(i) == base.device(i) for i in range(40) if i != 9)


# --- bad round input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(timing="pipelined"), "timing must be one of"),
        (dict(uplink_bytes=[1.0]), "uplink_bytes has 1 entries for 2 clients"),
        (dict(downlink_bytes=[1.0, -1.0]), r"downlink_bytes\[1\] must be >= 0"),
        (dict(client_flops=[float("nan"), 0]), "must be finite"),
        (dict(client_ids=[1, 1]), "distinct"),
        (dict(client_ids=[-1, 0]), "must be >= 0"),
        (dict(bandwidth_shares=[0.7, 0.7]), "more than 1"),
        (dict(bandwidth_shares=[1.0, 0.0]), "client 1 has bytes to transfer but no bandwidth"),
        (dict(bandwidth_shares=[0.5, 0.5], subchannels=[1, 1]), "not both"),
        (dict(tx_power_w=[0.1, 0]), r"tx_power_w\[1\] must be > 0"),
        (dict(server_flops=-1), "server_flops must be >= 0"),
        (dict(broadcast_bytes=10, broadcast_receivers=[]), "at least one receiver"),
        (dict(broadcast_bytes=10, broadcast_receivers=[2]), "positions in client_ids"),
    ],
)
def test_bad_round_input(change, match):
    work = dict(client_ids=[0, 1], client_flops=[1e9, 1e9], uplink_bytes=[1e3, 1e3], downlink_bytes=[1e3, 1e3])
    with pytest.raises(ValueError, match=match):
        round_cost(flat_scenario(), **{**work, **change})


def test_profiles_reject_bad_values():
    with pytest.raises(ValueError, match="cpu_hz must be > 0"):
        DeviceProfile(cpu_hz=0, flops_per_cycle=4, kappa=1e-28, tx_power_w=0.1, distance_m=10)
    with pytest.raises(ValueError, match="flops_per_cycle must be > 0"):
        ServerProfile(cpu_hz=1e9, flops_per_cycle=-4, tx_power_w=1)
    with pytest.raises(ValueError, match="devices"):
        Scenario((), SERVER, Channel(bandwidth_hz=1e6))
    with pytest.raises(ValueError, match="seed must be >= 0"):
        Scenario((DEVICE,), SERVER, Channel(bandwidth_hz=1e6), seed=-1)
    with pytest.raises(ValueError, match="the channel needs bandwidth_hz"):
        Channel()
