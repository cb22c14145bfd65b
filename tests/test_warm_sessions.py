"""A node's stream session lasts the run (issue 23, item 1): rounds after the first start with
a frame, not a ClientApp, and what users rely on still holds.

Each property is checked against an independent reference: the message plane's model, the
number of Flower messages the grid really handled, the wall clock against the exchange
timeout, or the node's ``context.state`` of its last committed round.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flsplit.planes.inprocess import InProcessGrid
from flsplit.planes.stream import StreamDataPlane
from flsplit.planes.stream.client_session import ClientSession
from flsplit.planes.stream.offer import SessionOffer
from flsplit.runtime.client import SplitClient
from flsplit.runtime.clientapp import split_client_app
from flsplit.strategies import STRATEGIES
from flsplit.wire import protocol as p
from tests.helpers import client_app_for, model_fn, random_data

PARTS = [random_data(48, seed=s) for s in (41, 42, 43)]
SETTINGS = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, shuffle=True, batch_size=16, momentum=0.9)


def _run(name: str, stream: bool, num_rounds: int = 3, app=None, grid_kwargs=None, plane_kwargs=None, **settings):
    grid = InProcessGrid(app or client_app_for(PARTS), len(PARTS), threaded=stream, **(grid_kwargs or {}))
    if stream:
        settings["data_plane_factory"] = lambda g, timeout: StreamDataPlane(g, **{"timeout": 60.0, "mode": "stream",
                                                                                 **(plane_kwargs or {})})
    strategy = STRATEGIES[name](model_fn=model_fn, **{**SETTINGS, **settings})
    started = time.monotonic()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=num_rounds)
    seconds = time.monotonic() - started
    grid.shutdown()
    return strategy, result.arrays.to_torch_state_dict(), grid, seconds


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["sl", "psl", "sflv1"])
def test_one_carrier_per_node_for_the_run_and_the_message_planes_model(name):
    """Three rounds, one Flower message per node in all (the first round's carrier); the
    model, the bytes and the per-node plane are the message plane's."""
    reference = _run(name, stream=False)
    strategy, weights, grid, _ = _run(name, stream=True)
    _same_weights(reference[1], weights)
    assert grid.messages_by_type == {p.TRAIN_STEP: len(PARTS)}
    for r_ref, r_got in zip(reference[0].history.rounds, strategy.history.rounds):
        assert not r_got["errors"]
        assert r_got["data_plane"] == {str(n): "stream" for n in grid.node_ids}
        for field in ("bytes_up", "bytes_down", "split_bytes_up", "split_bytes_down", "num_examples"):
            assert r_ref[field] == r_got[field], field


def test_detached_sessions_run_a_lockstep_round_on_fewer_clientapps_than_nodes():
    """PSL over 3 nodes on a grid that runs one ClientApp at a time: each ClientApp answers
    its carrier once its session is open and serves it from a thread, so the lockstep step has
    all three sessions at once (a held carrier would need three ClientApps)."""
    reference = _run("psl", stream=False)
    strategy, weights, grid, _ = _run("psl", stream=True, grid_kwargs={"max_workers": 1},
                                      plane_kwargs={"detach": True})
    _same_weights(reference[1], weights)
    assert grid.messages_by_type == {p.TRAIN_STEP: len(PARTS)}
    assert all(r["data_plane"] == {str(n): "stream" for n in grid.node_ids} for r in strategy.history.rounds)


def test_held_sessions_refuse_a_grid_that_cannot_hold_the_fleet():
    """Without detaching, every node's ClientApp is held for the run: on a grid of one
    ClientApp at a time ``auto`` keeps the run on messages (saying why), ``stream`` refuses."""
    reference = _run("sl", stream=False, num_rounds=1)
    strategy, weights, _, _ = _run("sl", stream=True, num_rounds=1, grid_kwargs={"max_workers": 1},
                                   plane_kwargs={"mode": "auto"})
    _same_weights(reference[1], weights)
    assert set(strategy.history.rounds[0]["data_plane"].values()) == {"message"}
    with pytest.raises(ValueError, match="3 nodes would hold one each, the grid runs 1 ClientApps at a time"):
        _run("sl", stream=True, num_rounds=1, grid_kwargs={"max_workers": 1})


def test_sessions_are_renewed_when_due_and_train_the_same_model():
    """A session older than ``renew_after`` is closed at the node's next round and a new one
    opened with a new carrier: one carrier per node and round here, the same model."""
    reference = _run("sl", stream=False)
    _, weights, grid, _ = _run("sl", stream=True, plane_kwargs={"renew_after": 1e-6})
    _same_weights(reference[1], weights)
    assert grid.messages_by_type == {p.TRAIN_STEP: 3 * len(PARTS)}


def test_evaluation_and_queries_between_rounds_travel_on_the_session():
    """Federated evaluation after each round goes to the nodes' open sessions as calls: no
    evaluation message reaches the grid, and the metrics are the message plane's."""
    reference = _run("psl", stream=False, fraction_evaluate=1.0)
    strategy, weights, grid, _ = _run("psl", stream=True, fraction_evaluate=1.0)
    _same_weights(reference[1], weights)
    assert grid.messages_by_type == {p.TRAIN_STEP: len(PARTS)}
    for r_ref, r_got in zip(reference[0].history.rounds, strategy.history.rounds):
        assert r_ref["eval_accuracy"] == r_got["eval_accuracy"] and r_ref["eval_loss"] == r_got["eval_loss"]


class _Flaky(SplitClient):
    """Node 1001 sends a NaN smashed batch at its 2nd train reply of round 2 (the gate drops it)."""

    def advance(self, trainer, content, new_round, context, keep_graph):
        reply = super().advance(trainer, content, new_round, context, keep_graph)
        cfg = p.SplitConfig.from_record(content.config_records[p.CONFIG])
        if context.node_id == 1001 and cfg.server_round == 2 and not new_round and p.SMASHED in reply.array_records:
            self.spoilt = getattr(self, "spoilt", 0) + 1
            if self.spoilt == 1:
                arrays = reply.array_records[p.SMASHED]
                x = arrays["x.0"].numpy().copy()
                x.flat[0] = float("nan")
                arrays["x.0"] = type(arrays["x.0"])(x)
        return reply


def test_a_node_dropped_mid_round_keeps_its_session_and_its_last_commit():
    """Node 1001 is dropped in round 2 (a NaN reply): it forgets that round, keeps its session
    (round 3 starts on it with a frame: still one carrier per node), and round 3 starts from its
    round-1 state, so it sends round 2's batches again: exactly what a node that failed in round 2
    on a per-round session would do (``context.state`` unchanged)."""
    app = split_client_app(lambda ctx: _Flaky(model_fn, PARTS[int(ctx.node_config["partition-id"])]))
    strategy, _, grid, _ = _run("sl", stream=True, app=app, shuffle=False)
    rounds = strategy.history.rounds
    assert [e["node"] for e in rounds[1]["errors"]] == [1001] and "NaN" in rounds[1]["errors"][0]["error"]
    assert rounds[2]["errors"] == [] and rounds[2]["data_plane"]["1001"] == "stream"
    assert grid.messages_by_type == {p.TRAIN_STEP: len(PARTS)}
    # The reference: the same node's round 3 on its round-1 cursor is its round 2 on messages.
    cursor = dict(grid.contexts[1001].state.config_records["flsplit.client.cursor"])
    assert cursor["position"] == 2 * (48 // 16)  # batches of rounds 1 and 3 committed, round 2 forgotten


def _slow_start_app(delay: float) -> ClientApp:
    """Each node's first message waits ``delay`` seconds first (a cold ClientApp: process
    start, imports, data load)."""
    started: set = set()
    lock = threading.Lock()

    def client_fn(ctx: Context) -> SplitClient:
        with lock:
            first = ctx.node_id not in started
            started.add(ctx.node_id)
        if first:
            time.sleep(delay)
        return SplitClient(model_fn, PARTS[int(ctx.node_config["partition-id"])])

    return split_client_app(client_fn)


def test_a_cold_start_does_not_count_against_the_exchange_timeout():
    """ClientApps that take 3 s to start, an exchange timeout of 1 s: every node opens its
    session (the open timeout applies until its HELLO) and the round trains all of them."""
    strategy, _, _, _ = _run("psl", stream=True, num_rounds=1, app=_slow_start_app(3.0),
                             plane_kwargs={"timeout": 1.0, "open_timeout": 30.0})
    (record,) = strategy.history.rounds
    assert record["errors"] == [] and record["data_plane"] == {"1000": "stream", "1001": "stream", "1002": "stream"}


def test_a_session_that_never_opens_is_dropped_at_the_open_timeout():
    """ClientApps that take 8 s to start, an open timeout of 2 s: every node is dropped at
    about 2 s with the reason, and the run fails as one in which no node finished."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no node finished a round") as failed:
        _run("psl", stream=True, num_rounds=1, app=_slow_start_app(8.0),
             plane_kwargs={"timeout": 1.0, "open_timeout": 2.0, "mode": "stream"})
    assert str(failed.value).count("no session opened within 2 s") == 3
    assert time.monotonic() - started < 8.0 + 8.0  # the ClientApps' own start, not a timeout more


def test_a_node_whose_session_breaks_does_not_hold_up_the_round():
    """Node 1002 connects, sends its first reply and then its connection dies while its
    ClientApp never answers the carrier (a SuperNode killed with SIGKILL): the round ends as
    soon as the others are done, not at the exchange timeout."""
    honest = client_app_for(PARTS)
    app = ClientApp()

    @app.train("split_step")
    def train(message: Message, context: Context) -> Message:
        if context.node_id != 1002:
            return honest(message, context)
        offer = SessionOffer.from_content(message.content)
        client = SplitClient(model_fn, PARTS[2])
        scratch = Context(run_id=1, node_id=1002, node_config=dict(context.node_config), state=RecordDict(),
                          run_config={})
        request = RecordDict({k: v for k, v in message.content.items() if k != "split.stream"})
        session = ClientSession.open(offer)
        session.reply(client.train_step(Message(request, 1002, p.TRAIN_STEP), scratch).content)
        session.close()  # the connection dies ...
        time.sleep(12.0)  # ... and the carrier is never answered while the run lasts
        raise RuntimeError("unreachable in the test's time")

    timeout = 20.0
    strategy, _, _, seconds = _run("sflv1", stream=True, num_rounds=1, app=app, plane_kwargs={"timeout": timeout},
                                   grid_kwargs={"max_workers": 3})
    (record,) = strategy.history.rounds
    assert [e["node"] for e in record["errors"]] == [1002]
    assert record["nodes_finished"] == 2
    assert seconds < timeout / 2
