"""How many stream sessions Flower's simulation engine can hold open at once.

In a ``flwr run`` simulation the ServerApp runs in the same process as Flower's engine,
which runs a ClientApp on one of its Ray actors, with at most ``min(32, cpu_count + 4)``
worker threads (Flower's hard-coded thread pool). A session holds its ClientApp for the whole
run unless it is detached, so ``N`` such sessions need ``N`` ClientApps running at once; the
plane detaches sessions in simulation instead (``SessionOffer.detach``).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Optional

__all__ = ["simulation_concurrency", "in_simulation"]

_POOL_MODULE = "flwr.simulation.ray_transport.ray_actor"


def in_simulation() -> bool:
    """Whether this ServerApp runs inside Flower's simulation engine (its Ray actor module is
    loaded: the engine runs in this process)."""
    return _POOL_MODULE in sys.modules


def simulation_concurrency(wait: float = 60.0) -> Optional[int]:
    """``None`` outside Flower's simulation engine (no limit: a deployment); else the number
    of ClientApps it runs at once, or 0 if its actor pool does not appear within ``wait``
    seconds (the engine builds it in its own thread, while the ServerApp starts)."""
    module = sys.modules.get(_POOL_MODULE)
    if module is None:
        return None
    threads = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default in vce_api
    deadline = time.monotonic() + wait
    while True:
        # type() rather than isinstance(): no attribute of any other object is touched.
        pools = [o for o in gc.get_objects() if type(o) is module.BasicActorPool]
        actors = max((int(getattr(pool, "num_actors", 0)) for pool in pools), default=0)
        if actors > 0:
            return min(threads, actors)
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.1)
