"""Resource planners: pure functions (or small stateful objects) from a problem to a plan.

A plan holds a cut per client and the resource allocations, plus the round latency and
energy the cost model predicts for it (``flsplit.costmodel``).

- ``plan_edgesplit``: a cut and a bandwidth share per client, minimising the makespan.
- ``plan_fixed`` / ``best_fixed_cut``: the baseline, one cut for everyone and an even split.
- ``plan_epsl``: one cut, OFDMA subchannels and uplink powers minimising EPSL's round latency.
- ``OpenPlanner``: ASL/OPEN, online (Lyapunov) split points and server CPU shares under
  long-term per-device energy budgets.
"""

from flsplit.planners.edgesplit import plan_edgesplit
from flsplit.planners.epsl import plan_epsl
from flsplit.planners.fixed import best_fixed_cut, plan_fixed
from flsplit.planners.open import OpenPlanner
from flsplit.planners.plan import Plan

__all__ = ["Plan", "plan_edgesplit", "plan_epsl", "plan_fixed", "best_fixed_cut", "OpenPlanner"]
