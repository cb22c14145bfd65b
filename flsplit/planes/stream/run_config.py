"""The stream plane from a run config: its ``stream-*`` keys, checked before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp import Grid

from flsplit.planes.dataplane import DataPlane
from flsplit.planes.registry import PlaneFactory
from flsplit.planes.stream.plane import StreamDataPlane
from flsplit.planes.stream.simulation import in_simulation
from flsplit.planes.stream.tls import load_credentials

__all__ = ["stream_from_run_config"]


def stream_from_run_config(config: Mapping[str, Any], mode: str) -> PlaneFactory:
    """``auto`` or ``stream`` with the run config's listener, certificate and frame settings."""
    certfile, keyfile = str(config["stream-certfile"]), str(config["stream-keyfile"])
    if bool(certfile) != bool(keyfile):
        raise ValueError("stream-certfile and stream-keyfile go together (both, or neither for an ephemeral certificate)")
    credentials = load_credentials(certfile, keyfile) if certfile else None
    max_frame_mb, handshake = float(config["stream-max-frame-mb"]), float(config["stream-handshake-timeout"])
    open_timeout = float(config.get("stream-open-timeout", 600.0))
    if not max_frame_mb > 0 or not handshake > 0 or not open_timeout > 0:
        raise ValueError("stream-max-frame-mb, stream-handshake-timeout and stream-open-timeout must be positive")
    listen, advertise = str(config["stream-listen"]), str(config["stream-advertise"])

    def factory(grid: Grid, timeout: float) -> DataPlane:
        return StreamDataPlane(grid, timeout, mode=mode, listen=listen, advertise=advertise, credentials=credentials,
                               handshake_timeout=handshake, max_frame=int(max_frame_mb * 2**20),
                               open_timeout=open_timeout, detach=in_simulation())

    return factory
