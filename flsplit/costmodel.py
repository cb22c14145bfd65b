"""Former home of the wireless edge cost model; its names now live in ``flsplit.sim``.

Kept so that ``from flsplit.costmodel import Scenario`` (README, user code, the strategies)
keeps working; new code imports from ``flsplit.sim`` (the layers are
``sim.kernels <- sim.scenario <- sim.workload / sim.pricing <- planners``):

* ``DeviceProfile``, ``ServerProfile``, ``Channel``, ``Scenario``, ``dbm_to_w``,
  ``path_loss_db``, ``rayleigh_power``: ``flsplit.sim.scenario``;
* ``ClientCost``, ``RoundCost`` (``price``'s result): ``flsplit.sim.pricing``;
* ``client_flops``, ``server_flops``, ``smashed_bytes`` (work from a profile):
  ``flsplit.sim.workload``.

The old checked pricing front ``round_cost`` and its helpers had no product caller: they are
the tests' reference oracle now (``tests/oracle.py``); every round is priced by
``flsplit.sim.price``.
"""

from __future__ import annotations

from flsplit.sim.pricing import ClientCost, RoundCost
from flsplit.sim.scenario import (
    FADING_MODELS,
    Channel,
    DeviceProfile,
    Scenario,
    ServerProfile,
    dbm_to_w,
    path_loss_db,
    rayleigh_power,
)
from flsplit.sim.workload import client_flops, server_flops, smashed_bytes

__all__ = [
    "DeviceProfile",
    "ServerProfile",
    "Channel",
    "Scenario",
    "ClientCost",
    "RoundCost",
    "client_flops",
    "server_flops",
    "smashed_bytes",
    "dbm_to_w",
    "path_loss_db",
    "rayleigh_power",
    "FADING_MODELS",
]
