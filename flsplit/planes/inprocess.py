"""An in-process ``Grid``: runs a ServerApp against ClientApps without Ray, in milliseconds.

Each pushed message is handled by calling the node's ``ClientApp`` with that node's
``Context`` (kept across messages like a SuperNode keeps it), and an exception becomes an
error reply as in Flower: by default with a deployed SuperNode's reason (``"<class
'ValueError'>:<'message'>"``), with ``error_style="simulation"`` with the simulation engine's
(Ray's ``RayTaskError(ClientAppException)`` and the rendered traceback of the chain). By default a message is handled at once, inside
``push_messages``; with ``threaded=True`` each one runs on a worker thread (at most
``max_workers`` at a time, like the engine's pool) and its reply is pulled when it is ready,
which a ClientApp that holds its message for a whole stream session needs. Meant for tests, benchmarks and debugging strategies;
``flwr run`` uses Flower's own grids.
"""

from __future__ import annotations

import itertools
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Optional
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid"]

SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` objects called in this process.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Number of nodes; node ``i`` gets ``node_config = {"partition-id": i, "num-partitions": n}``.
    run_config : dict, optional
        The run config every ``Context`` carries.
    intercept : callable, optional
        ``intercept(node_id, reply) -> reply``: lets a test tamper with replies on the wire.
    threaded : bool
        Handle each message on a worker thread instead of inside ``push_messages``.
    max_workers : int, optional
        Worker threads (default: one per node).
    node_configs : list of dict, optional
        Extra node-config entries per node (e.g. ``data-path``), merged over the partition ids.
    error_style : str
        How a ClientApp's exception reads in its error reply: ``"deployment"`` (default; as
        ``flwr/supernode/runtime/run_clientapp.py`` writes it) or ``"simulation"`` (as the
        simulation engine's Ray backend writes it: Flower's ``ClientAppException`` raised from
        the handler's exception, the chain rendered with its tracebacks).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Optional[dict] = None,
        intercept: Optional[Callable[[int, Message], Message]] = None,
        run_id: int = 1,
        threaded: bool = False,
        max_workers: Optional[int] = None,
        node_configs: Optional[list[dict]] = None,
        error_style: str = "deployment",
    ) -> None:
        if error_style not in ("deployment", "simulation"):
            raise ValueError(f"error_style must be 'deployment' or 'simulation', got {error_style!r}")
        self.error_style = error_style
        self.client_app = client_app
        self.intercept = intercept
        self._run = Run.create_empty(run_id)
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {num_nodes} nodes")
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_configs[i] if node_configs else {})},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self._futures: dict[str, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers or num_nodes, "inprocess-node") if threaded else None
        self.messages_by_type: dict[str, int] = {}
        self._task_ids = itertools.count(1)
        # Messages built by a ServerApp take their run/node/task ids from TaskIdentity.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = next(self._task_ids)

    @property
    def concurrency(self) -> int:
        """ClientApps that can run while the ServerApp waits (0: each runs inside the push)."""
        return self._executor._max_workers if self._executor is not None else 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            msg_id = str(uuid4())
            message.metadata.__dict__["_message_id"] = msg_id
            node_id = message.metadata.dst_node_id
            kind = message.metadata.message_type
            self.messages_by_type[kind] = self.messages_by_type.get(kind, 0) + 1
            if self._executor is not None:
                self._futures[msg_id] = self._executor.submit(self._handle, node_id, message)
            else:
                self._replies[msg_id] = self._handle(node_id, message)
            ids.append(msg_id)
        return ids

    def _handle(self, node_id: int, message: Message) -> Message:
        try:
            reply = self.client_app(message, self.contexts[node_id])
        except Exception as ex:  # reported as an error reply, like Flower's engine does
            if self.error_style == "simulation":  # flwr/simulation/ray_transport/ray_actor.py, then Ray's rendering
                wrapper = ClientAppException(str(ex))
                wrapper.__cause__ = ex
                rendered = "".join(traceback.format_exception(wrapper))
                reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'" + rendered + "'>"
            else:  # flwr/supernode/runtime/run_clientapp.py
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        if self.intercept is not None:
            reply = self.intercept(node_id, reply)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        for i in list(message_ids):
            if i in self._futures and self._futures[i].done():
                self._replies[i] = self._futures.pop(i).result()
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def shutdown(self) -> None:
        """Wait for the worker threads (threaded grids)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
