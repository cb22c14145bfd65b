"""The history's simulated latency and energy, recomputed from its bytes and the measured profile."""

from __future__ import annotations

import math
import tomllib
from importlib import resources

import numpy as np
import pytest

from flsplit.model.profile import profile_model
from flsplit.model.zoo import digits_cnn
from tests.test_learning import run_app


def scenario_toml(name: str) -> dict:
    return tomllib.loads(resources.files("flsplit.sim.scenarios").joinpath(f"{name}.toml").read_text())


@pytest.mark.parametrize("strategy, timing", [("psl", "parallel"), ("sl", "sequential")])
def test_round_latency_recomputed_from_history_bytes_and_profile(tmp_path, strategy, timing):
    history = run_app(
        tmp_path, strategy=strategy, **{"num-server-rounds": 1, "cost-scenario": "heterogeneous", "cut-layer": "3"}
    )
    entry = history["rounds"][0]
    sim = entry["sim"]
    spec = scenario_toml("heterogeneous")
    devices, server, channel = spec["devices"], spec["server"], spec["channel"]
    profile = profile_model(digits_cnn(), (1, 8, 8)).cut(3)

    n0 = 10 ** ((channel["noise-psd-dbm-hz"] - 30) / 10)  # W/Hz
    nodes = sorted(entry["examples_per_node"], key=int)
    band = channel["num-subchannels"] * channel["subchannel-bandwidth-hz"]
    chains, energy, server_flops = [], 0.0, 0.0
    for client_id, node in enumerate(nodes):  # in-process partitions 0..3 on nodes 1000..1003
        dev = devices[client_id % len(devices)]
        examples = entry["examples_per_node"][node]
        up, down = entry["bytes_per_node"][node]["up"], entry["bytes_per_node"][node]["down"]
        # OFDMA: 16 subchannels split evenly over 4 parallel clients; SL's turn takes them all
        bw = band if timing == "sequential" else band / len(nodes)
        fading = np.random.default_rng([spec["seed"], 1, client_id]).exponential(1.0)
        gain = 10 ** (-(128.1 + 37.6 * math.log10(dev["distance-m"] / 1000)) / 10) * fading
        rate_up = bw * math.log2(1 + dev["tx-power-w"] * gain / (bw * n0))
        rate_down = bw * math.log2(1 + server["tx-power-w"] * gain / (bw * n0))
        flops = examples * (profile.client_forward_flops + profile.client_backward_flops)
        cycles = flops / dev["flops-per-cycle"]
        t_up = up * 8 / rate_up
        chains.append(cycles / dev["cpu-hz"] + t_up + down * 8 / rate_down)
        energy += dev["kappa"] * dev["cpu-hz"] ** 2 * cycles + dev["tx-power-w"] * t_up
        server_flops += examples * (profile.server_forward_flops + profile.server_backward_flops)
    server_time = server_flops / (server["cpu-hz"] * server["flops-per-cycle"])
    expected = (sum(chains) if timing == "sequential" else max(chains)) + server_time

    assert sim["timing"] == timing
    assert sim["round_latency_s"] == pytest.approx(expected, rel=1e-9)
    assert sim["energy_j"] == pytest.approx(energy, rel=1e-9)


def test_node_config_profile_overrides_the_scenario(tmp_path):
    """A SuperNode that describes its device in node_config is simulated as that device."""
    from flwr.app import Context, RecordDict

    from apps.client_app import app as client_app
    from apps.server_app import app as server_app
    from flsplit.planes.inprocess import InProcessGrid

    run_config = {"output-dir": str(tmp_path), "num-server-rounds": 1, "cost-scenario": "homogeneous", "strategy": "psl"}
    slow = InProcessGrid(client_app, 2, run_config=run_config)
    slow.contexts[slow.node_ids[0]].node_config["cpu-hz"] = 1e6  # a very slow device
    server_app(slow, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    import json

    (path,) = tmp_path.glob("*/history.json")
    clients = json.loads(path.read_text())["rounds"][0]["sim"]["clients"]
    fast, slow_client = clients[str(slow.node_ids[1])], clients[str(slow.node_ids[0])]
    assert slow_client["compute_latency_s"] == pytest.approx(fast["compute_latency_s"] * 1000, rel=0.01)
