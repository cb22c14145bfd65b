"""A split-learning ``ClientApp`` in one line: ``app = split_client_app(client_fn)``.

``client_fn(context) -> SplitClient`` follows Flower's own ``client_fn(context)`` pattern: it
reads the node's ``node_config`` (its ``partition-id``, a ``data-path``) and the run's
``run_config``, loads the node's data and returns ``SplitClient(model_fn, train_data,
eval_data)``. It is called when the node gets its first message, and its client is kept for
the node's later messages (one per run config and node, the 16 most recently used per
process). A client built without ``salt`` gets the node's ``partition-id`` (else its node id)
as the salt that makes its shuffling differ from the other nodes'.

The handlers, by the names the strategies send (``flsplit.protocol``):

======================  ============================================================  ============
handler                 what it does                                                  needed by
======================  ============================================================  ============
``train.split_step``    one split exchange: gradients in, the next smashed data out  every scheme
``evaluate.split_eval`` smashed evaluation data, finished on the server               ``fraction_evaluate > 0``
``train.split_upload``  a window's smashed data, one way (async SL's state B)         ``AsyncSL``
``query.split_device``  partition id, device profile, numbers of samples              planners (``Adaptive``)
``query.noop``          an empty reply                                                no-op exchange timing
======================  ============================================================  ============

``split_client_app`` registers all five; ``register_split_handlers(app, client_fn)`` adds
them to a ``ClientApp`` that has other handlers too.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Optional

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from flsplit import protocol as p
from flsplit.splitting import SplitModel, as_split_model

if TYPE_CHECKING:
    from flsplit.client import SplitClient

__all__ = ["split_client_app", "register_split_handlers", "split_model_of", "split_model_fn", "node_salt"]

ClientFn = Callable[[Context], "SplitClient"]


def split_model_of(obj: object, example_input: Optional[torch.Tensor] = None) -> SplitModel:
    """``obj`` if it is a ``SplitModel``, else the ``nn.Module`` ``obj`` split into blocks by
    ``flsplit.as_split_model`` (``example_input``: a batch, e.g. ``x[:2]``, which a module
    other than ``nn.Sequential`` or a torchvision VGG/ResNet needs; a floating batch is cast
    to the module's parameter dtype). ``TypeError`` when ``obj`` is neither."""
    if isinstance(obj, SplitModel):
        return obj
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module or a flsplit SplitModel, it returned "
                        f"{type(obj).__module__}.{type(obj).__qualname__}")
    if example_input is None or "example_input" not in inspect.signature(as_split_model).parameters:
        return as_split_model(obj)
    dtype = next((t.dtype for t in obj.parameters() if t.is_floating_point()), None)
    if dtype is not None and example_input.is_floating_point():
        example_input = example_input.to(dtype)
    return as_split_model(obj, example_input=example_input)


def split_model_fn(model_fn: Callable[[], object], input_shape: tuple[int, ...]) -> Callable[[], SplitModel]:
    """``model_fn`` that always returns a ``SplitModel``: a plain module is split with an
    example batch of two zero samples of ``input_shape`` (for a strategy, which has no data)."""

    def build() -> SplitModel:
        return split_model_of(model_fn(), torch.zeros(2, *input_shape))

    return build


def node_salt(context: Context) -> int:
    """The node's ``partition-id``, else its node id (mod 2**31)."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(context.node_id) % 2**31


class _NodeKey:
    """A context as a cache key: its run config, node config and node id. The context rides
    along only until the client is built (the cache must not keep a node's state alive)."""

    __slots__ = ("key", "context")

    def __init__(self, context: Context) -> None:
        self.key = (tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())),
                    int(context.node_id))
        self.context: Optional[Context] = context

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NodeKey) and self.key == other.key


def register_split_handlers(app: ClientApp, client_fn: ClientFn, maxsize: int = 16) -> Callable[[Context], "SplitClient"]:
    """Register the split handlers on ``app``; each asks ``client_fn(context)`` for the node's
    ``SplitClient`` once, then reuses it (``maxsize`` clients per process, least recently used
    dropped). Returns ``client_for(context)``, the cached lookup (with ``cache_info`` and
    ``cache_clear``). An exception in ``client_fn`` (data that cannot be loaded) is not cached:
    it is raised at each message, and the ServerApp gets an error reply."""
    from flsplit.client import SplitClient  # here: flsplit.client imports this module

    @lru_cache(maxsize=maxsize)
    def _cached(node: _NodeKey) -> SplitClient:
        context, node.context = node.context, None
        client = client_fn(context)
        if not isinstance(client, SplitClient):
            raise TypeError(f"client_fn must return a flsplit SplitClient, it returned {type(client).__qualname__}")
        if client.salt is None:
            client.salt = node_salt(context)
        return client

    def client_for(context: Context) -> SplitClient:
        """The node's SplitClient (built by ``client_fn`` at its first message)."""
        return _cached(_NodeKey(context))

    client_for.cache_info = _cached.cache_info  # type: ignore[attr-defined]
    client_for.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]

    def split_step(msg: Message, context: Context) -> Message:
        """One fused split exchange (gradients in, next smashed data out)."""
        return client_for(context).train_step(msg, context)

    def split_upload(msg: Message, context: Context) -> Message:
        """One-way upload of a window's smashed data (async SL, state B)."""
        return client_for(context).upload(msg, context)

    def split_eval(msg: Message, context: Context) -> Message:
        """Smashed evaluation data for server-side finishing."""
        return client_for(context).evaluate(msg, context)

    def split_device(msg: Message, context: Context) -> Message:
        """Who this node is (partition, device profile, samples), for a planner in the loop."""
        return client_for(context).describe(msg, context)

    handlers = {p.TRAIN_STEP: split_step, p.UPLOAD: split_upload, p.EVALUATE: split_eval,
                p.DESCRIBE: split_device, p.NOOP: SplitClient.noop}
    for message_type, handler in handlers.items():  # "train.split_step" -> app.train("split_step")
        kind, name = message_type.split(".")
        getattr(app, kind)(name)(handler)

    return client_for


def split_client_app(client_fn: ClientFn) -> ClientApp:
    """A ``ClientApp`` with every split handler, each handing its message to the node's
    ``SplitClient`` from ``client_fn(context)`` (see the module docstring)."""
    app = ClientApp()
    register_split_handlers(app, client_fn)
    return app
