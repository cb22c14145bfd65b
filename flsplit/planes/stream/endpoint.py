"""The stream plane's client half: reads the round's offer and opens the session it names.

Registered with ``flsplit.planes.endpoint`` when imported (``flsplit.runtime.clientapp`` imports it), so a
``SplitClient`` runs a round over a stream session without knowing the stream.
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from flsplit.planes.endpoint import ClientEndpoint, register_endpoint
from flsplit.planes.stream.client_session import ClientSession
from flsplit.planes.stream.offer import OFFER, SessionOffer

__all__ = ["StreamEndpoint", "STREAM_ENDPOINT"]


class StreamEndpoint(ClientEndpoint):
    """The offer is a ``SessionOffer`` in record ``split.stream``; the session a pinned TLS
    stream (``ClientSession``)."""

    name = "stream"
    offer_record = OFFER

    def parse_offer(self, record: ConfigRecord) -> SessionOffer:
        return SessionOffer.from_record(record)

    def open(self, offer: SessionOffer) -> ClientSession:
        return ClientSession.open(offer)


STREAM_ENDPOINT = register_endpoint(StreamEndpoint())
