"""The run config is checked in one place, before anything runs; each error names its key."""

from __future__ import annotations

import pytest

from apps.task import RunSettings
from flsplit.wire.protocol import ProtocolError, SplitConfig


@pytest.mark.parametrize("config, message", [
    ({"max-steps": -3}, "max-steps must be >= 0, got -3"),
    ({"seed": -1}, "seed must be in [0, 4294967295], got -1"),
    ({"seed": 2**40}, "seed must be in [0, 4294967295]"),
    ({"cut-layer": "2.5"}, "cut-layer must be a cut layer or a comma list"),
    ({"cut-layer": "0,2"}, "cut-layer must name cuts >= 1"),
    ({"batch-size": 0}, "batch-size must be >= 1, got 0"),
    ({"batch-size": 16.5}, "batch-size must be an integer, got 16.5"),
    ({"steps-per-exchange": True}, "steps-per-exchange must be an integer, got True"),
    ({"learning-rate": 0.0}, "learning-rate must be > 0, got 0"),
    ({"learning-rate": float("nan")}, "learning-rate must be finite"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1"),
    ({"local-epochs": 0}, "local-epochs must be >= 1 (or max-steps > 0)"),
    ({"num-server-rounds": 0}, "num-server-rounds must be >= 1, got 0"),
    ({"fraction-train": 0.0}, "fraction-train must be in (0, 1], got 0"),
    ({"fraction-evaluate": 1.5}, "fraction-evaluate must be in [0, 1], got 1.5"),
    ({"phi": -0.1}, "phi must be in [0, 1], got -0.1"),
    ({"exchange-timeout": 0}, "exchange-timeout must be > 0, got 0"),
    ({"min-available-nodes": 0}, "min-available-nodes must be >= 1, got 0"),
    ({"codec-up": "fp7"}, "unknown codec 'fp7'"),
    ({"partitioning": "by-label"}, "partitioning must be 'iid' or 'dirichlet'"),
    ({"stream-max-frame-mb": -1}, "stream-max-frame-mb must be > 0"),
    ({"no-such-key": 1}, "unknown run-config keys ['no-such-key']"),
])
def test_bad_run_config_is_refused_naming_its_key(config, message):
    with pytest.raises(ValueError) as info:
        RunSettings(config)
    assert message in str(info.value)


def test_defaults_and_the_shipped_config_are_valid():
    import tomllib
    from pathlib import Path

    RunSettings()
    shipped = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    RunSettings(shipped["tool"]["flwr"]["app"]["config"])


def test_a_client_refuses_a_bad_config_record_as_a_protocol_error():
    good = SplitConfig(server_round=1, cut=2).to_record()
    bad = SplitConfig(server_round=1, cut=2).to_record()
    bad["seed"] = -5
    assert SplitConfig.from_record(good).cut == 2
    with pytest.raises(ProtocolError, match="seed must be in"):
        SplitConfig.from_record(bad)
