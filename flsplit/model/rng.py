"""torch's CPU random generator, shared safely by the threads of one process.

Dropout draws its masks from torch's global CPU generator. A client's forward reseeds it
(forked, so the caller's stream is untouched) to draw the same masks when it recomputes a
batch; the server's forward draws from it in sequence. When several ClientApps run as threads
of one process (a threaded in-process grid, next to the ServerApp's thread), those draws would
interleave and the masks would depend on thread timing. One process-wide lock makes each
forward's draws atomic; in a deployment or a Ray simulation every ClientApp is its own process
and the lock is never contended.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["seeded", "shared"]

_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws inside come from the CPU generator seeded with ``seed``; the global stream
    resumes afterwards as if nothing had been drawn."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also queue lazy CUDA seeding.
        torch.default_generator.manual_seed(seed)
        yield


@contextmanager
def shared() -> Iterator[None]:
    """Draws inside come from the global CPU generator, not interleaved with another thread's."""
    with _LOCK:
        yield
