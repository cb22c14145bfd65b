"""A split-learning ``ClientApp`` in one line: ``app = split_client_app(client_fn)``.

``client_fn(context) -> SplitClient`` follows Flower's own ``client_fn(context)`` pattern: it
reads the node's ``node_config`` (its ``partition-id``, a ``data-path``) and the run's
``run_config``, loads the node's data and returns ``SplitClient(model_fn, train_data,
eval_data)``. It is called when the node gets its first message, and its client is kept for
the node's later messages (one per run config and node, the 16 most recently used per
process). A client built without ``salt`` gets the node's ``partition-id`` (else its node id)
as the salt that makes its shuffling differ from the other nodes'.

The handlers, by the names the strategies send (``flsplit.wire.protocol``):

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

``train.split_step`` answers a round over whichever registered plane its first request
offers a session on (``flsplit.planes.endpoint``); importing this module registers every plane
folder's client endpoint (``flsplit.planes.registry.load_planes``).
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections import OrderedDict, namedtuple
from typing import TYPE_CHECKING, Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flsplit.wire import protocol as p
from flsplit.planes.registry import load_planes

if TYPE_CHECKING:
    from flsplit.runtime.client import SplitClient

__all__ = ["split_client_app", "register_split_handlers", "node_salt"]

load_planes()  # every plane folder's client half registers (flsplit.planes.endpoint)

ClientFn = Callable[[Context], "SplitClient"]


def node_salt(context: Context) -> int:
    """The node's ``partition-id``, else its node id (mod 2**31)."""
    if "partition-id" in context.node_config:
        return int(context.node_config["partition-id"])
    return int(context.node_id) % 2**31


CacheInfo = namedtuple("CacheInfo", ["hits", "misses", "maxsize", "currsize"])

# Clients of apps registered in this process (weak: they live as long as their app) and of
# apps unpickled here (strong: Flower's Ray backend sends the ClientApp with every message, so
# a worker's copy of the cache must outlive the message to be found by the next one).
_LOCAL: "weakref.WeakValueDictionary[str, _NodeClients]" = weakref.WeakValueDictionary()
_REMOTE: "dict[str, _NodeClients]" = {}
_REGISTRY_LOCK = threading.Lock()


def _node_clients(token: str, client_fn: ClientFn, maxsize: int) -> "_NodeClients":
    """The process's cache of the app registered as ``token`` (made when first needed)."""
    with _REGISTRY_LOCK:
        clients = _LOCAL.get(token) or _REMOTE.get(token)
        if clients is None:
            clients = _REMOTE[token] = _NodeClients(token, client_fn, maxsize)
        return clients


class _NodeClients:
    """``client_for(context)``: the node's SplitClient, made by ``client_fn`` at the node's
    first message and kept per (run config, node config, node id), the ``maxsize`` most
    recently used. Pickled (Flower's Ray backend pickles the ClientApp) it travels as its
    registration token: each process keeps one cache per registered app."""

    def __init__(self, token: str, client_fn: ClientFn, maxsize: int) -> None:
        self.token, self.client_fn, self.maxsize = token, client_fn, maxsize
        self._clients: "OrderedDict[tuple, SplitClient]" = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def __reduce__(self):
        return _node_clients, (self.token, self.client_fn, self.maxsize)

    def __call__(self, context: Context) -> "SplitClient":
        from flsplit.runtime.client import SplitClient  # here: flsplit.runtime.client imports this module

        key = (tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())),
               int(context.node_id))
        with self._lock:
            if key in self._clients:
                self._hits += 1
                self._clients.move_to_end(key)
                return self._clients[key]
            self._misses += 1
        client = self.client_fn(context)  # not under the lock: other nodes' clients are built meanwhile
        if not isinstance(client, SplitClient):
            raise TypeError(f"client_fn must return a flsplit SplitClient, it returned {type(client).__qualname__}")
        if client.salt is None:
            client.salt = node_salt(context)
        with self._lock:
            client = self._clients.setdefault(key, client)  # a client built meanwhile for the node wins
            self._clients.move_to_end(key)
            while len(self._clients) > self.maxsize:
                self._clients.popitem(last=False)
        return client

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self.maxsize, len(self._clients))

    def cache_clear(self) -> None:
        with self._lock:
            self._clients.clear()
            self._hits = self._misses = 0


class _Handler:
    """A registered handler: the node's SplitClient's ``method`` (picklable, unlike a closure
    over the cache)."""

    def __init__(self, clients: _NodeClients, method: str) -> None:
        self.clients, self.method = clients, method

    def __call__(self, message: Message, context: Context) -> Message:
        return getattr(self.clients(context), self.method)(message, context)


def register_split_handlers(app: ClientApp, client_fn: ClientFn, maxsize: int = 16) -> Callable[[Context], "SplitClient"]:
    """Register the split handlers on ``app``; each asks ``client_fn(context)`` for the node's
    ``SplitClient`` once, then reuses it (``maxsize`` clients per process, least recently used
    dropped). Returns ``client_for(context)``, the cached lookup (with ``cache_info`` and
    ``cache_clear``). An exception in ``client_fn`` (data that cannot be loaded) is not cached:
    it is raised at each message, and the ServerApp gets an error reply."""
    from flsplit.runtime.client import SplitClient  # here: flsplit.runtime.client imports this module

    clients = _NodeClients(uuid.uuid4().hex, client_fn, maxsize)
    with _REGISTRY_LOCK:
        _LOCAL[clients.token] = clients
    handlers = {p.TRAIN_STEP: _Handler(clients, "train_step"), p.UPLOAD: _Handler(clients, "upload"),
                p.EVALUATE: _Handler(clients, "evaluate"), p.DESCRIBE: _Handler(clients, "describe"),
                p.NOOP: SplitClient.noop}
    for message_type, handler in handlers.items():  # "train.split_step" -> app.train("split_step")
        kind, name = message_type.split(".")
        getattr(app, kind)(name)(handler)
    return clients


def split_client_app(client_fn: ClientFn) -> ClientApp:
    """A ``ClientApp`` with every split handler, each handing its message to the node's
    ``SplitClient`` from ``client_fn(context)`` (see the module docstring)."""
    app = ClientApp()
    register_split_handlers(app, client_fn)
    return app
