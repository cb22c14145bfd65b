"""Issue 20 items 3-4, the server's side: what does not fit is refused at construction, a
failing node is an error that names its cause, a run that trained no one fails, and the
server's dropout masks depend on the seed alone."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from flsplit.runtime.client import SplitClient
from flsplit.planes.dataplane import innermost_error
from flsplit.runtime.history import RunHistory
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.splitting import SplitModel
from flsplit.strategies import PSL, SFLV1, SL
from flsplit.strategies.settings import assign_cuts
from tests.helpers import client_app_for, client_app_of, model_fn, random_data

DIGITS = dict(input_shape=(1, 8, 8), num_classes=10)  # tests.helpers.model_fn: the 9-block digits CNN


def _mlp() -> SplitModel:
    """30 features, 2 classes; 3 blocks."""
    return SplitModel(nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2)))


# ------------------------------------------------------------------ refused at construction
@pytest.mark.parametrize("cut", [0, 9, -1, [2, 9], (1, 0)])
def test_a_cut_outside_the_model_is_refused_at_construction(cut):
    where = r"cut_layer\[1\]" if isinstance(cut, (list, tuple)) else "cut_layer"
    with pytest.raises(ValueError, match=rf"^{where} -?\d+ is outside the model: valid cuts are 1\.\.8 "
                                         r"\(the model has 9 blocks\)$"):
        PSL(model_fn=model_fn, cut_layer=cut, **DIGITS)


@pytest.mark.parametrize("cut", [2.5, 2.0, "2", True, None, [2, "3"], [2, 1.5]])
def test_a_cut_that_is_not_an_integer_is_refused_not_truncated(cut):
    with pytest.raises(ValueError, match=r"is not a cut layer: cuts are integers 1\.\.8"):
        PSL(model_fn=model_fn, cut_layer=cut, **DIGITS)
    with pytest.raises(ValueError, match=r"cut_layer is an empty list"):
        PSL(model_fn=model_fn, cut_layer=[], **DIGITS)


def test_a_cut_function_is_checked_every_round_without_truncation():
    parts = [random_data(8, seed=1), random_data(8, seed=2)]
    for fn, message in (
        (lambda rnd, nodes: {n: 2.5 for n in nodes}, r"round 1, node 1000: cut 2\.5 is not a cut layer"),
        (lambda rnd, nodes: {n: 9 for n in nodes}, r"round 1, node 1000: cut 9 is outside the model: valid cuts are 1\.\.8"),
        (lambda rnd, nodes: {nodes[0]: 2}, r"round 1 has no cut for nodes \[1001\]"),
    ):
        grid = InProcessGrid(client_app_for(parts), 2)
        strategy = PSL(model_fn=model_fn, cut_layer=fn, max_steps=1, batch_size=4, **DIGITS)
        with pytest.raises(ValueError, match=message):
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
        assert not grid.messages_by_type  # refused before anything was sent
    strategy = PSL(model_fn=model_fn, cut_layer=[np.int64(3), 2], **DIGITS)  # integers of any type
    assert assign_cuts(strategy.model, strategy.settings.cut_layer, 1, [7, 5]) == {5: 3, 7: 2}


def test_an_input_shape_that_does_not_fit_names_torchs_error():
    with pytest.raises(ValueError, match=r"^input_shape \(29,\) does not fit the model: mat1 and mat2 shapes cannot "
                                         r"be multiplied \(1x29 and 30x8\)$"):
        PSL(model_fn=_mlp, input_shape=(29,), num_classes=2)
    with pytest.raises(ValueError, match=r"^input_shape \(3, 8, 8\) does not fit the model: .*channels"):
        PSL(model_fn=model_fn, input_shape=(3, 8, 8), num_classes=10)
    for bad in [(), (0, 8, 8), (1, 8.5, 8), "1,8,8", 30, (True, 8, 8)]:
        with pytest.raises(ValueError, match=r"^input_shape must be the shape of one sample, positive integers"):
            PSL(model_fn=model_fn, input_shape=bad, num_classes=10)
    assert PSL(model_fn=_mlp, input_shape=[30], num_classes=2).input_shape == (30,)


def test_num_classes_must_match_the_models_output():
    with pytest.raises(ValueError, match=r"^num_classes is 1 but the model outputs 10 classes \(per-sample output "
                                         r"shape \(10,\)\)$"):
        PSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=1)
    with pytest.raises(ValueError, match=r"^num_classes is 10 but the model outputs 2 classes"):
        PSL(model_fn=_mlp, input_shape=(30,), num_classes=10)
    conv = lambda: SplitModel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))  # noqa: E731
    with pytest.raises(ValueError, match=r"^num_classes is 2 but the model's per-sample output shape is \(2, 6, 6\), "
                                         r"not \(2,\) or \(\.\.\., 2\): its last block must output one logit per class "
                                         r"\(per position\)$"):
        PSL(model_fn=conv, input_shape=(1, 8, 8), num_classes=2)
    for bad in [0, -3, 2.5, True, "10", None]:
        with pytest.raises(ValueError, match=r"^num_classes must be an integer >= 1, got "):
            PSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=bad)


def test_the_server_app_refuses_a_cut_outside_the_model_before_anything_runs(tmp_path):
    from apps.server_app import build_strategy
    from apps.task import RunSettings

    settings = RunSettings({"cut-layer": "9", "cost-scenario": "none"})  # digits-cnn: 9 blocks
    with pytest.raises(ValueError, match=r"^cut_layer 9 is outside the model: valid cuts are 1\.\.8"):
        build_strategy(settings, RunHistory(tmp_path))
    with pytest.raises(ValueError, match=r"^cut_layer\[1\] 12 is outside the model"):
        build_strategy(RunSettings({"cut-layer": "1,12", "cost-scenario": "none"}), RunHistory(tmp_path))


# ------------------------------------------------------------------ the model's own generator
def plain_model_fn() -> SplitModel:
    """What a user writes: no seeding. Dropout in the client part (cut 3) and the server part."""
    return SplitModel(nn.Sequential(nn.Flatten(1), nn.Linear(64, 32), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                                    nn.Dropout(0.5), nn.Linear(32, 10)).double())


PARTS = [random_data(24, seed=11), random_data(20, seed=12)]


def _train(cls, clients, initial, seed=3, rounds=3):
    grid = InProcessGrid(client_app_of(clients), len(clients))
    strategy = cls(model_fn=plain_model_fn, cut_layer=3, batch_size=8, learning_rate=0.1, momentum=0.9, seed=seed,
                   **DIGITS)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    assert not any(r["errors"] for r in strategy.history.rounds)
    return result.arrays.to_torch_state_dict()


@pytest.mark.parametrize("cls", [PSL, SFLV1])
def test_the_same_run_twice_gives_the_same_weights_whatever_else_draws(cls):
    initial = ArrayRecord(plain_model_fn().blocks.state_dict())
    clients = [SplitClient(plain_model_fn, d, d, salt=i) for i, d in enumerate(PARTS)]
    before = torch.get_rng_state()
    first = _train(cls, clients, initial)
    assert torch.equal(torch.get_rng_state(), before)  # building, training: the global stream did not move
    torch.rand(17)  # the caller draws, builds models, ...
    plain_model_fn()
    again = _train(cls, clients, initial)  # ... and the clients were used already
    fresh = _train(cls, [SplitClient(plain_model_fn, d, d, salt=i) for i, d in enumerate(PARTS)], initial)
    for key in first:
        assert torch.equal(first[key], again[key]) and torch.equal(first[key], fresh[key]), key
    other = _train(cls, clients, initial, seed=4)  # the seed does pick the masks
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_constructing_a_strategy_moves_no_random_stream():
    state = torch.get_rng_state()
    a = PSL(model_fn=plain_model_fn, cut_layer=3, **DIGITS)
    b = PSL(model_fn=plain_model_fn, cut_layer=3, **DIGITS)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, b.model.blocks.state_dict()[k]) for k, v in a.model.blocks.state_dict().items())


# ------------------------------------------------------------------ failing nodes are errors
def _app(train=None, evaluate=None, train_name="split_step"):
    """A ClientApp of SplitClients on PARTS-like data whose handlers may be replaced."""
    clients = [SplitClient(model_fn, d, d, salt=i) for i, d in enumerate([random_data(12, seed=1), random_data(12, seed=2)])]
    app = ClientApp()

    def who(ctx):
        return clients[int(ctx.node_config["partition-id"])]

    @app.train(train_name)
    def _train(msg: Message, ctx: Context):
        return (train or who(ctx).train_step)(msg, ctx)

    @app.evaluate("split_eval")
    def _eval(msg: Message, ctx: Context):
        return (evaluate or who(ctx).evaluate)(msg, ctx)

    return app


def _mismatch(msg, ctx):
    nn.Linear(30, 10)(torch.zeros(4, 29))  # torch's own error, raised inside the handler


@pytest.fixture
def flwr_lines():
    lines: list[tuple[int, str]] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append((record.levelno, record.getMessage()))
    logging.getLogger("flwr").addHandler(handler)
    yield lines
    logging.getLogger("flwr").removeHandler(handler)


def _run(app, tmp_path, rounds=2, style="deployment", **kwargs):
    history = RunHistory(tmp_path)
    strategy = PSL(model_fn=model_fn, cut_layer=2, batch_size=4, max_steps=2, history=history, **DIGITS, **kwargs)
    grid = InProcessGrid(app, 2, error_style=style)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=rounds)
    finally:
        saved = json.loads(history.path.read_text())
    return strategy, saved


@pytest.mark.parametrize("style", ["deployment", "simulation"])
def test_a_run_in_which_no_node_trained_fails_naming_the_innermost_cause(tmp_path, flwr_lines, style):
    cause = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x29 and 30x10)"
    with pytest.raises(RuntimeError, match=r"^no node finished a round in 2 rounds; last errors: node 1000: node dropped "
                                           r"for this round: RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        _run(_app(train=_mismatch), tmp_path, style=style, fail_untrained=True)
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved["error"].startswith("no node finished a round in 2 rounds")
    for entry in saved["rounds"]:
        assert entry["status"] == "error" and (entry["nodes_sampled"], entry["nodes_finished"]) == (2, 0)
        assert entry["nodes_dropped"] == [1000, 1001]
        assert [e["error"] for e in entry["errors"]] == [f"node dropped for this round: {cause}"] * 2
        assert all(e["stage"] == "train" for e in entry["errors"])
    lines = [(level, text) for level, text in flwr_lines if "| nodes " in text]
    assert len(lines) == 2 and all(level == logging.ERROR for level, _ in lines)
    assert lines[0][1].endswith(f"| nodes 0/2, 2 dropped: {cause}")
    assert not any("Traceback" in text or "ClientAppException" in text for _, text in flwr_lines if "[flsplit]" in text)


def test_with_fail_untrained_off_the_run_returns_but_says_it_trained_no_one(tmp_path, flwr_lines):
    strategy, saved = _run(_app(train=_mismatch), tmp_path, rounds=1, fail_untrained=False)
    assert saved["error"].startswith("no node finished a round in 1 round; last errors: node 1000:")
    assert (logging.ERROR, f"[flsplit] {saved['error']}") in flwr_lines


def test_a_run_where_some_rounds_trained_goes_on_and_marks_the_empty_ones(tmp_path, flwr_lines):
    clients = {}

    def flaky(msg, ctx):  # node 1001 fails in round 1 only, node 1000 in every round
        node = int(ctx.node_config["partition-id"])
        if node == 0 or msg.content.config_records["split.config"]["server_round"] == 1:
            raise ValueError(f"node {ctx.node_id}: no data today")
        client = clients.setdefault(node, SplitClient(model_fn, random_data(12, seed=2), salt=node))
        return client.train_step(msg, ctx)

    strategy, saved = _run(_app(train=flaky), tmp_path, rounds=2, fail_untrained=True)
    first, second = saved["rounds"]
    assert first["status"] == "error" and first["nodes_finished"] == 0
    assert second["status"] == "warning" and (second["nodes_finished"], second["nodes_dropped"]) == (1, [1000])
    assert "error" not in saved
    lines = [(level, text) for level, text in flwr_lines if "| nodes " in text]
    assert [level for level, _ in lines] == [logging.ERROR, logging.WARNING]
    assert lines[0][1].endswith("| nodes 0/2, 2 dropped: ValueError: node 1000: no data today "
                                "(+1 other errors in the history)")
    assert lines[1][1].endswith("| nodes 1/2, 1 dropped: ValueError: node 1000: no data today")
    ok = [text for _, text in flwr_lines if text.startswith("[flsplit] round ") and "| nodes" not in text]
    assert ok == []  # every round here had a dropped node


def test_a_handler_under_the_wrong_name_says_which_message_type_has_none(tmp_path, flwr_lines):
    with pytest.raises(RuntimeError, match=r"the ClientApp has no handler for message type 'train\.split_step'"):
        _run(_app(train_name="split_stepp"), tmp_path, rounds=1, style="simulation", fail_untrained=True)
    saved = json.loads((tmp_path / "history.json").read_text())
    (entry,) = saved["rounds"]
    error = entry["errors"][0]["error"]
    assert "train.split_step" in error and "split_client_app" in error and "evaluate.split_eval" in error
    assert any("nodes 0/2, 2 dropped: the ClientApp has no handler for message type 'train.split_step'" in text
               for _, text in flwr_lines)


@pytest.mark.parametrize("style", ["deployment", "simulation"])
def test_a_failing_split_eval_is_recorded_with_its_reason(tmp_path, flwr_lines, style):
    def broken(msg, ctx):
        raise ValueError(f"node {ctx.node_id}: evaluation data unreadable")

    strategy, saved = _run(_app(evaluate=broken), tmp_path, rounds=1, style=style, fraction_evaluate=1.0)
    (entry,) = saved["rounds"]
    assert entry["nodes_finished"] == 2 and entry["status"] == "error"  # trained, but evaluation failed everywhere
    assert (entry["eval_nodes_sampled"], entry["eval_nodes_finished"]) == (2, 0) and "eval_accuracy" not in entry
    assert entry["errors"] == [
        {"node": n, "error": f"evaluation failed: ValueError: node {n}: evaluation data unreadable", "stage": "evaluate"}
        for n in (1000, 1001)
    ]
    (line,) = [(level, text) for level, text in flwr_lines if "eval nodes" in text]
    assert line[0] == logging.ERROR
    assert line[1].endswith("| eval nodes 0/2, 2 failed: ValueError: node 1000: evaluation data unreadable "
                            "(+1 other errors in the history)")


def test_a_healthy_round_logs_its_plain_line(tmp_path, flwr_lines):
    strategy, saved = _run(_app(), tmp_path, rounds=1, fraction_evaluate=1.0, fail_untrained=True)
    (entry,) = saved["rounds"]
    assert entry["status"] == "ok" and (entry["nodes_sampled"], entry["nodes_finished"], entry["nodes_dropped"]) == (2, 2, [])
    assert (entry["eval_nodes_sampled"], entry["eval_nodes_finished"]) == (2, 2)
    (line,) = [(level, text) for level, text in flwr_lines if text.startswith("[flsplit] round 1/1")]
    assert line[0] == logging.INFO and "nodes" not in line[1]


def test_the_server_app_fails_a_run_that_trained_no_one(tmp_path):
    from apps.server_app import app as server_app

    grid = InProcessGrid(_app(train=_mismatch), 2)
    config = {"strategy": "sl", "max-steps": 1, "cost-scenario": "none", "num-server-rounds": 2,
              "output-dir": str(tmp_path / "runs")}
    with pytest.raises(RuntimeError, match=r"^no node finished a round in 2 rounds"):
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (history,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/history.json")]
    assert history["error"].startswith("no node finished") and history["final_model"] is None


# ------------------------------------------------------------------ what an error reply's reason becomes
# What Flower's simulation engine put in an error reply when a handler raised torch's error
# (Ray 2.55, flwr 1.41: RayTaskError(ClientAppException) rendered with ANSI colours).
RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=5833, "
    "ip=192.0.2.2, actor_id=55f09940fac6b3c6bab683c201000000, repr=<flwr.simulation.ray_transport.ray_actor."
    "ClientAppActor object at 0x7fc66ef0f390>)\n"
    '  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1783, in _wrapped_call_impl\n'
    "    return self._call_impl(*args, **kwargs)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 134, in forward\n'
    "    return F.linear(input, self.weight, self.bias)\n           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x29 and 30x10)\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=5833, ip=192.0.2.2, actor_id=55f09940fac6b3c6bab683c201000000)\n"
    '  File "/venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: mat1 and mat2 shapes cannot be multiplied (4x29 and 30x10)'>"
)


def test_innermost_error_keeps_what_the_handler_raised():
    cause = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x29 and 30x10)"
    assert innermost_error(RAY_REASON) == cause
    assert innermost_error("the client failed before its session opened: " + RAY_REASON) == (
        "the client failed before its session opened: " + cause)
    assert innermost_error(innermost_error(RAY_REASON)) == cause
    assert innermost_error("<class 'flsplit.wire.protocol.ProtocolError'>:<'train request: bad'>") == "ProtocolError: train request: bad"
    assert innermost_error("<class 'ValueError'>:<'two\nlines'>") == "ValueError: two lines"
    assert innermost_error("labels outside [0, 10)") == "labels outside [0, 10)"  # no reply inside: as it is
    long = innermost_error("<class 'ValueError'>:<'" + "x" * 2000 + "'>")
    assert len(long) == 500 and long.endswith("...")
    nested = ValueError("node 3: data-path: bad file")
    nested.__cause__ = OSError("No such file")
    grid = InProcessGrid(ClientApp(), 1, error_style="simulation")

    def raise_nested(msg, ctx):
        raise nested

    grid.client_app.query("split_device")(raise_nested)
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), "query.split_device", 1000, "g")])
    assert "Traceback" in reply.error.reason and "ClientAppException" in reply.error.reason
    assert innermost_error(reply.error.reason) == "ValueError: node 3: data-path: bad file"  # what the handler raised
