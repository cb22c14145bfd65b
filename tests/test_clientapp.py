"""``split_client_app``: every handler under its name, one client per node, the salt from the
partition id; plain modules from ``model_fn``; model building off torch's global stream; data
that does not fit the model refused once per node with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

import flsplit
from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.runtime.clientapp import register_split_handlers, split_client_app
from flsplit.model.splitting import split_model_of
from flsplit.runtime.history import RunHistory
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.splitting import SplitModel
from flsplit.strategies import PSL
from tests.helpers import client_app_for, max_abs_diff, model_fn, random_data

PARTS = [random_data(40, seed=i) for i in range(2)]
SETTINGS = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, batch_size=8, max_steps=3)


def _train(app: ClientApp, rounds: int = 1, model=model_fn, **kwargs) -> tuple[dict, PSL]:
    strategy = PSL(model_fn=model, **{**SETTINGS, **kwargs})
    result = strategy.start(grid=InProcessGrid(app, len(PARTS)), num_rounds=rounds,
                            initial_arrays=ArrayRecord(model_fn().blocks.state_dict()))
    return result.arrays.to_torch_state_dict(), strategy


def _per_node(built: list | None = None, model=model_fn):
    def client_fn(context):
        if built is not None:
            built.append(context.node_id)
        data = PARTS[int(context.node_config["partition-id"])]
        return SplitClient(model, data, data)

    return client_fn


def test_top_level_exports():
    assert flsplit.TensorData is not None and flsplit.SplitClient is SplitClient
    assert flsplit.split_client_app is split_client_app and flsplit.register_split_handlers is register_split_handlers


def test_split_client_app_trains_like_clients_wired_by_hand():
    """Salt from the partition id: the same weights as clients built with ``salt=i``."""
    by_hand, _ = _train(client_app_for(PARTS), rounds=2, fraction_evaluate=1.0)
    one_line, strategy = _train(split_client_app(_per_node()), rounds=2, fraction_evaluate=1.0)
    assert max_abs_diff(by_hand, one_line) == 0.0
    assert not strategy.errors and strategy.history.rounds[-1]["eval_accuracy"] is not None


def test_every_handler_is_registered_and_the_client_is_built_once_per_node():
    built: list[int] = []
    app = ClientApp()
    client_for = register_split_handlers(app, _per_node(built))
    grid = InProcessGrid(app, 2)
    _train(app, rounds=2)  # a grid of its own: contexts differ, node ids too
    assert sorted(built) == [1000, 1001] and client_for.cache_info().currsize == 2
    for kind in (p.NOOP, p.DESCRIBE):
        (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), kind, 1001, "g")])
        assert not reply.has_error(), reply.error
    assert reply.content[p.DEVICE]["partition-id"] == 1 and reply.content[p.DEVICE]["num-train-examples"] == 40
    config = p.SplitConfig(server_round=1, cut=2, batch_size=8).to_record()
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict({p.CONFIG: config}), p.UPLOAD, 1000, "g")])
    assert "no client part to upload with" in reply.error.reason  # reached SplitClient.upload
    assert sorted(built) == [1000, 1001]  # same run config, node config and node id: cached


def test_salt_given_is_kept_and_a_wrong_client_fn_result_is_named():
    client = SplitClient(model_fn, PARTS[0], salt=7)
    grid = InProcessGrid(split_client_app(lambda ctx: client), 1)
    grid.send_and_receive([grid.create_message(RecordDict(), p.NOOP, 1000, "g")])  # noop builds nothing
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), p.DESCRIBE, 1000, "g")])
    assert client.salt == 7 and not reply.has_error()
    grid = InProcessGrid(split_client_app(lambda ctx: (model_fn, PARTS[0], None)), 1)
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), p.DESCRIBE, 1000, "g")])
    assert "client_fn must return a flsplit SplitClient, it returned tuple" in reply.error.reason


def test_model_fn_may_return_a_plain_module():
    """A plain ``nn.Sequential`` on the client trains exactly like its ``SplitModel``."""
    plain = lambda: model_fn().blocks  # noqa: E731
    wrapped, _ = _train(split_client_app(_per_node()))
    from_plain, strategy = _train(split_client_app(_per_node(model=plain)), model=plain)
    assert not strategy.errors and max_abs_diff(wrapped, from_plain) == 0.0
    assert isinstance(split_model_of(plain()), SplitModel)
    model = model_fn()
    assert split_model_of(model) is model
    with pytest.raises(TypeError, match="model_fn must return an nn.Module or a flsplit SplitModel, it returned builtins.dict"):
        split_model_of({"w": torch.zeros(1)})


def test_building_the_model_does_not_move_the_global_stream():
    """``helpers.model_fn`` calls ``torch.manual_seed``: the client builds it on a fork."""
    client = SplitClient(model_fn, PARTS[0], PARTS[0])
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    client._client_part(2)
    client.check_data(InProcessGrid(ClientApp(), 1).contexts[1000])
    assert torch.equal(torch.rand(4), expected)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def _tabular(width: int, n: int = 20) -> flsplit.TensorData:
    return flsplit.TensorData(torch.rand(n, width), torch.randint(0, 2, (n,)))


def test_data_of_the_wrong_shape_is_refused_once_per_node_with_a_clear_error():
    calls = []

    def mlp():
        calls.append(1)
        return _mlp()

    client = SplitClient(mlp, _tabular(29), None)
    context = InProcessGrid(ClientApp(), 1).contexts[1000]
    for _ in range(3):
        with pytest.raises(ValueError, match=r"^node 1000: data of per-sample shape \(29,\) does not fit the model: "
                                             r"mat1 and mat2 shapes cannot be multiplied"):
            client.check_data(context)
    assert len(calls) == 1  # checked once, the answer kept

    def known_shape():
        model = SplitModel(_mlp())
        model.input_shape = (30,)  # a SplitModel that knows its input shape
        return model

    with pytest.raises(ValueError, match=r"^node 1000: data has per-sample shape \(29,\), the model takes \(30,\)$"):
        SplitClient(known_shape, _tabular(29)).check_data(context)
    SplitClient(known_shape, _tabular(30)).check_data(context)
    SplitClient(mlp, _tabular(30), _tabular(30)).check_data(context)
    SplitClient(mlp, _tabular(29, n=0)).check_data(context)  # no samples: nothing to check


def test_the_server_gets_the_shape_error_in_its_round_record(tmp_path):
    parts = [_tabular(30), _tabular(29)]
    app = split_client_app(lambda ctx: SplitClient(_mlp, parts[int(ctx.node_config["partition-id"])]))
    model = lambda: SplitModel(_mlp())  # noqa: E731
    history = RunHistory(tmp_path)
    strategy = PSL(model_fn=model, input_shape=(30,), num_classes=2, cut_layer=1, batch_size=5, max_steps=2,
                   history=history)
    strategy.start(grid=InProcessGrid(app, 2), num_rounds=1, initial_arrays=ArrayRecord(model().blocks.state_dict()))
    (entry,) = json.loads(history.path.read_text())["rounds"]
    errors = json.dumps(entry["errors"])
    assert "node 1001: data of per-sample shape (29,) does not fit the model" in errors, errors
    assert list(entry["examples_per_node"]) == ["1000"]


def test_the_app_pickles_as_the_ray_backend_sends_it_and_keeps_one_cache_per_process(tmp_path):
    """Flower's Ray backend sends the ClientApp (cloudpickled) with every message: a copy must
    find the clients the process already built, here and in another process, not start empty."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")
    built: list[int] = []
    app = split_client_app(_per_node(built))
    grid = InProcessGrid(app, 1)
    for _ in range(3):
        grid.client_app = cloudpickle.loads(cloudpickle.dumps(app))
        (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), p.DESCRIBE, 1000, "g")])
        assert not reply.has_error(), reply.error
    assert built == [1000]
    (tmp_path / "app.pkl").write_bytes(cloudpickle.dumps(app))
    script = f"""
from ray import cloudpickle
from flwr.app import RecordDict
from flsplit.runtime import clientapp
from flsplit.wire import protocol as p
from flsplit.planes.inprocess import InProcessGrid
grid = InProcessGrid(None, 1)
for _ in range(3):
    grid.client_app = cloudpickle.loads(open({str(tmp_path / "app.pkl")!r}, "rb").read())
    (reply,) = grid.send_and_receive([grid.create_message(RecordDict(), p.DESCRIBE, 1000, "g")])
    assert not reply.has_error(), reply.error
(clients,) = clientapp._REMOTE.values()
print(tuple(clients.cache_info()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 1, 16, 1)"  # hits, misses, maxsize, size


class _Residual(nn.Module):
    """Not an nn.Sequential: split from its torch.fx graph, with an example batch."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hidden, self.out = nn.Linear(30, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.hidden(h)))


def test_a_plain_residual_module_is_split_with_the_nodes_data_as_example():
    parts = [_tabular(30), _tabular(30)]
    app = split_client_app(lambda ctx: SplitClient(_Residual, parts[int(ctx.node_config["partition-id"])]))
    strategy = PSL(model_fn=_Residual, input_shape=(30,), num_classes=2, cut_layer=1, batch_size=5, max_steps=2)
    strategy.start(grid=InProcessGrid(app, 2), num_rounds=1, initial_arrays=ArrayRecord(strategy.model.blocks.state_dict()))
    assert not strategy.errors and strategy.server_steps == 2  # PSL: one server step for both nodes
    context = InProcessGrid(ClientApp(), 1).contexts[1000]
    with pytest.raises(ValueError, match=r"^node 1000: data (of|has) per-sample shape \(29,\)"):
        SplitClient(_Residual, _tabular(29)).check_data(context)
