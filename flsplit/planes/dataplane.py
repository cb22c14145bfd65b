"""The data plane seam: how split-exchange requests reach nodes and replies come back.

Strategies talk to a ``DataPlane`` only, so a low-latency streaming plane for deployments
can replace ``MessageDataPlane`` without touching them. The contract: at most one request
in flight per node (two queued messages for one node would run concurrently in simulation
and race on ``context.state``), replies handed over as they arrive.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Optional

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from flsplit.wire.protocol import BCAST, TRAIN_STEP

__all__ = ["DataPlane", "MessageDataPlane", "Reply", "Traffic", "innermost_error", "payload_bytes", "time_noop_exchanges"]

# ------------------------------------------------------------------ error replies
# A ClientApp handler that raises reaches the ServerApp as an error reply whose reason is
# Flower's ``"<class 'X'>:<'message'>"``. In a deployment (``flwr/supernode/runtime/
# run_clientapp.py``) X is the handler's exception; in a simulation (``flwr/server/superlink/
# fleet/vce/vce_api.py``) it is Ray's ``RayTaskError(ClientAppException)`` and the message is
# Ray's rendering of the whole chain: the handler's traceback, "The above exception was the
# direct cause of the following exception:", Flower's ``ClientAppException`` repeating the
# message, with ANSI colours. ``innermost_error`` keeps what the handler raised.
_FLOWER_REASON = re.compile(r"<class '([^']+)'>:<'(.*)'>", re.S)
_CHAINED = re.compile(r"\n\s*(?:The above exception was the direct cause of the following exception:"
                      r"|During handling of the above exception, another exception occurred:)\s*\n")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:\([\w.]*\))?)(?::(.*))?$")
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError", "ActorDiedError")
_CLIENT_APP_MESSAGE = re.compile(r"Exception ClientAppException occurred\. Message: ?(.*)", re.S)
_NO_HANDLER = re.compile(r"No (\w+) function registered with name '(\w+)'")
MAX_ERROR_CHARS = 500  # an error reply's cause, as logged and recorded


def _short_name(name: str) -> str:
    """``flsplit.wire.protocol.ProtocolError`` -> ``ProtocolError``; ``RayTaskError(ClientAppException)`` kept."""
    return name if "(" in name else name.rsplit(".", 1)[-1]


def _raised(segment: str) -> tuple[str, str] | None:
    """The exception (name, message) at the end of one traceback of a chain, if it has one."""
    lines = segment.strip("\n").splitlines()
    start = 0
    for i, line in enumerate(lines):  # the exception line follows the last frame's indented lines
        if line.startswith("  File ") or line.startswith("Traceback (most recent call last)"):
            start = i + 1
    for i in range(start, len(lines)):
        line = lines[i]
        if not line or line[0].isspace() or line.startswith("ray::"):  # Ray's "ray::Actor.run() (pid=...)" header
            continue
        match = _EXCEPTION_LINE.match(line)
        if match is None or " " in match.group(1):
            continue
        first = (match.group(2) or "").strip()
        rest = " ".join(part.strip() for part in lines[i + 1 :] if part.strip())
        return match.group(1), " ".join(part for part in (first, rest) if part)
    return None


def _cause(name: str, message: str) -> str:
    if _short_name(name).split("(")[0] in _WRAPPERS:  # Flower's or Ray's wrapper: the message is the handler's
        inner = _CLIENT_APP_MESSAGE.search(message)
        return inner.group(1).strip() if inner else message.strip()
    return f"{_short_name(name)}: {message.strip()}" if message.strip() else _short_name(name)


def _from_traceback(text: str) -> str | None:
    """The last exception of a rendered chain that is not Flower's or Ray's wrapper."""
    raised = [r for r in (_raised(seg) for seg in _CHAINED.split(text)) if r is not None]
    if not raised:
        return None
    own = [r for r in raised if _short_name(r[0]).split("(")[0] not in _WRAPPERS]
    return _cause(*(own[-1] if own else raised[-1]))


def innermost_error(text: str) -> str:
    """What a failed ClientApp raised, from an error reply's reason (or a text holding one).

    ``"<class 'ValueError'>:<'node 3: bad data'>"`` and Ray's rendering of the same exception
    both become ``"ValueError: node 3: bad data"``; a traceback is reduced to its last
    exception that is not Flower's or Ray's wrapper, and a handler missing from the ClientApp
    to the message type it was sent and the handlers flsplit needs. Text before the reason (a
    caller's prefix) is kept; text without a reason or a traceback is returned as it is. The
    cause is cut at ``MAX_ERROR_CHARS``.
    """
    if not isinstance(text, str):
        return str(text)
    plain = _ANSI.sub("", text)
    match = _FLOWER_REASON.search(plain)
    if match is not None:
        prefix, name, body, suffix = plain[: match.start()], match.group(1), match.group(2), plain[match.end() :]
        cause = _from_traceback(body) if ("  File " in body or _CHAINED.search(body)) else None
        cause = cause or _cause(name, body)
    elif "Traceback (most recent call last)" in plain or _CHAINED.search(plain):
        prefix, suffix, cause = "", "", _from_traceback(plain)
        if cause is None:
            return text
    else:
        return text
    cause = " ".join(cause.split())  # one line
    handler = _NO_HANDLER.search(cause)
    if handler is not None:
        kind = f"{handler.group(1)}.{handler.group(2)}"
        cause = (f"the ClientApp has no handler for message type '{kind}' (Flower: {handler.group(0)}): register "
                 "flsplit's handlers with flsplit.runtime.clientapp.split_client_app(client_fn) or register_split_handlers"
                 "(app, client_fn), or by hand under the names train.split_step, evaluate.split_eval, "
                 "train.split_upload (async SL) and query.split_device (planners)")
    elif len(cause) > MAX_ERROR_CHARS:
        cause = cause[: MAX_ERROR_CHARS - 3] + "..."
    return f"{prefix}{cause}{suffix}"


def payload_bytes(content: RecordDict, prefix: str = "", skip: str = "") -> int:
    """Bytes of the serialized arrays in ``content`` (Flower ``Array.data``, .npy header included).

    With ``prefix``, only records whose name starts with it (``"split."``: the data plane);
    records named ``skip`` are left out.
    """
    return _payload_bytes(content, prefix, skip)[1]


def _payload_bytes(content: RecordDict, prefix: str, skip: str) -> tuple[int, int]:
    """(bytes of all arrays, bytes of the arrays of records named ``prefix...``), ``skip`` left
    out; one pass over the records (``RecordDict.array_records`` builds a new view per access)."""
    total = chosen = 0
    for name, record in content.items():
        if name == skip or not isinstance(record, ArrayRecord):
            continue
        size = sum(len(a.data) for a in record.values())
        total += size
        if name.startswith(prefix):
            chosen += size
    return total, chosen


@dataclass
class Reply:
    """A node's answer: its content, or the reason it has none.

    ``client_part``: in a final train reply the reply gate let through, its client part as the
    gate checked and decoded it (``flsplit.wire.gate.ReplyGate.final_part``); ``None`` otherwise.
    """

    node_id: int
    content: Optional[RecordDict] = None
    error: Optional[str] = None
    client_part: Optional[dict] = field(default=None, repr=False, compare=False)


@dataclass
class Traffic:
    """Bytes per node and direction: all arrays, and those of the split exchange alone.

    ``split_*`` counts the ``split.*`` records (smashed data, labels, scales, gradients);
    the rest is model weights (client parts) going out and coming back. A broadcast (the
    ``split.bcast`` record every receiver of a step gets) is counted once, in ``broadcast``,
    by ``record_broadcast``: on a wireless downlink it is sent once for all receivers.
    """

    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    split_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    split_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    broadcast: int = 0
    messages: int = 0

    def record(self, node_id: int, content: RecordDict, upstream: bool) -> None:
        total, split = _payload_bytes(content, "split.", BCAST)
        if upstream:
            self.up[node_id] += total
            self.split_up[node_id] += split
        else:
            self.down[node_id] += total
            self.split_down[node_id] += split
        self.messages += 1

    def record_broadcast(self, num_bytes: int) -> None:
        """Count a broadcast once (call it once per broadcast, not per receiver)."""
        self.broadcast += num_bytes

    def totals(self) -> tuple[int, int]:
        """Bytes up and down (broadcasts once)."""
        return sum(self.up.values()), sum(self.down.values()) + self.broadcast

    def per_node(self, node_id: int) -> dict[str, int]:
        """The four counters of one node."""
        return {
            "up": self.up.get(node_id, 0),
            "down": self.down.get(node_id, 0),
            "split_up": self.split_up.get(node_id, 0),
            "split_down": self.split_down.get(node_id, 0),
        }


class DataPlane(ABC):
    """Sends requests to nodes and hands back their replies.

    The plane owns the traffic meter (``traffic``): it counts every request it sends and
    every reply it hands back; a schedule adds a broadcast once (``traffic.record_broadcast``);
    ``begin_round`` starts a new meter, read when the round ends (``flsplit.runtime.exchange``).
    """

    def __init__(self) -> None:
        self.traffic = Traffic()

    def begin_round(self) -> None:
        """A new round: its traffic is counted from zero."""
        self.traffic = Traffic()

    @abstractmethod
    def push(self, node_id: int, content: RecordDict, message_type: str, group_id: str) -> None:
        """Send one request; ``node_id`` must have none in flight."""

    @abstractmethod
    def pull(self) -> list[Reply]:
        """Wait for at least one reply (or time-out) of the requests in flight and return them."""

    @property
    @abstractmethod
    def in_flight(self) -> set[int]:
        """Nodes with a request in flight."""

    def end_round(self) -> dict[int, str]:
        """Close the round's per-node state (sessions); return which plane each node used."""
        return {}

    def drop(self, node_id: int, reason: str) -> None:
        """The schedule will not talk to ``node_id`` again this round (its reply was
        refused): release what the plane holds for it. Nothing is in flight for it."""

    def close(self) -> None:
        """Release what the plane holds (listeners, sockets, threads) at the end of a run."""

    def exchange(self, requests: Mapping[int, RecordDict], message_type: str, group_id: str) -> dict[int, Reply]:
        """Send one request to each node and wait for all replies (a barrier)."""
        for node_id, content in requests.items():
            self.push(node_id, content, message_type, group_id)
        replies: dict[int, Reply] = {}
        while self.in_flight & requests.keys():
            for reply in self.pull():
                replies[reply.node_id] = reply
        return replies


class MessageDataPlane(DataPlane):
    """The data plane over Flower messages (works in simulation and deployment).

    Replies are polled with ``push_messages`` / ``pull_messages`` and a short adaptive sleep
    (2 ms growing to 50 ms while nothing arrives) instead of ``send_and_receive``, whose
    deployment implementation sleeps seconds between pulls.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    timeout : float
        Seconds a request may wait for its reply; past it the reply is an error.
    """

    def __init__(self, grid: Grid, timeout: float = 600.0) -> None:
        super().__init__()
        self.grid = grid
        self.timeout = timeout
        self._pending: dict[str, tuple[int, float]] = {}  # message id -> (node, deadline)
        self._trained: set[int] = set()  # nodes sent train steps this round

    @property
    def in_flight(self) -> set[int]:
        return {node for node, _ in self._pending.values()}

    def push(self, node_id: int, content: RecordDict, message_type: str, group_id: str) -> None:
        if node_id in self.in_flight:
            raise RuntimeError(f"node {node_id} already has a request in flight")
        message = Message(content, node_id, message_type, group_id=group_id)
        (msg_id,) = list(self.grid.push_messages([message]))
        if message_type == TRAIN_STEP:
            self._trained.add(node_id)
        self.traffic.record(node_id, content, upstream=False)
        self._pending[msg_id] = (node_id, time.monotonic() + self.timeout)

    def poll(self) -> list[Reply]:
        """Replies that have arrived, and the requests past their deadline (no waiting)."""
        replies = []
        if self._pending:
            for message in self.grid.pull_messages(list(self._pending)):
                node_id, _ = self._pending.pop(message.metadata.reply_to_message_id)
                replies.append(self.reply_of(node_id, message))
        now = time.monotonic()
        for msg_id, (node_id, deadline) in list(self._pending.items()):
            if now > deadline:
                del self._pending[msg_id]
                replies.append(Reply(node_id, error=f"no reply within {self.timeout:.0f} s"))
        return replies

    def reply_of(self, node_id: int, message: Message) -> Reply:
        """A Flower reply as a ``Reply`` (its bytes counted)."""
        if message.has_error():  # the innermost cause, not Flower's and Ray's wrappers around it
            return Reply(node_id, error=innermost_error(message.error.reason or f"error code {message.error.code}"))
        self.traffic.record(node_id, message.content, upstream=True)
        return Reply(node_id, content=message.content)

    def pull(self) -> list[Reply]:
        sleep = 0.002
        while self._pending:
            if replies := self.poll():
                return replies
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.05)
        return []

    def end_round(self) -> dict[int, str]:
        used, self._trained = self._trained, set()
        return {n: "message" for n in sorted(used)}


def time_noop_exchanges(data_plane: DataPlane, node_ids: list[int], repeats: int, message_type: str) -> float:
    """Mean seconds of one empty exchange with every node (the floor a split step pays)."""
    start = time.perf_counter()
    for i in range(repeats):
        data_plane.exchange({n: RecordDict() for n in node_ids}, message_type, f"noop-{i}")
    return (time.perf_counter() - start) / max(repeats, 1)
