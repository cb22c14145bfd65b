"""ClientApp: the device side of split learning."""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from apps.task import RunSettings, client_data, make_model_fn
from flsplit.runtime.client import SplitClient
from flsplit.runtime.clientapp import register_split_handlers

app = ClientApp()


def make_client(context: Context) -> SplitClient:
    """The SplitClient of this node, from ``run_config`` and ``node_config`` (its
    ``partition-id``/``num-partitions`` of the run's dataset, or its own ``data-path``); its
    salt is the partition id, else the node id. Data that cannot be used raises here, at the
    node's first message: the ServerApp gets an error reply naming the node and the problem."""
    settings = RunSettings(context.run_config)
    train, test = client_data(settings, context.node_config, int(context.node_id))
    return SplitClient(make_model_fn(settings), train, test)


# Every split handler (train.split_step, train.split_upload, evaluate.split_eval,
# query.split_device, query.noop); one SplitClient per run config and node, built when the
# node is first asked: at most 16 per process, whatever the fleet's size.
client_for = register_split_handlers(app, make_client)
_client = client_for  # the per-node cache (cache_info, cache_clear)
