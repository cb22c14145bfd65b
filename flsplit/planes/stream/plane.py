"""``StreamDataPlane``: the round's split exchanges as frames over one TLS session per node.

Per node and round the first train request travels as one Flower message, the *carrier*,
with a ``SessionOffer`` added; the ClientApp connects out to this plane's listener, proves
the offer's single-use secret, and from then on the round's requests and replies are frames
of that session. The ClientApp keeps its trainer (client part, optimizer, for one batch per
exchange the autograd graph) in memory for the round. When a node's reply says its round is
done, the plane sends ``END``; the client writes ``context.state`` once and answers the
carrier. The done reply is handed to the schedule only once that answer has come, so a node
that fails before committing contributes nothing.

Everything else (one-way uploads, evaluation, a node that could not open its session in
``auto`` mode) travels as Flower messages, exactly as on ``MessageDataPlane``; strategies
and schedules see one ``DataPlane``. Byte counting is the same on both planes: the arrays of
each request and reply, whichever way they travel.

In Flower's simulation engine a lockstep step needs every node's session open at once; when
the engine cannot run that many ClientApps concurrently, ``auto`` keeps the round on
messages and says so (``stream`` refuses to start it).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Callable, Mapping, Optional, Union

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import MessageDataPlane, Reply
from flsplit.planes.stream.frames import FrameError, Kind, decode_content, encode_content
from flsplit.planes.stream.listener import ServerSession, SessionEvent, SessionListener
from flsplit.planes.stream.offer import FALLBACK, OFFER, SessionOffer
from flsplit.planes.stream.tls import ServerCredentials

__all__ = ["StreamDataPlane", "MODES"]

MODES = ("auto", "stream", "message")
_GRID_POLL_WHILE_STEPPING = 1.0  # seconds between grid polls for opening or committing sessions while others step


@dataclass
class _Link:
    """One node's session this round, from offer to carrier's answer."""

    node_id: int
    offer: SessionOffer
    carrier: str  # message id of the Flower message that holds the session
    phase: str = "offered"  # offered -> open -> committing -> closed
    session: Optional[ServerSession] = None
    waiting: bool = True  # a reply is due (the carrier's request is the first)
    deadline: float = 0.0
    held: Optional[RecordDict] = None  # the done reply, until the client has committed
    offered_at: float = 0.0
    failed: Optional[str] = None  # why the session ended, for the node's next request


class StreamDataPlane(MessageDataPlane):
    """The data plane over per-round TLS sessions, with Flower messages where none is open.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (carriers and every non-stream message go through it).
    timeout : float
        Seconds a request may wait for its reply (also the offer's lifetime and the client's
        wait for each frame).
    mode : str
        ``auto``: the stream where a session opens, messages per node otherwise; ``stream``:
        a node that cannot open its session fails the round; ``message``: never offer.
    listen, advertise : str
        ``host:port`` the listener binds, and the address offered to clients (default: the
        bound one). Listening on loopback (the default) serves nodes on this host only.
    credentials : ServerCredentials, optional
        The deployment's certificate and key; default an ephemeral self-signed certificate.
    handshake_timeout : float
        Seconds a connection has for TLS and its ``HELLO``.
    max_frame : int
        Frame payload cap in bytes, both directions.
    concurrency : callable, optional
        ``concurrency() -> int or None``: how many ClientApps can hold a session at once
        (``None``: no limit, as in a deployment). Asked once, at the first lockstep round.
    """

    def __init__(
        self,
        grid: Grid,
        timeout: float = 600.0,
        mode: str = "auto",
        listen: str = "127.0.0.1:0",
        advertise: str = "",
        credentials: Optional[ServerCredentials] = None,
        handshake_timeout: float = 10.0,
        max_frame: int = 256 * 2**20,
        concurrency: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"data-plane must be one of {MODES}, got {mode!r}")
        super().__init__(grid, timeout)
        self.mode = mode
        self._events: "queue.Queue[SessionEvent]" = queue.Queue()
        self._lock = threading.Lock()
        self.listener = SessionListener(self._events, self._on_session, listen, advertise, credentials,
                                        handshake_timeout, max_frame) if mode != "message" else None
        self._links: dict[int, _Link] = {}
        self._carriers: dict[str, int] = {}  # carrier message id -> node
        self._ready: list[Reply] = []
        self._planes: dict[int, str] = {}  # node -> plane used this round
        self._reasons: dict[int, str] = {}  # node -> why it stayed on messages
        self._open_s: dict[int, float] = {}  # node -> seconds from its offer to its first reply
        self._concurrency_fn = concurrency
        self._concurrency: Union[int, None, str] = "unknown"  # or "unread": the engine's pool was not found
        self._round_on_messages: Optional[str] = None
        self._last_grid_poll = 0.0

    # ------------------------------------------------------------------ seam
    @property
    def in_flight(self) -> set[int]:
        busy = {n for n, link in self._links.items() if link.waiting or link.phase == "committing"}
        return super().in_flight | busy | {r.node_id for r in self._ready}

    def exchange(self, requests: Mapping[int, RecordDict], message_type: str, group_id: str) -> dict[int, Reply]:
        """A barrier over every node (a lockstep step): in simulation, check first that all
        their sessions can be open at once."""
        if self.mode != "message" and message_type == p.TRAIN_STEP and any(p.CLIENT_PART in c for c in requests.values()):
            self._check_concurrency(len(requests))
        return super().exchange(requests, message_type, group_id)

    def push(self, node_id: int, content: RecordDict, message_type: str, group_id: str) -> None:
        if node_id in self.in_flight:
            raise RuntimeError(f"node {node_id} already has a request in flight")
        link = self._links.get(node_id)
        if link is not None and link.phase == "open":
            if message_type != p.TRAIN_STEP:
                raise RuntimeError(f"node {node_id} holds an open session: only train steps travel on it")
            link.session.send(Kind.REQUEST, encode_content(content))
            self.traffic.record(node_id, content, upstream=False)  # a frame counts as a message
            link.waiting, link.deadline = True, time.monotonic() + self.timeout
            return
        if link is not None and link.failed is not None:  # the session broke between two steps
            self._ready.append(Reply(node_id, error=link.failed))
            link.failed = None
            return
        self._await_carrier(node_id)
        if message_type == p.TRAIN_STEP and p.CLIENT_PART in content and self._may_offer(node_id):
            self._offer(node_id, content, group_id)
            return
        super().push(node_id, content, message_type, group_id)
        if message_type == p.TRAIN_STEP:
            self._planes.setdefault(node_id, "message")

    def pull(self) -> list[Reply]:
        wait = 0.002
        while True:
            replies, self._ready = self._ready, []
            while True:
                try:
                    replies += self._on_event(self._events.get_nowait())
                except queue.Empty:
                    break
            replies += self._poll_grid()
            replies += self._expire()
            if replies:
                return replies
            if not self.in_flight:
                return []
            try:  # sleeps until a frame arrives, or the next grid poll is due
                self._ready += self._on_event(self._events.get(timeout=wait))
            except queue.Empty:
                wait = min(wait * 1.5, 0.05)

    def end_round(self) -> dict[int, str]:
        """End the sessions the schedule left open, wait for every carrier's answer, and
        report (and log) which plane each node used."""
        for link in self._links.values():
            if link.phase in ("offered", "open"):
                self._close(link, "round over", abort=True)
        deadline = time.monotonic() + self.timeout
        while self._carriers and time.monotonic() < deadline:
            self._poll_grid(force=True)
            while True:
                try:
                    self._on_event(self._events.get_nowait())
                except queue.Empty:
                    break
            if self._carriers:
                time.sleep(0.005)
        for msg_id, node in self._carriers.items():
            log(WARNING, "[flsplit] node %s: its session's message did not come back within %.0f s", node, self.timeout)
        self._carriers.clear()
        self._links.clear()
        planes, self._planes = dict(sorted(self._planes.items())), {}
        reasons, self._reasons = self._reasons, {}
        opened, self._open_s = self._open_s, {}
        self._round_on_messages = None
        if self._concurrency == "unread":
            self._concurrency = "unknown"
        super().end_round()
        stream = [n for n, kind in planes.items() if kind == "stream"]
        message = [n for n, kind in planes.items() if kind == "message"]
        if planes and self.mode != "message":
            why = sorted(set(reasons.values()))
            log(INFO, "[flsplit] data plane: stream for %d node(s) %s%s, messages for %d %s%s", len(stream), stream,
                f" (sessions open and first replies in {max(opened.values()):.2f} s)" if opened else "",
                len(message), message, f" ({'; '.join(why)})" if why else "")
        return planes

    def drop(self, node_id: int, reason: str) -> None:
        """Abort the node's session now: the client fails its round and writes nothing,
        instead of waiting for a request that will not come."""
        link = self._links.get(node_id)
        if link is not None and link.phase in ("offered", "open"):
            self._close(link, f"node sits out: {reason}", abort=True)

    def close(self) -> None:
        for link in self._links.values():
            if link.session is not None:
                link.session.close()
        if self.listener is not None:
            self.listener.close()

    # ------------------------------------------------------------------ offers and sessions
    def _may_offer(self, node_id: int) -> bool:
        if self.mode == "message":
            return False
        if self._round_on_messages is None and getattr(self.grid, "concurrency", None) == 0:
            self._refuse_streams("the grid runs no ClientApp while the ServerApp waits")
        if self._round_on_messages is not None:
            self._reasons[node_id] = self._round_on_messages
            return False
        return True

    def _limit(self) -> Optional[int]:
        """How many sessions can be open at once (``None``: no limit). A grid may say itself
        (``grid.concurrency``); else the ``concurrency`` callable is asked until it knows
        (a 0 from it means the engine could not be read yet, and is asked again next round)."""
        if self._concurrency == "unknown":
            hint = getattr(self.grid, "concurrency", None)
            if isinstance(hint, int):
                self._concurrency = hint
            else:
                limit = self._concurrency_fn() if self._concurrency_fn else None
                if limit == 0:
                    self._concurrency = "unread"  # asked again next round
                    return 0
                self._concurrency = limit
        return 0 if self._concurrency == "unread" else self._concurrency

    def _check_concurrency(self, sessions: int) -> None:
        limit = self._limit()
        if limit is None or sessions <= limit:
            return
        if self._concurrency == "unread":
            self._refuse_streams("the simulation engine's actor pool could not be read")
            return
        self._refuse_streams(f"a lockstep step needs {sessions} sessions open at once, the simulation engine "
                             f"runs {limit} ClientApps at a time", advice=f"raise init-args-num-cpus to {sessions} "
                             f"with client-resources-num-cpus=1 in the federation config, or use data-plane 'auto'")

    def _refuse_streams(self, reason: str, advice: str = "use data-plane 'auto'") -> None:
        """Keep this round on messages (``auto``), or refuse it (``stream``)."""
        if self.mode == "stream":
            raise ValueError(f"data-plane 'stream': {reason}; {advice}")
        self._round_on_messages = reason

    def _offer(self, node_id: int, content: RecordDict, group_id: str) -> None:
        # The client waits for each request up to twice the exchange timeout: in lockstep the
        # server may legitimately wait one timeout for the slowest node before asking again.
        offer = self.listener.offer(node_id, ttl=self.timeout, timeout=2 * self.timeout + 10,
                                    required=self.mode == "stream")
        carried = RecordDict(dict(content.items()))
        carried[OFFER] = offer.to_record()
        message = Message(carried, node_id, p.TRAIN_STEP, group_id=group_id)
        now = time.monotonic()
        link = _Link(node_id, offer, carrier="", deadline=now + self.timeout, offered_at=now)
        with self._lock:  # registered before the push: the client may connect before it returns
            self._links[node_id] = link
        (msg_id,) = list(self.grid.push_messages([message]))
        link.carrier = msg_id
        self.traffic.record(node_id, content, upstream=False)
        self._carriers[msg_id] = node_id

    def _on_session(self, session: ServerSession) -> None:
        """Called by the listener (its thread) when a node's session is admitted."""
        with self._lock:
            link = self._links.get(session.node_id)
            if link is None or link.offer.session_id != session.session_id or link.phase != "offered":
                session.close()  # the plane gave up on this offer already
                return
            link.session = session

    def _close(self, link: _Link, reason: str, abort: bool = False) -> None:
        with self._lock:  # against _on_session attaching a session at this moment
            if link.phase == "offered" and self.listener is not None:
                self.listener.revoke(link.offer.session_id)
            if link.session is not None:
                if abort:
                    link.session.send(Kind.ABORT)
                else:
                    link.session.close()
            link.phase, link.waiting = "closed", False
        log(INFO if abort else WARNING, "[flsplit] node %s: stream session closed: %s", link.node_id, reason)

    def _on_event(self, event: SessionEvent) -> list[Reply]:
        link = self._links.get(event.node_id)
        if link is None or link.offer.session_id != event.session_id or link.phase not in ("offered", "open"):
            return []  # a session the plane already closed
        node = event.node_id
        if event.error is not None:
            was_waiting = link.waiting
            self._close(link, event.error)
            if was_waiting:
                return [Reply(node, error=event.error)]
            link.failed = event.error
            return []
        try:
            content = decode_content(event.payload)
        except FrameError as err:
            self._close(link, str(err))
            return [Reply(node, error=f"stream: {err}")]
        self.traffic.record(node, content, upstream=True)
        link.waiting = False
        if link.phase == "offered":
            link.phase = "open"
            self._planes[node] = "stream"
            self._open_s[node] = time.monotonic() - link.offered_at
        status = content.config_records.get(p.STATUS)
        if status is not None and status.get("done", False):  # the node's round is over: commit
            link.held, link.phase = content, "committing"
            link.deadline = time.monotonic() + self.timeout
            link.session.send(Kind.END)
            return []
        return [Reply(node, content=content)]

    def _await_carrier(self, node_id: int) -> None:
        """Before a new Flower message to a node, wait for its last session's carrier (one
        message in flight per node)."""
        carriers = [m for m, n in self._carriers.items() if n == node_id]
        deadline = time.monotonic() + self.timeout
        while carriers and any(m in self._carriers for m in carriers) and time.monotonic() < deadline:
            self._ready += self._poll_grid(force=True)
            time.sleep(0.002)
        for m in carriers:
            self._carriers.pop(m, None)
        if self._links.get(node_id) is not None and self._links[node_id].phase == "closed":
            del self._links[node_id]

    def _grid_due(self, now: float) -> bool:
        """Whether to poll the grid now. A poll is a round trip to the SuperLink (tens of ms
        in a loaded deployment), so it stays off the step path: at once when what is awaited
        can come only through the grid (an ordinary reply; a session opening or committing
        while no session step is out), and about once a second while sessions open or commit
        next to stepping ones. A commit must not wait for the others' steps to pause: under
        a stalled or a long-training node a finished node's commit would otherwise outlive its
        deadline and drop it. An open session's carrier is not polled: its client hanging up
        shows as EOF."""
        if self._pending:
            return True
        phases = {self._links[n].phase for n in self._carriers.values() if n in self._links}
        if "committing" in phases or "offered" in phases:
            stepping = any(link.waiting and link.phase == "open" for link in self._links.values())
            return not stepping or now - self._last_grid_poll >= _GRID_POLL_WHILE_STEPPING
        return False

    def _poll_grid(self, force: bool = False) -> list[Reply]:
        """Flower replies: ordinary ones, and carriers' answers (see ``_grid_due``)."""
        now = time.monotonic()
        if not (force or self._grid_due(now)):
            return []
        self._last_grid_poll = now
        replies = self.poll()
        if self._carriers:
            for message in self.grid.pull_messages(list(self._carriers)):
                node = self._carriers.pop(message.metadata.reply_to_message_id)
                replies += self._on_carrier(node, message)
        return replies

    def _on_carrier(self, node: int, message: Message) -> list[Reply]:
        link = self._links.get(node)
        if link is None:
            return []
        error = (message.error.reason or f"error code {message.error.code}") if message.has_error() else None
        if link.phase == "offered":  # no session: the client failed, or answered over messages
            if error is not None:
                self._close(link, f"the client failed before its session opened: {error}")
                return [Reply(node, error=error)]
            why = message.content.config_records.get(FALLBACK)
            reason = str(why.get("reason", "")) if why else "no reason given"
            self._close(link, "the client answered over messages")
            if self.mode == "stream":  # the offer required the session
                return [Reply(node, error=f"data-plane 'stream': the node answered over messages ({reason})")]
            self._planes[node], self._reasons[node] = "message", reason
            log(WARNING, "[flsplit] node %s: stream session did not open, on messages this round: %s", node, reason)
            return [self.reply_of(node, message)]
        if link.phase == "committing":
            link.phase = "closed"
            if error is not None:
                return [Reply(node, error=f"the client did not commit its round: {error}")]
            return [Reply(node, content=link.held)]
        if link.phase == "open":  # the ClientApp ended while its session was open
            was_waiting = link.waiting
            reason = f"the client ended its session: {error or 'answered without being asked'}"
            self._close(link, reason)
            if was_waiting:
                return [Reply(node, error=reason)]
            link.failed = reason
        return []

    def _expire(self) -> list[Reply]:
        now, replies = time.monotonic(), []
        for node, link in self._links.items():
            if (link.waiting or link.phase == "committing") and now > link.deadline:
                self._close(link, f"no reply within {self.timeout:.0f} s")
                replies.append(Reply(node, error=f"no reply within {self.timeout:.0f} s"))
        return replies
