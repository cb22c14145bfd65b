"""Frames of the stream plane: a 13-byte header, then a payload of at most a capped size.

Header: ``b"FLS1"`` (magic and version), one byte of frame kind, the payload's length as an
unsigned 64-bit big-endian integer. The length is checked against the cap *before* a byte of
the payload is read, so an oversized frame costs nothing but its header. Request and reply
payloads are Flower ``RecordDict`` values in ``flsplit.planes.stream.payload``'s layout (raw
tensor bytes with dtype and shape, no protobuf or npy pass per array); a CALL's payload is
its message type, then such a ``RecordDict``; control payloads (hello, errors) are small
UTF-8 JSON objects.
"""

from __future__ import annotations

import enum
import json
import select
import socket
import struct
from typing import Any

from flwr.app import RecordDict

from flsplit.planes.stream import payload as layout

__all__ = [
    "FrameError",
    "Kind",
    "HEADER",
    "MAGIC",
    "send_frame",
    "recv_frame",
    "recv_header",
    "readable",
    "encode_content",
    "decode_content",
    "encode_json",
    "decode_json",
    "encode_call",
    "decode_call",
]

MAGIC = b"FLS1"
HEADER = struct.Struct("!4sBQ")


class FrameError(ConnectionError):
    """A frame could not be read or is malformed; the text names what was wrong."""


class Kind(enum.IntEnum):
    """What a frame is.

    Server -> client: WELCOME, REQUEST (a train step), CALL (a request of another type:
    evaluation, upload, a planner's query), END (commit the round), ABORT (forget the
    round), CLOSE (end the session: the run is over, or the session is renewed), ERROR.
    Client -> server: HELLO, REPLY (to a REQUEST or CALL), ACK (to END or ABORT), ERROR.
    A session serves the node for the whole run: after END or ABORT it waits for the next
    round's REQUEST, a CALL or CLOSE.
    """

    HELLO = 1
    WELCOME = 2
    REQUEST = 3
    REPLY = 4
    END = 5
    ABORT = 6
    ERROR = 7
    CALL = 8
    CLOSE = 9
    ACK = 10


def send_frame(sock: socket.socket, kind: Kind, payload: bytes = b"") -> None:
    """Write one frame (header and payload)."""
    sock.sendall(HEADER.pack(MAGIC, int(kind), len(payload)) + payload)


def _read_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0 and what == "header":
                raise FrameError("connection closed")
            raise FrameError(f"truncated frame: {what} ended after {got} of {n} bytes")
        got += k
    return buf


def recv_header(sock: socket.socket) -> tuple[Kind, int]:
    """Read a frame's header: its kind and payload length (bad magic or kind refused)."""
    magic, kind, length = HEADER.unpack(bytes(_read_exact(sock, HEADER.size, "header")))
    if magic != MAGIC:
        raise FrameError(f"not a flsplit frame (magic {magic!r})")
    try:
        return Kind(kind), length
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None


def recv_frame(sock: socket.socket, max_payload: int, expect: tuple[Kind, ...] = ()) -> tuple[Kind, bytearray]:
    """Read one frame; refuse a bad magic, an unknown kind, a payload over ``max_payload``
    bytes (before reading it) and, if ``expect`` is given, any other kind."""
    kind, length = recv_header(sock)
    if length > max_payload:
        raise FrameError(f"frame of {length} bytes exceeds the cap of {max_payload} bytes")
    if expect and kind not in expect:
        raise FrameError(f"unexpected {kind.name} frame (expected {' or '.join(k.name for k in expect)})")
    return kind, _read_exact(sock, length, "payload") if length else bytearray()


def readable(sock: socket.socket) -> bool:
    """Whether bytes (or EOF) wait on the socket now, decrypted or not."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:
        return True
    return bool(select.select([sock], [], [], 0)[0])


def encode_content(content: RecordDict) -> bytes:
    """A ``RecordDict`` as bytes: raw tensors with dtype and shape (``payload``'s layout)."""
    return layout.encode_content(content)


def decode_content(payload: bytes | bytearray) -> RecordDict:
    """The ``RecordDict`` of a payload; ``FrameError`` if it is not one."""
    # payload.py cannot raise FrameError itself (it would import this module back: a cycle)
    try:
        return layout.decode_content(payload)
    except layout.PayloadError as err:
        raise FrameError(f"payload is not a serialized RecordDict: {err}") from None


def encode_call(message_type: str, content: RecordDict) -> bytes:
    """A CALL payload: one byte of length, the message type (ASCII), then the content."""
    name = message_type.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError(f"message type {message_type!r} must be 1 to 255 ASCII bytes")
    return bytes([len(name)]) + name + encode_content(content)


def decode_call(payload: bytes | bytearray) -> tuple[str, RecordDict]:
    """The message type and content of a CALL payload; ``FrameError`` if malformed."""
    if not payload or len(payload) < 1 + payload[0] or payload[0] == 0:
        raise FrameError("call payload too short for its message type")
    size = payload[0]
    try:
        message_type = bytes(payload[1:1 + size]).decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("call message type is not ASCII") from None
    return message_type, decode_content(payload[1 + size:])  # a copy: calls are rare, steps are REQUESTs


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(payload: bytes | bytearray) -> dict[str, Any]:
    """A small JSON object of a control frame; ``FrameError`` if it is not one."""
    try:
        obj = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise FrameError(f"control frame is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise FrameError("control frame is not a JSON object")
    return obj
