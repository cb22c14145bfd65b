"""``StreamDataPlane``: every exchange with a node as frames over one TLS session that lasts the run.

A node's first train request travels as one Flower message, the *carrier*, with a
``SessionOffer`` added; the ClientApp connects out to this plane's listener, proves the
offer's single-use secret, and from then on every request to that node is a frame of its
session: the round's train steps (``REQUEST``), and between rounds the next rounds, evaluation,
one-way uploads and planner queries (``CALL``). The ClientApp keeps torch imported, its data
loaded and, during a round, its trainer (client part, optimizer, cursor, for one batch per
exchange the autograd graph) in memory (``flsplit.runtime.node_session``).

When a node's reply says its round is done, the plane sends ``END``; the client writes its
state and acknowledges, and only then is the done reply handed to the schedule, so a node
that fails before committing contributes nothing. A node left out of the rest of a round
(dropped, or the round ended without it) gets ``ABORT``: it forgets the round and keeps its
session. ``close`` (the run's end) sends ``CLOSE``; in a deployment the ClientApp then answers
its carrier, which Flower holds for the run (within its message TTL; a session older than
``renew_after`` is closed and reopened at the node's next round). In Flower's simulation engine,
whose actor pool is smaller than the fleet, the ClientApp answers its carrier as soon as the
session is open and serves it from a thread of its worker process (``detach``).

Where no session is open (a node that could not connect in ``auto`` mode, any request but a
round's first to a node without one) requests travel as Flower messages, exactly as on
``MessageDataPlane``; strategies and schedules see one ``DataPlane``. Byte counting is the
same on both planes: the arrays of each request and reply, whichever way they travel.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Optional

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import MessageDataPlane, Reply
from flsplit.planes.stream.frames import Kind
from flsplit.planes.stream.listener import ServerSession, SessionEvent, SessionListener
from flsplit.planes.stream.offer import FALLBACK, OFFER, SessionOffer
from flsplit.planes.stream.tls import ServerCredentials

__all__ = ["StreamDataPlane", "MODES"]

MODES = ("auto", "stream", "message")
_GRID_POLL_WHILE_STEPPING = 1.0  # seconds between grid polls for opening sessions while others step
_FLOWER_TTL = 43200.0  # flwr.common.constant.MESSAGE_TTL: a carrier must be answered within it
_CLOSE_WAIT = 10.0  # seconds close() gives sessions and held carriers to end cleanly


@dataclass
class _Link:
    """One node's session, from its carrier's offer to its close."""

    node_id: int
    offer: SessionOffer
    carrier: str  # message id of the Flower message that opened (and in a deployment holds) the session
    phase: str = "offered"  # offered -> open (a round) / calling (another request) / committing -> idle ...
    session: Optional[ServerSession] = None
    expect: deque = field(default_factory=deque)  # per frame sent, in order: [what, live] ("reply", "commit", "discard")
    deadline: float = 0.0
    held: Optional[RecordDict] = None  # the done reply, until the client has committed
    offered_at: float = 0.0
    failed: Optional[str] = None  # why the session broke mid-round, for the node's next request

    @property
    def waiting(self) -> bool:
        """A reply or a commit is due to the schedule."""
        return any(live and what != "discard" for what, live in self.expect)


class StreamDataPlane(MessageDataPlane):
    """The data plane over run-long TLS sessions, with Flower messages where none is open.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (carriers and every non-stream message go through it).
    timeout : float
        Seconds a request may wait for its reply (the client waits twice that for each frame
        of a round).
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
    open_timeout : float
        Seconds from a carrier's push to its session's ``HELLO``: a cold ClientApp's start
        (a SuperNode's poll, the process, torch, the data) does not count against ``timeout``,
        which starts when the session is admitted.
    detach : bool
        Offer detached sessions (``SessionOffer.detach``): for Flower's simulation engine.
    renew_after : float
        Seconds after which a session is closed and reopened at the node's next round, so
        its carrier is answered within Flower's message TTL.
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
        open_timeout: float = 600.0,
        detach: bool = False,
        renew_after: float = _FLOWER_TTL / 2,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"data-plane must be one of {MODES}, got {mode!r}")
        if not open_timeout > 0 or not renew_after > 0:
            raise ValueError("open_timeout and renew_after must be positive")
        super().__init__(grid, timeout)
        self.mode, self.open_timeout, self.detach, self.renew_after = mode, open_timeout, detach, renew_after
        self._events: "queue.Queue[SessionEvent]" = queue.Queue()
        self._lock = threading.Lock()
        self.listener = SessionListener(self._events, self._on_session, listen, advertise, credentials,
                                        handshake_timeout, max_frame) if mode != "message" else None
        self._links: dict[int, _Link] = {}
        self._carriers: dict[str, int] = {}  # carrier message id -> node, until answered
        self._ready: list[Reply] = []
        self._planes: dict[int, str] = {}  # node -> plane used this round
        self._warm: set[int] = set()  # nodes whose round started on a session already open
        self._reasons: dict[int, str] = {}  # node -> why it stayed on messages
        self._open_s: dict[int, float] = {}  # node -> seconds from its offer to its first reply
        self._round_on_messages: Optional[str] = None
        self._last_grid_poll = 0.0

    # ------------------------------------------------------------------ seam
    @property
    def in_flight(self) -> set[int]:
        busy = {n for n, link in self._links.items() if link.waiting or link.phase == "offered"}
        return super().in_flight | busy | {r.node_id for r in self._ready}

    def push(self, node_id: int, content: RecordDict, message_type: str, group_id: str) -> None:
        if node_id in self.in_flight:
            raise RuntimeError(f"node {node_id} already has a request in flight")
        link = self._links.get(node_id)
        if link is not None and link.phase == "closed":
            del self._links[node_id]
            if link.failed is not None:  # the session broke between two steps of a round
                self._ready.append(Reply(node_id, error=link.failed))
                return
            link = None
        starts_round = message_type == p.TRAIN_STEP and p.CLIENT_PART in content
        if link is not None and link.phase in ("idle", "open", "aborting"):
            if link.phase == "idle" and starts_round and time.monotonic() - link.offered_at > self.renew_after:
                self._retire(link, "renewed within Flower's message TTL")
            else:
                self._send(link, content, message_type, starts_round)
                return
        if starts_round and self._may_offer(node_id):
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
        """Tell the nodes whose round the schedule left open to forget it (their sessions stay
        for the next round), and report (and log) which plane each node used."""
        for node in list(self._links):
            link = self._links[node]
            if link.phase in ("offered", "open", "calling"):
                self._discard(link, "round over")
            if link.phase == "closed":
                del self._links[node]
        planes, self._planes = dict(sorted(self._planes.items())), {}
        reasons, self._reasons = self._reasons, {}
        opened, self._open_s = self._open_s, {}
        warm, self._warm = self._warm, set()
        self._round_on_messages = None
        super().end_round()
        stream = [n for n, kind in planes.items() if kind == "stream"]
        message = [n for n, kind in planes.items() if kind == "message"]
        if planes and self.mode != "message":
            why = sorted(set(reasons.values()))
            sessions = []
            if warm & set(stream):
                sessions.append(f"{len(warm & set(stream))} on sessions open since an earlier round")
            if opened:
                sessions.append(f"{len(opened)} opened, first replies in {max(opened.values()):.2f} s")
            log(INFO, "[flsplit] data plane: stream for %d node(s) %s%s, messages for %d %s%s", len(stream), stream,
                f" ({'; '.join(sessions)})" if sessions else "", len(message), message, f" ({'; '.join(why)})" if why else "")
        return planes

    def drop(self, node_id: int, reason: str) -> None:
        """The node sits out the rest of the round: it forgets the round and keeps its session
        (one not open yet is withdrawn)."""
        link = self._links.get(node_id)
        if link is not None and link.phase in ("offered", "open", "calling"):
            self._discard(link, f"node sits out: {reason}")

    def close(self) -> None:
        """End every session, give them and the carriers Flower holds a few seconds to end
        cleanly, then stop listening. A session between rounds gets ``CLOSE`` (its node ends
        its ClientApp normally); one in the middle of a round (the ServerApp failed) is cut,
        so its node fails at once and writes nothing of that round."""
        deadline = time.monotonic() + min(self.timeout, _CLOSE_WAIT)
        for link in self._links.values():
            if link.session is not None and link.phase in ("idle", "aborting"):
                link.session.send(Kind.CLOSE)
            elif link.session is not None:
                link.session.close()
            elif link.phase == "offered" and self.listener is not None:
                self.listener.revoke(link.offer.session_id)
            link.phase = "closed"
        for link in self._links.values():
            if link.session is not None:
                link.session.closed.wait(max(0.0, deadline - time.monotonic()))
        held = {m for m, n in self._carriers.items() if n in self._links and not self._links[n].offer.detach}
        while held & set(self._carriers) and time.monotonic() < deadline:
            for message in self.grid.pull_messages(list(held & set(self._carriers))):
                self._carriers.pop(message.metadata.reply_to_message_id, None)
            time.sleep(0.05)
        for link in self._links.values():
            if link.session is not None:
                link.session.close()
        if self.listener is not None:
            self.listener.close()

    # ------------------------------------------------------------------ frames on an open session
    def _send(self, link: _Link, content: RecordDict, message_type: str, starts_round: bool) -> None:
        """A request as a frame: a train step of the round in progress, or between rounds the
        next round's first request or any other request (``CALL``)."""
        node = link.node_id
        if link.phase == "open":
            if message_type != p.TRAIN_STEP or starts_round:
                raise RuntimeError(f"node {node} is in a round: only that round's train steps go to it")
            link.session.send(Kind.REQUEST, content)
        elif message_type == p.TRAIN_STEP:
            if not starts_round:
                raise RuntimeError(f"node {node} has no round in progress: a round's first request carries "
                                   f"'{p.CLIENT_PART}'")
            link.session.send(Kind.REQUEST, content)
            link.phase = "open"
            self._planes[node] = "stream"
            self._warm.add(node)
        else:
            link.session.send(Kind.CALL, content, message_type)
            link.phase = "calling"
        self.traffic.record(node, content, upstream=False)  # a frame counts as a message
        link.expect.append(["reply", True])
        link.deadline = time.monotonic() + self.timeout

    def _discard(self, link: _Link, reason: str) -> None:
        """The node's round is forgotten: its pending replies are ignored, an open session
        gets ``ABORT``; a session not open yet is withdrawn."""
        if link.session is None:
            self._close(link, reason)
            return
        for entry in link.expect:
            if entry[0] == "reply":
                entry[1] = False
        link.session.send(Kind.ABORT)
        link.expect.append(["discard", True])
        link.phase = "aborting"
        log(INFO, "[flsplit] node %s: round forgotten, session kept: %s", link.node_id, reason)

    def _retire(self, link: _Link, reason: str) -> None:
        """Close an idle session for good (the node's next round opens a new one)."""
        if link.session is not None:
            link.session.send(Kind.CLOSE)
        link.phase = "closed"
        del self._links[link.node_id]
        log(INFO, "[flsplit] node %s: stream session closed: %s", link.node_id, reason)

    # ------------------------------------------------------------------ offers and sessions
    def _may_offer(self, node_id: int) -> bool:
        if self.mode == "message":
            return False
        if self._round_on_messages is None and not self.detach:
            if getattr(self.grid, "concurrency", None) == 0:
                self._refuse_streams("the grid runs no ClientApp while the ServerApp waits")
            else:
                self._check_concurrency()
        if self._round_on_messages is not None:
            self._reasons[node_id] = self._round_on_messages
            return False
        return True

    def _check_concurrency(self) -> None:
        """A session that is not detached holds its ClientApp for the run: every node of the
        fleet must be able to hold one at once (the grid says how many ClientApps it runs at
        once, ``grid.concurrency``, where it has a limit), or the others' ClientApps never run."""
        limit = getattr(self.grid, "concurrency", None)
        if not isinstance(limit, int):
            return
        fleet = len(list(self.grid.get_node_ids()))
        if fleet > limit:
            self._refuse_streams(f"sessions last the run and {fleet} nodes would hold one each, the grid runs {limit} "
                                 f"ClientApps at a time", advice=f"let the grid run {fleet} ClientApps at once")

    def _refuse_streams(self, reason: str, advice: str = "use data-plane 'auto'") -> None:
        """Keep this round on messages (``auto``), or refuse it (``stream``)."""
        if self.mode == "stream":
            raise ValueError(f"data-plane 'stream': {reason}; {advice}")
        self._round_on_messages = reason

    def _offer(self, node_id: int, content: RecordDict, group_id: str) -> None:
        # The client waits for each request of a round up to twice the exchange timeout: in
        # lockstep the server may legitimately wait one timeout for the slowest node before
        # asking again. Between rounds it waits until the session is due for renewal.
        offer = self.listener.offer(node_id, ttl=self.open_timeout, timeout=2 * self.timeout + 10,
                                    required=self.mode == "stream", detach=self.detach,
                                    idle_timeout=self.renew_after + 2 * self.timeout + 10)
        carried = RecordDict(dict(content.items()))
        carried[OFFER] = offer.to_record()
        message = Message(carried, node_id, p.TRAIN_STEP, group_id=group_id)
        now = time.monotonic()
        link = _Link(node_id, offer, carrier="", deadline=now + self.open_timeout, offered_at=now)
        link.expect.append(["reply", True])
        with self._lock:  # registered before the push: the client may connect before it returns
            self._links[node_id] = link
        (msg_id,) = list(self.grid.push_messages([message]))
        link.carrier = msg_id
        self.traffic.record(node_id, content, upstream=False)
        self._carriers[msg_id] = node_id

    def _on_session(self, session: ServerSession) -> None:
        """Called by the listener (its thread) when a node's session is admitted: from now
        on the exchange timeout runs for its first reply."""
        with self._lock:
            link = self._links.get(session.node_id)
            if link is None or link.offer.session_id != session.session_id or link.phase != "offered":
                session.close()  # the plane gave up on this offer already
                return
            link.session = session
            link.deadline = time.monotonic() + self.timeout

    def _close(self, link: _Link, reason: str) -> None:
        """The session is over for good (broken, refused, or never opened)."""
        with self._lock:  # against _on_session attaching a session at this moment
            if link.phase == "offered" and link.session is None and self.listener is not None:
                self.listener.revoke(link.offer.session_id)
            if link.session is not None:
                link.session.close()
            link.phase = "closed"
            link.expect.clear()
        self._carriers.pop(link.carrier, None)  # a broken session's carrier may never be answered
        log(WARNING, "[flsplit] node %s: stream session closed: %s", link.node_id, reason)

    def _on_event(self, event: SessionEvent) -> list[Reply]:
        link = self._links.get(event.node_id)
        if link is None or link.offer.session_id != event.session_id or link.phase == "closed":
            return []  # a session the plane already closed
        node = event.node_id
        if event.error is not None:
            return self._broken(link, event.error)
        what, live = link.expect.popleft() if link.expect else ("", False)
        if what == "" or (event.ack != (what in ("commit", "discard"))):
            return self._broken(link, f"stream: the client answered out of turn ({'an ACK' if event.ack else 'a reply'})")
        if what == "discard":
            if link.phase == "aborting":  # no request sent since the ABORT
                link.phase = "idle"
            return []
        if what == "commit":
            link.phase = "idle"
            held, link.held = link.held, None
            return [Reply(node, content=held)]
        if not live:
            return []  # the reply to a request of a round the node has since been told to forget
        content = event.content
        self.traffic.record(node, content, upstream=True)
        if link.phase == "offered":
            link.phase = "open"
            self._planes[node] = "stream"
            self._open_s[node] = time.monotonic() - link.offered_at
        if link.phase == "calling":
            link.phase = "idle"
            return [Reply(node, content=content)]
        status = content.config_records.get(p.STATUS)
        if status is not None and status.get("done", False):  # the node's round is over: commit
            link.held, link.phase = content, "committing"
            link.deadline = time.monotonic() + self.timeout
            link.session.send(Kind.END)
            link.expect.append(["commit", True])
            return []
        return [Reply(node, content=content)]

    def _broken(self, link: _Link, reason: str) -> list[Reply]:
        """The session is over (EOF, an error frame, a frame out of turn, its ClientApp ended):
        a reply or commit due fails now; in the middle of a round the node's next request
        fails instead; between rounds the node's next round opens a new session."""
        due, in_round = link.waiting, link.phase == "open"
        self._close(link, reason)
        if due:
            return [Reply(link.node_id, error=reason)]
        if in_round:
            link.failed = reason
        else:
            del self._links[link.node_id]
        return []

    def _grid_due(self, now: float) -> bool:
        """Whether to poll the grid now. A poll is a round trip to the SuperLink (tens of ms
        in a loaded deployment), so it stays off the step path: at once when what is awaited
        can come only through the grid (an ordinary reply; a session opening while no session
        step is out), and about once a second while sessions open next to stepping ones. An
        open session's carrier is not polled: its client hanging up shows as EOF."""
        if self._pending:
            return True
        if any(self._links[n].phase == "offered" for n in self._carriers.values() if n in self._links):
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
        if link is None or link.carrier != message.metadata.reply_to_message_id or link.phase == "closed":
            return []  # the carrier of a session already over
        error = (message.error.reason or f"error code {message.error.code}") if message.has_error() else None
        if link.phase == "offered" and link.session is None and (error is not None or FALLBACK in message.content.config_records):
            if error is not None:  # no session: the client failed before its session opened
                self._close(link, f"the client failed before its session opened: {error}")
                return [Reply(node, error=error)]
            why = message.content.config_records.get(FALLBACK)
            reason = str(why.get("reason", "")) or "no reason given"
            self._close(link, "the client answered over messages")
            if self.mode == "stream":  # the offer required the session
                return [Reply(node, error=f"data-plane 'stream': the node answered over messages ({reason})")]
            self._planes[node], self._reasons[node] = "message", reason
            log(WARNING, "[flsplit] node %s: stream session did not open, on messages this round: %s", node, reason)
            return [self.reply_of(node, message)]
        if link.offer.detach and error is None:
            return []  # a detached session's ClientApp answers as soon as its session is open
        # The ClientApp ended while its session was open (or before it opened, without saying why).
        return self._broken(link, f"the client ended its session: {error or 'answered without being asked'}")

    def _expire(self) -> list[Reply]:
        now, replies = time.monotonic(), []
        for node, link in self._links.items():
            if link.phase != "closed" and (link.waiting or link.phase == "offered") and now > link.deadline:
                what = "session opened" if link.phase == "offered" and link.session is None else "reply"
                limit = self.open_timeout if what == "session opened" else self.timeout
                due = link.waiting
                self._close(link, f"no {what} within {limit:.0f} s")
                if due:
                    replies.append(Reply(node, error=f"no {what} within {limit:.0f} s"))
        return replies
