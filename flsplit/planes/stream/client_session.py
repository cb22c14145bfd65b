"""The ClientApp's end of a stream session: connect, prove the offer, then answer in turn for the run."""

from __future__ import annotations

import socket
import ssl
from typing import Optional

from flwr.app import RecordDict

from flsplit.planes.endpoint import Call, CallKind, PlaneError
from flsplit.wire.protocol import TRAIN_STEP
from flsplit.planes.stream.frames import (FrameError, Kind, decode_call, decode_content, decode_json, encode_content,
                                          encode_json, recv_frame, send_frame)
from flsplit.planes.stream.listener import HELLO_MAX, tune_socket
from flsplit.planes.stream.offer import SessionOffer
from flsplit.planes.stream.tls import check_pin, client_context

__all__ = ["ClientSession", "SessionError", "SessionAborted"]


class SessionError(PlaneError):
    """The session could not be opened or broke; the text says why."""


class SessionAborted(SessionError):
    """The server ended the session with an error frame."""


class ClientSession:
    """An open, authenticated session (use ``open``); strictly answer, then read the next frame.

    A ``flsplit.planes.endpoint.EndpointSession``: ``flsplit.planes.stream.endpoint`` opens it for
    ``SplitClient``."""

    def __init__(self, sock: ssl.SSLSocket, offer: SessionOffer) -> None:
        self.sock, self.offer = sock, offer

    @classmethod
    def open(cls, offer: SessionOffer) -> "ClientSession":
        """Connect to the offer's address over TLS pinned to its certificate, send the secret,
        and wait to be welcomed; ``SessionError`` says what failed."""
        raw: Optional[socket.socket] = None
        sock: Optional[ssl.SSLSocket] = None
        try:
            raw = socket.create_connection(offer.host_port(), timeout=offer.handshake_timeout)
            tune_socket(raw)
            sock = client_context(offer.cert_pem).wrap_socket(raw)
            check_pin(sock, offer.fingerprint)
            send_frame(sock, Kind.HELLO, encode_json({"session": offer.session_id, "secret": offer.secret}))
            kind, payload = recv_frame(sock, HELLO_MAX, expect=(Kind.WELCOME, Kind.ERROR))
            if kind is Kind.ERROR:
                raise SessionError(str(decode_json(payload).get("reason", "refused")))
        except (OSError, FrameError, ValueError) as err:
            for opened in (sock, raw):  # the TLS wrapper owns the descriptor once it exists
                if opened is not None:
                    opened.close()
            raise SessionError(f"could not open the stream session to {offer.address}: {err}") from None
        sock.settimeout(offer.timeout)
        return cls(sock, offer)

    def reply(self, content: RecordDict) -> None:
        """Send the reply to the current request."""
        payload = encode_content(content)
        if len(payload) > self.offer.max_frame:
            raise SessionError(f"reply of {len(payload)} bytes exceeds the session's frame cap of {self.offer.max_frame}")
        try:
            send_frame(self.sock, Kind.REPLY, payload)
        except OSError as err:
            raise SessionError(f"stream broke while replying: {err}") from None

    def ack(self) -> None:
        """Acknowledge END (the round is committed here) or ABORT (it is forgotten)."""
        try:
            send_frame(self.sock, Kind.ACK)
        except OSError as err:
            raise SessionError(f"stream broke while acknowledging: {err}") from None

    def next_call(self, idle: bool) -> Call:
        """What the server asks next (``idle``: no round in progress, wait up to the offer's
        ``idle_timeout``, else its ``timeout``); ``SessionAborted`` on an error frame,
        ``SessionError`` if the stream breaks or the wait runs out."""
        wait = self.offer.idle_timeout if idle else self.offer.timeout
        self.sock.settimeout(wait)
        expect = (Kind.REQUEST, Kind.CALL, Kind.END, Kind.ABORT, Kind.CLOSE, Kind.ERROR)
        try:
            kind, payload = recv_frame(self.sock, self.offer.max_frame, expect=expect)
        except socket.timeout:
            raise SessionError(f"no request from the server within {wait:.0f} s") from None
        except (OSError, FrameError) as err:
            raise SessionError(f"stream broke: {err}") from None
        if kind is Kind.ERROR:
            raise SessionAborted("the server ended the session with an error")
        if kind in (Kind.END, Kind.ABORT, Kind.CLOSE) and payload:
            raise SessionError(f"a {kind.name} frame carries no payload")
        simple = {Kind.END: CallKind.COMMIT, Kind.ABORT: CallKind.DISCARD, Kind.CLOSE: CallKind.CLOSE}
        if kind in simple:
            return Call(simple[kind])
        try:
            if kind is Kind.CALL:
                message_type, content = decode_call(payload)
                return Call(CallKind.REQUEST, message_type, content)
            return Call(CallKind.REQUEST, TRAIN_STEP, decode_content(payload))  # REQUEST frames are train steps
        except FrameError as err:
            raise SessionError(str(err)) from None

    def fail(self, reason: str) -> None:
        """Tell the server why this client stops (best effort), and close."""
        try:
            send_frame(self.sock, Kind.ERROR, encode_json({"reason": reason[:2000]}))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ClientSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
