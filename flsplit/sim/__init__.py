"""The wireless edge simulator: a round's workload, its one price, and the physics kernels.

- ``workload``: ``RoundWorkload`` (per client: cut, FLOPs, bytes; broadcast; server FLOPs;
  timing rule);
- ``traffic``: each scheme's traffic model (``predict_workload`` with a ``WireModel``) and the
  workload of a finished round (``measured_workload``);
- ``pricing``: ``price(workload, scenario, allocation)``, the one pricing function;
- ``kernels``: the vectorised, unchecked physics the pricing and the planners call.

Scenarios (devices, server, channel) are ``flsplit.costmodel.Scenario``, loaded by
``flsplit.scenario``.
"""

from flsplit.sim.pricing import Allocation, ServerTiming, price, price_totals
from flsplit.sim.traffic import ElementWire, WireModel, measured_workload, predict_workload
from flsplit.sim.workload import ClientWork, RoundWorkload, Timing

__all__ = [
    "Allocation",
    "ServerTiming",
    "price",
    "price_totals",
    "ClientWork",
    "ElementWire",
    "WireModel",
    "RoundWorkload",
    "Timing",
    "measured_workload",
    "predict_workload",
]
