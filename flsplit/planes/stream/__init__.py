"""The streaming data plane: every exchange with a node as frames over one TLS session that lasts the run.

``plane.StreamDataPlane`` (the ServerApp's side, a ``flsplit.planes.dataplane.DataPlane``),
``listener`` (TLS listener, admission of offered sessions, one thread per session),
``endpoint`` (the ClientApp's side, a ``flsplit.planes.endpoint.ClientEndpoint``, registered on
import) over ``client_session`` (the session it opens), ``offer`` (what a node's first
Flower message of the run carries), ``frames`` (the wire format), ``tls`` (certificates and pinning),
``simulation`` (whether the ServerApp runs in Flower's simulation engine),
``run_config`` (the plane from the run config's ``stream-*`` keys).

Importing the package registers both halves: the server half's ``data-plane`` modes ``auto``
and ``stream`` (``flsplit.planes.registry``) and the client endpoint.
"""

from flsplit.planes.registry import PlaneEntry, register_plane
from flsplit.planes.stream import endpoint as _endpoint  # noqa: F401  (the client half registers on import)
from flsplit.planes.stream.offer import SessionOffer
from flsplit.planes.stream.plane import MODES, StreamDataPlane
from flsplit.planes.stream.run_config import stream_from_run_config

register_plane(PlaneEntry("stream", modes=("auto", "stream"), from_run_config=stream_from_run_config))

__all__ = ["StreamDataPlane", "SessionOffer", "MODES"]
