"""Resource planners: pure functions (or small stateful objects) from a problem to a plan.

A plan holds a cut per client and the resource allocations, plus the round latency and
energy of its one price (``flsplit.sim.price`` of the scheme's predicted workload). Every
planner checks its arguments once, in a ``PlanningProblem``; ``flsplit.planners.online``
puts a planner in the loop of a training run.

- ``plan_edgesplit``: a cut and a bandwidth share per client, minimising the makespan.
- ``plan_fixed`` / ``best_fixed_cut``: the baseline, one cut for everyone and an even split.
- ``plan_epsl``: one cut, OFDMA subchannels and uplink powers minimising EPSL's round latency.
- ``CCCPlanner``: SFL-GA's cut chosen each round by a Double-DQN agent (``train_ccc_agent``),
  then a convex bandwidth / power / CPU-frequency allocation (``allocate_sflga``).
- ``OpenPlanner``: ASL/OPEN, online (Lyapunov) split points and server CPU shares under
  long-term per-device energy budgets.

``PLANNERS`` (``flsplit.planners.registry``) is the one table of planner names (``PlannerName``)
that ``flwr run`` and ``flsplit plan`` both read. The modules, one job each: ``problem`` and
``plan`` (the input and output; their checks are ``flsplit.sim.checks``), ``registry``, ``fixed``, ``edgesplit``, ``epsl``,
``epsl_steps``, ``open``, ``sflga_terms`` / ``sflga_solvers`` / ``sflga_allocation``, ``ccc_env`` /
``ccc_agent`` / ``ccc``, ``online``.
"""

from flsplit.planners.ccc import CCCAgent, CCCEnvironment, CCCPlanner, train_ccc_agent
from flsplit.planners.edgesplit import plan_edgesplit
from flsplit.planners.epsl import plan_epsl
from flsplit.planners.fixed import best_fixed_cut, plan_fixed
from flsplit.planners.open import OpenPlanner
from flsplit.planners.plan import Plan
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PLANNERS, PlannerName, planner_entry
from flsplit.planners.sflga_allocation import allocate_sflga

__all__ = [
    "Plan",
    "PlanningProblem",
    "PLANNERS",
    "PlannerName",
    "planner_entry",
    "plan_fixed",
    "best_fixed_cut",
    "plan_edgesplit",
    "plan_epsl",
    "OpenPlanner",
    "allocate_sflga",
    "CCCEnvironment",
    "CCCAgent",
    "CCCPlanner",
    "train_ccc_agent",
]
