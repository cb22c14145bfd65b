"""Whether the ServerApp runs in Flower's simulation engine.

In a ``flwr run`` simulation the ServerApp runs in the same process as Flower's engine, which
runs each ClientApp on one of its Ray actors, fewer than the fleet. A session that held its
ClientApp for the run would hold an actor, so in simulation the plane detaches sessions
(``SessionOffer.detach``): the ClientApp answers its message once its session is open and
serves it from a thread of its Ray worker.
"""

from __future__ import annotations

import sys

__all__ = ["in_simulation"]

_ENGINE_MODULE = "flwr.simulation.ray_transport.ray_actor"


def in_simulation() -> bool:
    """Whether this ServerApp runs inside Flower's simulation engine (its Ray actor module is
    loaded: the engine runs in this process)."""
    return _ENGINE_MODULE in sys.modules
