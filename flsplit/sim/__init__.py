"""The wireless edge simulator: a round's workload, its one price, and the physics kernels.

- ``workload``: ``RoundWorkload`` (per client: cut, FLOPs, bytes; broadcast; server FLOPs;
  timing rule), predicted from a scheme's traffic model or measured from a finished round;
- ``pricing``: ``price(workload, scenario, allocation)``, the one pricing function;
- ``kernels``: the vectorised, unchecked physics the pricing and the planners call.

Scenarios (devices, server, channel) are ``flsplit.costmodel.Scenario``, loaded by
``flsplit.scenario``.
"""

from flsplit.sim.pricing import Allocation, ServerTiming, price
from flsplit.sim.workload import (
    ClientWork,
    ElementWire,
    RoundWorkload,
    Timing,
    measured_workload,
    predict_workload,
)

__all__ = [
    "Allocation",
    "ServerTiming",
    "price",
    "ClientWork",
    "ElementWire",
    "RoundWorkload",
    "Timing",
    "measured_workload",
    "predict_workload",
]
