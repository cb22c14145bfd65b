"""Test helpers: a float64 digits CNN, fixed data, and strategies run on an in-process grid."""

from __future__ import annotations

import socket

import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from flsplit.runtime.client import SplitClient
from flsplit.data.datasets import TensorData
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import digits_cnn


def model_fn() -> SplitModel:
    """The 9-block digits CNN in float64, always with the same initial weights."""
    torch.manual_seed(1234)
    return SplitModel(digits_cnn().double())


def random_data(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def client_app_for(partitions: list[TensorData]) -> ClientApp:
    """A ClientApp whose node with partition-id i trains on ``partitions[i]``."""
    return client_app_of([SplitClient(model_fn, data, data, salt=i) for i, data in enumerate(partitions)])


def client_app_of(clients: list[SplitClient]) -> ClientApp:
    """A ClientApp whose node with partition-id i is ``clients[i]``."""
    app = ClientApp()

    @app.train("split_step")
    def _train(msg, ctx):
        return clients[int(ctx.node_config["partition-id"])].train_step(msg, ctx)

    @app.train("split_upload")
    def _upload(msg, ctx):
        return clients[int(ctx.node_config["partition-id"])].upload(msg, ctx)

    @app.query("split_device")
    def _describe(msg, ctx):
        return clients[int(ctx.node_config["partition-id"])].describe(msg, ctx)

    @app.evaluate("split_eval")
    def _eval(msg, ctx):
        return clients[int(ctx.node_config["partition-id"])].evaluate(msg, ctx)

    return app


def run_strategy(cls, partitions, num_rounds=1, intercept=None, **kwargs):
    """Run a strategy against in-process clients; returns (strategy, result, grid)."""
    grid = InProcessGrid(client_app_for(partitions), len(partitions), intercept=intercept)
    settings = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, shuffle=False)
    settings.update(kwargs)
    strategy = cls(model_fn=model_fn, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=num_rounds)
    return strategy, result, grid


def centralized_sgd(batches: list[TensorData], lr: float, model_fn=model_fn) -> dict[str, torch.Tensor]:
    """Plain torch: the unsplit model (``model_fn``'s), SGD on mean cross-entropy, one step per batch."""
    model = model_fn().blocks
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(b.x.double()), b.y).backward()
        opt.step()
    return model.state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free a moment ago (for servers a test starts)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
