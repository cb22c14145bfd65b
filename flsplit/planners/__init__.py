"""Resource planners: pure functions (or small stateful objects) from a problem to a plan.

A plan holds a cut per client and the resource allocations, plus the round latency and
energy the cost model predicts for it (``flsplit.costmodel``).
"""

from flsplit.planners.plan import Plan

__all__ = ["Plan"]
