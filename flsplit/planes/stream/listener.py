"""The ServerApp's end of the stream plane: a TLS listener that admits only offered sessions.

``SessionListener`` accepts TCP connections, runs each one's TLS handshake and ``HELLO``
under a deadline, and admits a connection only if it names a session offered to a node and
proves it with that session's single-use secret before the offer expires. Every refusal is
logged with its reason (and kept in ``refusals``) and the connection closed: an
unauthenticated peer never gets further than its first frame.

An admitted connection becomes a ``ServerSession``: one thread that owns the socket and keeps
the strict order of the session, one frame then its answer. It sends what the plane queues
and reports each answer (a reply, an acknowledgement, or the reason there is none) on the
plane's event queue, in the order the frames were queued.
"""

from __future__ import annotations

import hmac
import queue
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from logging import WARNING
from typing import Callable, Optional, Union

from flwr.app import RecordDict
from flwr.common.logger import log

from flsplit.planes.stream.frames import (FrameError, Kind, decode_content, decode_json, encode_call, encode_content,
                                          encode_json, readable, recv_frame, recv_header, send_frame)
from flsplit.planes.stream.offer import SessionOffer
from flsplit.planes.stream.tls import ServerCredentials, ephemeral_credentials, server_context

__all__ = ["SessionListener", "ServerSession", "SessionEvent", "HELLO_MAX", "tune_socket"]

HELLO_MAX = 4096  # bytes a not yet authenticated peer may send


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay (a step is one small request and one reply), TCP keepalive probes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


@dataclass
class SessionEvent:
    """What a session reports to the plane: a reply (decoded in the session's thread), an
    acknowledgement (of END or ABORT: ``ack``), or why there is none (``error``)."""

    node_id: int
    session_id: str
    content: Optional[RecordDict] = None
    error: Optional[str] = None
    ack: bool = False


@dataclass
class _Pending:
    node_id: int
    secret: str
    expires: float


class ServerSession:
    """One admitted connection: sends queued frames and reads each one's answer, strictly in turn.

    REQUEST and CALL are answered by a REPLY, END and ABORT by an ACK, CLOSE by the client
    hanging up. The thread that ran the handshake runs ``serve`` until the session ends; no
    other thread touches the TLS socket (OpenSSL objects must not be shared between threads).
    It also encodes each request and decodes each reply, so that under a lockstep step every
    node's serialization runs beside the server's compute instead of after it.
    """

    _ANSWERS = {Kind.REQUEST: (Kind.REPLY, Kind.ERROR), Kind.CALL: (Kind.REPLY, Kind.ERROR),
                Kind.END: (Kind.ACK, Kind.ERROR), Kind.ABORT: (Kind.ACK, Kind.ERROR)}

    def __init__(self, node_id: int, session_id: str, sock: ssl.SSLSocket, events: "queue.Queue[SessionEvent]",
                 max_frame: int) -> None:
        self.node_id, self.session_id, self.sock = node_id, session_id, sock
        self.events, self.max_frame = events, max_frame
        self._outbox: "queue.SimpleQueue[Optional[tuple[Kind, str, Optional[RecordDict]]]]" = queue.SimpleQueue()
        self.closed = threading.Event()

    def send(self, kind: Kind, content: Optional[RecordDict] = None, message_type: str = "") -> None:
        """Queue a frame (a REQUEST's or CALL's ``content``, encoded by the session's thread;
        a CALL names its ``message_type``); each but CLOSE is answered by one event, in the
        order queued."""
        self._outbox.put((kind, message_type, content))

    def close(self) -> None:
        """End the session now (an answer still awaited is reported as an error)."""
        self._outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
        except OSError:
            pass

    def _report(self, content: Optional[RecordDict] = None, error: Optional[str] = None, ack: bool = False) -> None:
        self.events.put(SessionEvent(self.node_id, self.session_id, content, error, ack))

    def _read_answer(self, expect: tuple[Kind, ...] = (Kind.REPLY, Kind.ERROR)) -> bool:
        try:
            kind, payload = recv_frame(self.sock, self.max_frame, expect=expect)
        except (FrameError, OSError) as err:
            self._report(error=f"stream: {err}")
            return False
        if kind is Kind.ERROR:
            try:
                reason = str(decode_json(payload).get("reason", "no reason given"))
            except FrameError:
                reason = "unreadable error frame"
            self._report(error=f"client error: {reason[:2000]}")
            return False
        if kind is Kind.ACK:
            if payload:
                self._report(error="stream: an ACK frame carries no payload")
                return False
            self._report(ack=True)
            return True
        try:
            content = decode_content(payload)
        except FrameError as err:
            self._report(error=f"stream: {err}")
            return False
        self._report(content)
        return True

    def serve(self) -> None:
        """Read the first reply, then alternate: send a queued frame, read its answer."""
        try:
            if not self._read_answer():
                return
            while (item := self._outbox.get()) is not None:
                kind, message_type, content = item
                if content is None:
                    payload = b""
                elif kind is Kind.CALL:
                    payload = encode_call(message_type, content)
                else:
                    payload = encode_content(content)
                if readable(self.sock):  # the client spoke out of turn (or hung up)
                    try:
                        got, _ = recv_header(self.sock)
                        reason = f"client spoke out of turn ({got.name} frame while no request was pending)"
                    except (FrameError, OSError) as err:
                        reason = f"stream: {err}"
                    log(WARNING, "[flsplit] node %s: %s", self.node_id, reason)
                    self._report(error=reason)
                    return
                try:
                    send_frame(self.sock, kind, payload)
                except OSError as err:
                    self._report(error=f"stream: could not send: {err}")
                    return
                if kind is Kind.CLOSE:
                    self.sock.settimeout(5.0)  # let the client read it and hang up
                    try:
                        self.sock.recv(1)
                    except OSError:
                        pass
                    return
                if not self._read_answer(self._ANSWERS[kind]):
                    return
        finally:
            self.closed.set()
            try:
                self.sock.close()
            except OSError:
                pass


class SessionListener:
    """Listens for the stream connections of offered sessions (see the module docstring).

    Parameters
    ----------
    events : queue.Queue
        Where admitted sessions report replies and errors (``SessionEvent``).
    on_session : callable
        ``on_session(session)``: called with each admitted ``ServerSession`` before it serves.
    listen : str
        ``host:port`` to bind (port 0: any free port).
    advertise : str
        ``host:port`` clients connect to (default: the bound address).
    credentials : ServerCredentials, optional
        The deployment's certificate and key; default an ephemeral self-signed one.
    handshake_timeout : float
        Seconds a connection has to finish TLS and send its ``HELLO``.
    max_frame : int
        Largest payload accepted from an admitted session, bytes.
    max_handshakes : int
        Connections that may be in their handshake at once; more are closed at once.
    """

    def __init__(
        self,
        events: "queue.Queue[SessionEvent]",
        on_session: Callable[[ServerSession], None],
        listen: str = "127.0.0.1:0",
        advertise: str = "",
        credentials: Optional[ServerCredentials] = None,
        handshake_timeout: float = 10.0,
        max_frame: int = 256 * 2**20,
        max_handshakes: int = 64,
    ) -> None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"stream-listen must be 'host:port', got {listen!r}")
        if not handshake_timeout > 0 or not max_frame > 0:
            raise ValueError("handshake timeout and frame cap must be positive")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, int(port)))
        self._server.listen(128)
        self._server.settimeout(0.2)  # the accept loop checks for close() this often
        bound_port = self._server.getsockname()[1]
        if host in ("0.0.0.0", "::") and not advertise:
            log(WARNING, "[flsplit] stream: listening on all interfaces but no stream-advertise is set: clients "
                "are offered %s, which only works on this host", f"{host}:{bound_port}")
        self.address = advertise or (f"[{host}]:{bound_port}" if family == socket.AF_INET6 else f"{host}:{bound_port}")
        self.credentials = credentials or ephemeral_credentials(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
        self._context = server_context(self.credentials)
        self.events, self.on_session = events, on_session
        self.handshake_timeout, self.max_frame = handshake_timeout, max_frame
        self._slots = threading.BoundedSemaphore(max_handshakes)
        self._lock = threading.Lock()
        self._offers: dict[str, _Pending] = {}
        self._used: set[str] = set()
        self.refusals: list[dict[str, Union[str, float]]] = []
        self._threads: list[threading.Thread] = []
        self._sessions: list[ServerSession] = []
        self._stop = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="flsplit-stream-accept", daemon=True)
        self._accept_thread.start()

    # ------------------------------------------------------------------ offers
    def offer(self, node_id: int, ttl: float, timeout: float, required: bool, idle_timeout: float = 43200.0,
              detach: bool = False) -> SessionOffer:
        """A new session for ``node_id`` that must connect within ``ttl`` seconds."""
        session_id, secret = secrets.token_hex(16), secrets.token_hex(32)
        with self._lock:
            self._offers[session_id] = _Pending(node_id, secret, time.monotonic() + ttl)
        return SessionOffer(self.address, session_id, secret, self.credentials.cert_pem, self.credentials.fingerprint,
                            timeout, self.handshake_timeout, self.max_frame, required, idle_timeout, detach)

    def revoke(self, session_id: str) -> None:
        """Withdraw an offer that was not taken up."""
        with self._lock:
            self._offers.pop(session_id, None)

    def _admit(self, hello: dict) -> tuple[int, str]:
        """The node and session a HELLO proves, or ``PermissionError`` naming why not."""
        session_id, secret = str(hello.get("session", "")), str(hello.get("secret", ""))
        with self._lock:
            if session_id in self._used:
                raise PermissionError("replayed secret: the session was already opened")
            pending = self._offers.get(session_id)
            if pending is None:
                raise PermissionError("unknown session")
            if not hmac.compare_digest(pending.secret.encode(), secret.encode()):
                raise PermissionError("wrong secret")
            if time.monotonic() > pending.expires:
                del self._offers[session_id]
                raise PermissionError("expired secret: the offer was not taken up in time")
            del self._offers[session_id]
            self._used.add(session_id)
            return pending.node_id, session_id

    # ------------------------------------------------------------------ connections
    def _refuse(self, peer: str, reason: str, sock: Optional[socket.socket]) -> None:
        log(WARNING, "[flsplit] stream: refused connection from %s: %s", peer, reason)
        with self._lock:
            self.refusals.append({"peer": peer, "reason": reason, "time": time.time()})
        if sock is not None:
            try:
                if isinstance(sock, ssl.SSLSocket):
                    send_frame(sock, Kind.ERROR, encode_json({"reason": f"session refused: {reason}"}))
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            peer = f"{addr[0]}:{addr[1]}"
            if not self._slots.acquire(blocking=False):
                self._refuse(peer, "too many connections in their handshake", raw)
                continue
            thread = threading.Thread(target=self._handshake, args=(raw, peer), name="flsplit-stream-session", daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _handshake(self, raw: socket.socket, peer: str) -> None:
        sock: Optional[socket.socket] = raw
        # The deadline bounds the whole handshake, not each read: a peer trickling a byte at a
        # time would otherwise hold its slot for ever. Past it the watchdog shuts the
        # connection down under whatever read is blocked (through a duplicate descriptor:
        # the TLS wrapper takes the original over).
        expired, watched = threading.Event(), raw.dup()

        def expire() -> None:
            expired.set()
            try:
                watched.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        watchdog = threading.Timer(self.handshake_timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                raw.settimeout(self.handshake_timeout)
                tune_socket(raw)
                sock = self._context.wrap_socket(raw, server_side=True)
                _, payload = recv_frame(sock, HELLO_MAX, expect=(Kind.HELLO,))
                node_id, session_id = self._admit(decode_json(payload))
                send_frame(sock, Kind.WELCOME)
            except (OSError, FrameError, PermissionError) as err:  # ssl.SSLError and timeouts are OSErrors
                late = isinstance(err, socket.timeout) or expired.is_set()
                self._refuse(peer, "handshake deadline passed" if late else str(err), sock)
                return
        finally:
            watchdog.cancel()
            watchdog.join()
            watched.close()
            self._slots.release()
        sock.settimeout(None)  # from now on the plane's deadlines apply
        session = ServerSession(node_id, session_id, sock, self.events, self.max_frame)
        with self._lock:
            if self._stop.is_set():
                sock.close()
                return
            self._sessions = [s for s in self._sessions if not s.closed.is_set()] + [session]
        self.on_session(session)
        session.serve()

    def close(self) -> None:
        """Stop listening, end every session, and wait for their threads."""
        self._stop.set()
        with self._lock:
            sessions, threads = list(self._sessions), list(self._threads)
        for session in sessions:
            session.close()
        self._accept_thread.join(timeout=5)
        try:
            self._server.close()
        except OSError:
            pass
        for thread in threads:
            thread.join(timeout=10)
