"""Every scheme learns the held-out digits through the real ServerApp and ClientApps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from apps.client_app import app as client_app
from apps.server_app import app as server_app
from flsplit.planes.inprocess import InProcessGrid


def run_app(tmp_path: Path, num_nodes: int = 4, **run_config) -> dict:
    """Run the project's ServerApp on an in-process grid; return its history.json."""
    run_config = {"output-dir": str(tmp_path / "runs"), **run_config}
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app(grid, context)
    (history_file,) = (tmp_path / "runs").glob("*/history.json")
    return json.loads(history_file.read_text())


@pytest.mark.parametrize("strategy", ["sl", "sflv1", "sflv2", "psl"])
def test_scheme_reaches_90_percent_within_10_rounds(tmp_path, strategy):
    history = run_app(tmp_path, strategy=strategy, **{"num-server-rounds": 10})
    accuracies = [r["test_accuracy"] for r in history["rounds"]]
    assert len(accuracies) == 10
    assert max(accuracies) >= 0.90, accuracies
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and not r["errors"] for r in history["rounds"])
    assert Path(history["final_model"]).exists()


def test_psl_with_mixed_cuts_in_one_round_trains(tmp_path):
    history = run_app(tmp_path, strategy="psl", **{"cut-layer": "1,3,5,7", "num-server-rounds": 10})
    assert set(history["rounds"][0]["cuts"].values()) == {1, 3, 5, 7}
    assert max(r["test_accuracy"] for r in history["rounds"]) >= 0.85


def test_several_steps_per_exchange_train_with_fewer_messages(tmp_path):
    """K = 4 batches per exchange: a quarter of the messages, still learning (plain SGD:
    stale cut-layer gradients and heavy momentum do not mix, see SplitConfig)."""
    config = {"num-server-rounds": 3, "momentum": 0.0, "learning-rate": 0.2}
    one = run_app(tmp_path / "k1", strategy="sflv2", **config)
    four = run_app(tmp_path / "k4", strategy="sflv2", **config, **{"steps-per-exchange": 4})
    assert four["rounds"][0]["messages"] < one["rounds"][0]["messages"] / 2
    assert four["rounds"][0]["num_examples"] == one["rounds"][0]["num_examples"]
    assert four["rounds"][-1]["test_accuracy"] >= one["rounds"][-1]["test_accuracy"] - 0.1
    assert four["rounds"][-1]["test_accuracy"] >= 0.5


def test_federated_split_evaluation_matches_centralized(tmp_path):
    """Clients hold disjoint shares of the test split; pooled split evaluation = centralized."""
    history = run_app(tmp_path, strategy="psl", **{"num-server-rounds": 1, "fraction-evaluate": 1.0})
    r = history["rounds"][0]
    assert r["eval_accuracy"] == pytest.approx(r["test_accuracy"], abs=1e-12)
    assert r["eval_loss"] == pytest.approx(r["test_loss"], rel=1e-5)
