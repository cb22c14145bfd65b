"""ClientApp: the device side of split learning."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from apps.task import RunSettings, client_data, make_model_fn
from flsplit.client import SplitClient

app = ClientApp()


@lru_cache(maxsize=16)
def _client(settings_items: tuple, partition_id: int, num_partitions: int) -> SplitClient:
    """One SplitClient per run config and partition (data and model template are read-only)."""
    settings = RunSettings(dict(settings_items))
    node_config = {"partition-id": partition_id, "num-partitions": num_partitions}
    train, test = client_data(settings, node_config)
    return SplitClient(make_model_fn(settings), train, test, salt=partition_id)


def client_for(context: Context) -> SplitClient:
    """The SplitClient of this node, from ``run_config`` and ``node_config``."""
    return _client(
        tuple(sorted(context.run_config.items())),
        int(context.node_config.get("partition-id", 0)),
        int(context.node_config.get("num-partitions", 1)),
    )


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
