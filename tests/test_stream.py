"""The stream data plane gives the same models as the message plane, bit for bit.

Every scheme is run twice on the same in-process nodes: once over Flower messages (the
reference: ``MessageDataPlane`` on a grid that handles each message at once) and once over
``StreamDataPlane`` sessions (a threaded grid, so a ClientApp can hold its message for the
round). The final weights must be equal, and so must the bytes counted.
"""

from __future__ import annotations

import threading

import pytest
import torch
from flwr.app import ArrayRecord

from flsplit.wire import protocol as p
from flsplit.planes.inprocess import InProcessGrid
from flsplit.planes.stream import StreamDataPlane
from flsplit.runtime.trainer import ClientTrainer
from flsplit.strategies import STRATEGIES
from tests.helpers import client_app_for, model_fn, random_data


def _run(name: str, partitions, stream: bool, num_rounds: int = 2, **kwargs):
    grid = InProcessGrid(client_app_for(partitions), len(partitions), threaded=stream)
    settings = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, shuffle=True, batch_size=16,
                    momentum=0.9)
    settings.update(kwargs)
    if stream:
        settings.setdefault("data_plane_factory", lambda g, timeout: StreamDataPlane(g, 60.0, mode="stream"))
    strategy = STRATEGIES[name](model_fn=model_fn, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=num_rounds)
    grid.shutdown()
    return strategy, result.arrays.to_torch_state_dict(), grid


def _assert_same(message_run, stream_run) -> None:
    (s_msg, w_msg, _), (s_str, w_str, _) = message_run, stream_run
    assert w_msg.keys() == w_str.keys()
    for key in w_msg:
        assert torch.equal(w_msg[key], w_str[key]), key
    for r_msg, r_str in zip(s_msg.history.rounds, s_str.history.rounds):
        assert not r_msg["errors"] and not r_str["errors"]
        for field in ("bytes_up", "bytes_down", "split_bytes_up", "split_bytes_down", "broadcast_bytes_down", "num_examples"):
            assert r_msg.get(field) == r_str.get(field), field


PARTS = [random_data(48, seed=s) for s in (11, 12, 13)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name,extra", [
    ("sl", {"cut_layer": [1, 3, 2]}), ("psl", {"cut_layer": [1, 3, 2]}), ("sflv1", {"cut_layer": [1, 3, 2]}),
    ("epsl", {"phi": 0.5, "cut_layer": 2}), ("epsl", {"phi": 0.5, "cut_layer": 2, "positions": "matched"}),
    ("sflga", {"cut_layer": 3}),
])
def test_stream_plane_gives_the_message_planes_weights(name, extra, k):
    message_run = _run(name, PARTS, stream=False, steps_per_exchange=k, **extra)
    stream_run = _run(name, PARTS, stream=True, steps_per_exchange=k, **extra)
    _assert_same(message_run, stream_run)
    strategy, _, grid = stream_run
    for entry in strategy.history.rounds:
        assert set(entry["data_plane"].values()) == {"stream"} and len(entry["data_plane"]) == 3
    # one Flower message per node and round carried the whole round
    assert grid.messages_by_type[p.TRAIN_STEP] == 3  # one carrier per node for the run: round 2 starts with a frame
    assert message_run[2].messages_by_type[p.TRAIN_STEP] > 3 * 2


@pytest.mark.parametrize("k", [1, 2])
def test_async_states_a_b_c_on_the_stream(k):
    """One node through states A, A, B, C, C (the threshold is never reached after the
    first reference loss): the A rounds and the B upload on the node's one session (one
    Flower message for the run), C silent, and the same weights as on messages."""
    parts = [random_data(32, seed=21)]
    kwargs = dict(loss_threshold=1e9, steps_per_exchange=k, num_rounds=5, cut_layer=2)
    message_run = _run("async", parts, stream=False, **kwargs)
    stream_run = _run("async", parts, stream=True, **kwargs)
    _assert_same(message_run, stream_run)
    strategy, _, grid = stream_run
    states = [next(iter(r["async"].values()))["state"] for r in strategy.history.rounds]
    assert states == ["A", "A", "B", "C", "C"]
    assert [r["data_plane"] for r in strategy.history.rounds] == [{"1000": "stream"}] * 2 + [{}] * 3
    assert grid.messages_by_type == {p.TRAIN_STEP: 1}


def test_sflv2_on_the_stream_with_one_node_is_exact():
    """SFL-V2 trains one server part in arrival order: with one node the order is fixed."""
    parts = [random_data(48, seed=31)]
    _assert_same(_run("sflv2", parts, stream=False), _run("sflv2", parts, stream=True))


def test_kept_graph_removes_the_recompute(monkeypatch):
    """One batch per exchange on the stream: one client forward per batch (the message
    plane computes each twice: once to send, once to back-propagate)."""
    calls = {"n": 0}
    original = ClientTrainer.forward

    def counting(self, position):
        calls["n"] += 1
        return original(self, position)

    monkeypatch.setattr(ClientTrainer, "forward", counting)
    _run("psl", PARTS, stream=True, num_rounds=1)
    batches = 3 * 3  # three nodes, 48 samples in batches of 16
    assert calls["n"] == batches
    calls["n"] = 0
    _run("psl", PARTS, stream=False, num_rounds=1)
    assert calls["n"] == 2 * batches


def test_federated_evaluation_and_state_after_a_stream_round():
    """Evaluation requests go as messages next to the sessions; the node state the stream
    committed is the one the message plane leaves."""
    message_run = _run("psl", PARTS, stream=False, fraction_evaluate=1.0)
    stream_run = _run("psl", PARTS, stream=True, fraction_evaluate=1.0)
    _assert_same(message_run, stream_run)
    for r_msg, r_str in zip(message_run[0].history.rounds, stream_run[0].history.rounds):
        assert r_msg["eval_accuracy"] == r_str["eval_accuracy"] and r_msg["eval_loss"] == r_str["eval_loss"]
    for node, ctx in message_run[2].contexts.items():
        ref, got = ctx.state, stream_run[2].contexts[node].state
        assert ref.config_records.keys() == got.config_records.keys()
        for name, rec in ref.config_records.items():
            assert dict(rec) == dict(got.config_records[name]), name
        for name, rec in ref.array_records.items():
            assert {k: a.data for k, a in rec.items()} == {k: a.data for k, a in got.array_records[name].items()}, name


def test_auto_falls_back_per_node_and_says_why():
    """A node that cannot reach the listener answers its offer over messages (auto); the
    round is the message plane's, and the history says which plane each node used."""
    plane = {}

    def factory(grid, timeout):
        plane["p"] = StreamDataPlane(grid, 60.0, mode="auto", advertise="127.0.0.1:9")  # nothing listens there
        return plane["p"]

    stream_run = _run("psl", PARTS, stream=True, data_plane_factory=factory)
    _assert_same(_run("psl", PARTS, stream=False), stream_run)
    for entry in stream_run[0].history.rounds:
        assert set(entry["data_plane"].values()) == {"message"}


def test_no_thread_outlives_the_run():
    before = {t.ident for t in threading.enumerate()}
    _run("psl", PARTS, stream=True, num_rounds=1)
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not [n for n in left if n.startswith("flsplit-stream")], left


def _run_app(tmp_path, threaded: bool, num_nodes: int, **run_config) -> dict:
    """The project's ServerApp and ClientApp on an in-process grid (threaded: sessions can run)."""
    import json

    from flwr.app import Context, RecordDict

    from apps.client_app import app as client_app
    from apps.server_app import main as server_app

    run_config = {"output-dir": str(tmp_path / "runs"), **run_config}
    grid = InProcessGrid(client_app, num_nodes, run_config=run_config, threaded=threaded)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    grid.shutdown()
    (history_file,) = (tmp_path / "runs").glob("*/history.json")
    return json.loads(history_file.read_text())


def test_adaptive_strategy_over_the_stream_from_the_run_config(tmp_path):
    """EdgeSplit in the loop, different cuts per client, through the project's apps: the
    run config's ``data-plane="stream"`` trains the model ``"message"`` does."""
    config = {"strategy": "psl", "planner": "edgesplit", "cost-scenario": "edge-diverse", "max-steps": 3,
              "num-server-rounds": 2}
    msg = _run_app(tmp_path / "m", False, 4, **config, **{"data-plane": "message"})
    st = _run_app(tmp_path / "s", True, 4, **config, **{"data-plane": "stream"})
    assert [r["cuts"] for r in st["rounds"]] == [r["cuts"] for r in msg["rounds"]]
    assert len(set(st["rounds"][0]["cuts"].values())) > 1
    assert all(set(r["data_plane"].values()) == {"stream"} for r in st["rounds"])
    assert all(set(r["data_plane"].values()) == {"message"} for r in msg["rounds"])
    final_m, final_s = torch.load(msg["final_model"]), torch.load(st["final_model"])
    assert all(torch.equal(final_m[k], final_s[k]) for k in final_m)
    assert [r["sim"]["round_latency_s"] for r in st["rounds"]] == [r["sim"]["round_latency_s"] for r in msg["rounds"]]


def _bn_model():
    from torch import nn

    from flsplit.model.splitting import SplitModel

    from flsplit.model import rng

    with rng.seeded(7):  # the same weights every time, without resetting the global generator
        return SplitModel(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                                        nn.Flatten(1), nn.Dropout(0.1), nn.Linear(8 * 8 * 8, 10)).double())


@pytest.mark.parametrize("k", [1, 2])
def test_batch_norm_statistics_and_dropout_agree_on_both_planes(k):
    """A client part with batch norm and dropout (cut 4), dropout on the server too: the
    running statistics move once per batch on both planes, and the dropout masks are the same
    (seeded per client batch; the server's not interleaved with client threads' draws)."""
    from flwr.clientapp import ClientApp

    from flsplit.runtime.client import SplitClient

    clients = [SplitClient(_bn_model, d, d, salt=i) for i, d in enumerate(PARTS[:2])]
    app = ClientApp()
    app.train("split_step")(lambda msg, ctx: clients[int(ctx.node_config["partition-id"])].train_step(msg, ctx))
    weights = {}
    for stream in (False, True):
        torch.manual_seed(99)  # the server's dropout draws from the global generator: same start
        grid = InProcessGrid(app, 2, threaded=stream)
        extra = {"data_plane_factory": lambda g, t: StreamDataPlane(g, 60.0, mode="stream")} if stream else {}
        strategy = STRATEGIES["psl"](model_fn=_bn_model, input_shape=(1, 8, 8), num_classes=10, cut_layer=4,
                                     batch_size=16, steps_per_exchange=k, momentum=0.9, **extra)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(_bn_model().blocks.state_dict()), num_rounds=2)
        grid.shutdown()
        weights[stream] = result.arrays.to_torch_state_dict()
        assert not any(r["errors"] for r in strategy.history.rounds)
    assert int(weights[True]["1.num_batches_tracked"]) == 2 * 3  # once per batch of a round, averaged over nodes
    for key in weights[False]:
        assert torch.equal(weights[False][key], weights[True][key]), key
