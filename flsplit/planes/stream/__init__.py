"""The streaming data plane: a round's split exchanges as frames over one TLS session per node.

``plane.StreamDataPlane`` (the ServerApp's side, a ``flsplit.planes.dataplane.DataPlane``),
``listener`` (TLS listener, admission of offered sessions, one thread per session),
``endpoint`` (the ClientApp's side, a ``flsplit.planes.endpoint.ClientEndpoint``, registered on
import) over ``client_session`` (the session it opens), ``offer`` (what the round's first
Flower message carries), ``frames`` (the wire format), ``tls`` (certificates and pinning),
``simulation`` (how many sessions Flower's simulation engine can hold at once).
"""

from flsplit.planes.stream.offer import SessionOffer
from flsplit.planes.stream.plane import MODES, StreamDataPlane

__all__ = ["StreamDataPlane", "SessionOffer", "MODES"]
