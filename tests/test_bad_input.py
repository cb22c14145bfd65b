"""Malformed messages get an error that names the problem; no model is touched; the run goes on."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.planes.inprocess import SERVER_NODE_ID
from flsplit.strategies import PSL, SL
from tests.helpers import max_abs_diff, model_fn, random_data, run_strategy


def corrupt(kind: str):
    """A function that spoils the smashed data of a reply in one way."""

    def spoil(record: ArrayRecord) -> None:
        x = torch.from_numpy(record["x.0"].numpy())
        if kind == "shape":
            record["x.0"] = Array(x[:, :, :2])
        elif kind == "dtype":
            record["x.0"] = Array(x.float())
        elif kind == "nan":
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            record["x.0"] = Array(x)
        elif kind == "missing":
            del record["x.0"]
        elif kind == "labels":
            record["y.0"] = Array(torch.full_like(torch.from_numpy(record["y.0"].numpy()), 11))

    return spoil


EXPECTED = {
    "shape": "wrong shape",
    "dtype": "wrong dtype torch.float32, expected torch.float64",
    "nan": "NaN",
    "missing": "missing key 'x.0'",
    "labels": "labels outside [0, 10)",
}


def intercept_nth(node_index: int, which: int, spoil):
    """Spoil the ``which``-th smashed reply of the node with partition ``node_index``."""
    seen = {"n": 0}

    def intercept(node_id: int, reply: Message) -> Message:
        if node_id == 1000 + node_index and reply.has_content() and p.SMASHED in reply.content.array_records:
            seen["n"] += 1
            if seen["n"] == which:
                spoil(reply.content.array_records[p.SMASHED])
        return reply

    return intercept


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_smashed_data_leaves_the_server_part_unchanged(kind):
    """One client, one step, its only batch spoilt: nothing may be trained on it (the run,
    which then trained no node, would fail: ``fail_untrained=False`` lets it return)."""
    data = random_data(8, seed=1)
    strategy, result, _ = run_strategy(SL, [data], cut_layer=3, batch_size=8, max_steps=1, intercept=intercept_nth(0, 1, corrupt(kind)),
                                       fail_untrained=False)
    assert [EXPECTED[kind] in e["error"] for e in strategy.errors] == [True]
    # server part and client part are exactly the initial model: the batch was skipped
    assert max_abs_diff(result.arrays.to_torch_state_dict(), model_fn().blocks.state_dict()) == 0.0
    assert strategy.server.stats.samples == 0


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_node_whose_reply_is_refused_sits_out_the_rest_of_the_round(kind):
    parts = [random_data(12, seed=2), random_data(12, seed=3)]
    strategy, result, _ = run_strategy(
        PSL, parts, num_rounds=2, cut_layer=2, batch_size=4, intercept=intercept_nth(0, 2, corrupt(kind))
    )
    assert len(strategy.history.rounds) == 2
    first = strategy.history.rounds[0]
    assert len(first["errors"]) == 1 and EXPECTED[kind] in first["errors"][0]["error"]
    assert "sits out the rest of the round" in first["errors"][0]["error"]
    # node 0 sent 1 good batch, then a bad one: it sits out; only node 1's part is averaged,
    # and the server trained on node 0's first batch and node 1's three
    assert first["num_examples"] == 12 and first["examples_per_node"] == {"1001": 12}
    assert first["server_steps"] == 3
    assert not strategy.history.rounds[1]["errors"]
    assert strategy.history.rounds[1]["num_examples"] == 24
    assert all(torch.isfinite(v).all() for v in result.arrays.to_torch_state_dict().values())


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _request(cut: int, content: RecordDict) -> Message:
    content[p.CONFIG] = p.SplitConfig(server_round=1, cut=cut, batch_size=4, shuffle=False).to_record()
    message = Message(content, 5, p.TRAIN_STEP)
    message.metadata.__dict__["_message_id"] = "m"
    return message


def test_client_refuses_a_bad_gradient_and_keeps_its_state():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    client = SplitClient(model_fn, random_data(8, seed=3))
    ctx = _context()
    start = RecordDict({p.CLIENT_PART: ArrayRecord(model_fn().client_part(3).state_dict())})
    reply = client.train_step(_request(3, start), ctx)
    smashed = torch.from_numpy(reply.content.array_records[p.SMASHED]["x.0"].numpy())
    before = ctx.state.array_records["flsplit.client.weights"].to_torch_state_dict()

    bad = {
        "wrong shape": smashed[:, :1],
        "NaN": torch.full_like(smashed, float("nan")),
        "wrong dtype": smashed.float(),
    }
    for phrase, grad in bad.items():
        with pytest.raises(p.ProtocolError, match=phrase):
            client.train_step(_request(3, RecordDict({p.GRAD: ArrayRecord({"g.0": Array(grad)})})), ctx)
        after = ctx.state.array_records["flsplit.client.weights"].to_torch_state_dict()
        assert max_abs_diff(before, after) == 0.0
    with pytest.raises(p.ProtocolError, match="2 gradients for 1 pending"):
        client.train_step(_request(3, RecordDict({p.GRAD: ArrayRecord({"g.0": Array(smashed), "g.1": Array(smashed)})})), ctx)
    with pytest.raises(p.ProtocolError, match="no round in progress"):
        client.train_step(_request(3, RecordDict()), _context())


def test_impossible_configuration_is_refused_before_training():
    with pytest.raises(ValueError, match="valid cuts are 1..8"):
        run_strategy(PSL, [random_data(8, seed=1)], cut_layer=9)
    with pytest.raises(ValueError, match="learning-rate"):
        run_strategy(PSL, [random_data(8, seed=1)], learning_rate=float("nan"))
    with pytest.raises(ValueError, match="fraction-train"):
        run_strategy(PSL, [random_data(8, seed=1)], fraction_train=0.0)
