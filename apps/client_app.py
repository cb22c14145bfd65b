"""ClientApp: the device side of split learning."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from apps.task import RunSettings, client_data, make_model_fn
from flsplit.client import SplitClient

app = ClientApp()

DATA_KEYS = ("partition-id", "num-partitions", "data-path")  # the node-config keys that choose its data


@lru_cache(maxsize=16)
def _client(settings_items: tuple, node_items: tuple, node_id: int) -> SplitClient:
    """One SplitClient per run config and node (data and model template are read-only),
    built when the node is first asked: at most 16 per process, whatever the fleet's size."""
    settings = RunSettings(dict(settings_items))
    node_config = dict(node_items)
    train, test = client_data(settings, node_config, node_id)
    salt = int(node_config["partition-id"]) if "partition-id" in node_config else node_id % 2**31
    return SplitClient(make_model_fn(settings), train, test, salt=salt)


def client_for(context: Context) -> SplitClient:
    """The SplitClient of this node, from ``run_config`` and ``node_config`` (its
    ``partition-id``/``num-partitions`` of the run's dataset, or its own ``data-path``).
    Data that cannot be used raises here, at the node's first message: the ServerApp gets an
    error reply naming the node and the problem."""
    node = {k: context.node_config[k] for k in DATA_KEYS if k in context.node_config}
    return _client(tuple(sorted(context.run_config.items())), tuple(sorted(node.items())), int(context.node_id))


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    """One fused split exchange (gradients in, next smashed data out)."""
    return client_for(context).train_step(msg, context)


@app.train("split_upload")
def split_upload(msg: Message, context: Context) -> Message:
    """One-way upload of a window's smashed data (async SL, state B)."""
    return client_for(context).upload(msg, context)


@app.evaluate("split_eval")
def split_eval(msg: Message, context: Context) -> Message:
    """Smashed evaluation data for server-side finishing."""
    return client_for(context).evaluate(msg, context)


@app.query("split_device")
def split_device(msg: Message, context: Context) -> Message:
    """Who this node is (partition, device profile, samples), for a planner in the loop."""
    return client_for(context).describe(msg, context)


@app.query("noop")
def noop(msg: Message, context: Context) -> Message:
    """Empty reply: the exchange floor for benchmarks."""
    return SplitClient.noop(msg, context)
