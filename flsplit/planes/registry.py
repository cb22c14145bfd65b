"""Data planes by name: a plane is one folder under ``flsplit/planes/`` that registers itself.

A plane's package, when imported, registers its server half here (``register_plane``: the
run config's ``data-plane`` values it serves and how it builds itself from the run config)
and its client half with ``flsplit.planes.endpoint.register_endpoint``. ``load_planes`` imports
every folder under ``flsplit/planes/`` (each is a plane), so adding a plane to flsplit touches
that folder only (plus, for settings of its own, their keys in ``pyproject.toml`` and the
app's ``apps/task.py``). ``message`` (Flower messages only, the ``MessageDataPlane``) is always
there and needs no folder; a plane on Flower messages puts no offer in them and needs no
client half.

Example, in ``flsplit/planes/myplane/__init__.py``::

    register_plane(PlaneEntry("myplane", modes=("myplane",), from_run_config=my_factory))
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from flwr.serverapp import Grid

from flsplit.planes.dataplane import DataPlane

__all__ = ["PlaneEntry", "PlaneFactory", "register_plane", "load_planes", "plane_modes", "plane_factory"]

PlaneFactory = Callable[[Grid, float], DataPlane]
MESSAGE = "message"  # Flower messages only: no plane of its own


@dataclass(frozen=True)
class PlaneEntry:
    """A plane's server half, as the run config reaches it.

    ``modes``: the ``data-plane`` values it serves; ``from_run_config(config, mode)`` checks
    the plane's own keys and returns ``factory(grid, timeout) -> DataPlane``.
    """

    name: str
    modes: tuple[str, ...]
    from_run_config: Callable[[Mapping[str, Any], str], PlaneFactory]


_BY_MODE: dict[str, PlaneEntry] = {}


def register_plane(entry: PlaneEntry) -> PlaneEntry:
    """Make a plane's modes reachable from the run config (once per mode)."""
    for mode in entry.modes:
        known = _BY_MODE.get(mode)
        if mode == MESSAGE or (known is not None and known.name != entry.name):
            raise ValueError(f"data-plane {mode!r} is taken ({'Flower messages' if mode == MESSAGE else known.name})")
    _BY_MODE.update({mode: entry for mode in entry.modes})
    return entry


def load_planes() -> None:
    """Import every plane folder of ``flsplit.planes`` (each registers both its halves)."""
    import flsplit.planes as planes

    for info in pkgutil.iter_modules(planes.__path__):
        if info.ispkg:
            importlib.import_module(f"{planes.__name__}.{info.name}")


def plane_modes() -> list[str]:
    """Every ``data-plane`` value: ``message`` and each registered plane's modes."""
    load_planes()
    return [MESSAGE, *_BY_MODE]


def plane_factory(config: Mapping[str, Any]) -> Optional[PlaneFactory]:
    """The data plane the run config's ``data-plane`` names (``None``: Flower messages only);
    an unknown name is a ``ValueError`` listing the known ones."""
    mode = str(config["data-plane"])
    if mode == MESSAGE:
        return None
    load_planes()
    if mode not in _BY_MODE:
        raise ValueError(f"data-plane must be one of {plane_modes()}, got {mode!r}")
    return _BY_MODE[mode].from_run_config(config, mode)
