"""The client half of the data-plane seam: how a node answers a round over some plane.

``flsplit.planes.dataplane.DataPlane`` is the ServerApp's half: strategies send requests and take
replies through it. This module is the ClientApp's half. Every round starts with a Flower
message (``train.split_step``); a plane other than messages puts an *offer* in it, a
``ConfigRecord`` under the plane's own name. ``SplitClient`` asks the registry here whether a
request carries an offer (``offer_in``), opens the session with the plane's endpoint, and
then serves the node over it for the run: answer, read the next ``Call`` (a request of any
type, commit or discard the round, close), until the server closes the session.
``SplitClient`` knows no plane by name.

A plane is one folder holding both halves, e.g. ``flsplit/planes/stream/``: ``plane.py`` (a
``DataPlane``) and ``endpoint.py`` (a ``ClientEndpoint`` that registers itself when imported;
``flsplit.runtime.clientapp`` imports the built-in planes' endpoints). A plane registered by an app
works the same: import its endpoint module before the first message.

The records that do not depend on the plane stay in ``flsplit.wire.protocol``, so the reply gate
knows none: ``protocol.FALLBACK`` (a reply sent over messages because a session that the
offer allowed to fail did not open, and why).

Example::

    class MyEndpoint(ClientEndpoint):
        name, offer_record = "mine", "split.mine"

        def parse_offer(self, record):   # ValueError if malformed
            return MyOffer.from_record(record)

        def open(self, offer):           # PlaneError if it cannot
            return MySession.connect(offer)

    register_endpoint(MyEndpoint())
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Protocol

from flwr.app import ConfigRecord, RecordDict

from flsplit.wire.protocol import ProtocolError

__all__ = ["Call", "CallKind", "ClientEndpoint", "EndpointSession", "Offer", "PlaneError", "endpoints", "offer_in", "offer_records",
           "register_endpoint"]


class PlaneError(ConnectionError):
    """A plane's session could not be opened or broke; the text says why."""


class Offer(Protocol):
    """What a plane's ``parse_offer`` returns: whatever ``open`` needs, and ``required``."""

    required: bool  # True: a node that cannot open the session fails; False: it answers over messages


class CallKind(str, Enum):
    """What the server asks of a session next."""

    REQUEST = "request"  # answer ``content`` (a ``message_type`` request) with ``reply``
    COMMIT = "commit"  # the node's round is over: keep its state, then ``ack``
    DISCARD = "discard"  # forget the round in progress, keep the last committed state, then ``ack``
    CLOSE = "close"  # the session is over (the run ended, or it is renewed): answer the carrier


@dataclass(frozen=True)
class Call:
    """One thing the server asks of a node's session (``EndpointSession.next_call``)."""

    kind: CallKind
    message_type: str = ""
    content: Optional[RecordDict] = None


class EndpointSession(Protocol):
    """A node's open session, for the run: strictly answer, then read the next call."""

    def reply(self, content: RecordDict) -> None:
        """Send the reply to the current request (``PlaneError`` if the plane breaks)."""

    def ack(self) -> None:
        """Acknowledge a commit or a discard (``PlaneError`` if the plane breaks)."""

    def next_call(self, idle: bool) -> Call:
        """What the server asks next; ``idle``: no round is in progress (the wait may be
        long). ``PlaneError`` if the plane breaks or the wait runs out."""

    def fail(self, reason: str) -> None:
        """Tell the server why this client stops (best effort), and close."""

    def close(self) -> None: ...

    def __enter__(self) -> "EndpointSession": ...

    def __exit__(self, *exc) -> None: ...


class ClientEndpoint(ABC):
    """A plane's client half: it reads the plane's offer and opens the session it names."""

    name: str  # the plane's name, e.g. "stream"
    offer_record: str  # the ConfigRecord of a round's first request that offers a session

    @abstractmethod
    def parse_offer(self, record: ConfigRecord) -> Offer:
        """The offer in ``record``; ``ValueError`` (saying why) if it is malformed."""

    @abstractmethod
    def open(self, offer: Offer) -> EndpointSession:
        """Open the offered session; ``PlaneError`` says what failed."""


_ENDPOINTS: dict[str, ClientEndpoint] = {}


def register_endpoint(endpoint: ClientEndpoint) -> ClientEndpoint:
    """Add a plane's client endpoint (again: replaces the one of that name); returns it."""
    if not isinstance(endpoint, ClientEndpoint):
        raise TypeError(f"a client endpoint must be a ClientEndpoint, got {type(endpoint).__name__}")
    for other in _ENDPOINTS.values():
        if other.name != endpoint.name and other.offer_record == endpoint.offer_record:
            raise ValueError(f"planes {other.name!r} and {endpoint.name!r} both offer sessions in "
                             f"record {endpoint.offer_record!r}")
    _ENDPOINTS[endpoint.name] = endpoint
    return endpoint


def endpoints() -> dict[str, ClientEndpoint]:
    """The registered client endpoints by plane name."""
    return dict(_ENDPOINTS)


def offer_records() -> frozenset[str]:
    """The names of the records that offer a session, one per registered plane."""
    return frozenset(e.offer_record for e in _ENDPOINTS.values())


def offer_in(content: RecordDict) -> Optional[tuple[ClientEndpoint, Offer]]:
    """The plane and offer a request carries, or ``None`` (answer over messages);
    ``ProtocolError`` if an offer is malformed or the request offers two sessions."""
    found = [e for e in _ENDPOINTS.values() if e.offer_record in content.config_records]
    if not found:
        return None
    if len(found) > 1:
        raise ProtocolError(f"a request offers sessions on {len(found)} planes: {sorted(e.name for e in found)}")
    (endpoint,) = found
    try:
        return endpoint, endpoint.parse_offer(content.config_records[endpoint.offer_record])
    except ValueError as err:
        raise ProtocolError(str(err)) from None
