"""The wireless edge simulator: a round's workload, its one price, and the physics kernels.

- ``workload``: ``RoundWorkload`` (per client: cut, FLOPs, bytes; broadcast; server FLOPs;
  timing rule);
- ``schemes``: each scheme's traffic model beside its timing rule, one table keyed by scheme;
- ``traffic``: the workload a round will do (``predict_workload``: a scheme's traffic model
  with a ``WireModel``) and the workload of a finished round (``measured_workload``);
- ``pricing``: ``price(workload, scenario, allocation)``, the one pricing function;
- ``kernels``: the vectorised, unchecked physics the pricing and the planners call.

- ``scenario``: the scenario types (``Scenario``: devices, server, channel), checked once and
  loaded from files by ``flsplit.sim.scenario_files``;
- ``checks``: the argument checks of the checked edges (numbers, cuts, energy budgets), the
  one family of the simulator and the planners.

Imports flow one way: ``kernels``, ``checks`` <- ``scenario`` <- ``workload`` <- ``schemes`` <-
``traffic``, ``pricing``; the planners import from here, never the reverse.
"""

from flsplit.sim.pricing import Allocation, ServerTiming, price, price_totals
from flsplit.sim.schemes import WireModel
from flsplit.sim.traffic import ElementWire, measured_workload, predict_workload
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
