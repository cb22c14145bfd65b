"""The one registry of planners, used by ``flwr run`` (``planner=...``) and ``flsplit plan --method``.

Each entry names a planner (a ``PlannerName``, a ``str`` enum), the scheme whose rounds it
plans and prices, and, for planners that can drive a training run, its online class in
``flsplit.planners.online``. ``planner_entry`` looks a name up with a helpful error.

Adding a planner: write its solver (``plan(problem) -> Plan``), add a ``PlannerName`` and an
entry here, and (to run it in training) an ``OnlinePlanner`` subclass named by ``online``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

__all__ = ["PlannerName", "PlannerEntry", "PLANNERS", "planner_entry"]


class PlannerName(str, Enum):
    """The planners' names, as run configs and the command line spell them."""

    EPSL = "epsl"
    EDGESPLIT = "edgesplit"
    ASL = "asl"
    CCC = "ccc"
    FIXED = "fixed"


@dataclass(frozen=True)
class PlannerEntry:
    """One planner: its name, the scheme it plans, its online class (``None``: offline only)."""

    name: PlannerName
    scheme: str
    online: Optional[str] = None  # class name in flsplit.planners.online
    summary: str = ""


PLANNERS: dict[str, PlannerEntry] = {
    e.name.value: e
    for e in (
        PlannerEntry(PlannerName.EPSL, "epsl", "EPSLOnline", "one cut, OFDMA subchannels and powers (BCD + cvxpy)"),
        PlannerEntry(PlannerName.EDGESPLIT, "psl", "EdgeSplitOnline", "a cut and a band share per client"),
        PlannerEntry(PlannerName.ASL, "psl", "OpenOnline", "OPEN: online cuts and server CPU shares (Lyapunov)"),
        PlannerEntry(PlannerName.CCC, "sflga", "CCCOnline", "SFL-GA's cut by a Double-DQN agent + convex allocation"),
        PlannerEntry(PlannerName.FIXED, "psl", None, "the baseline: one cut for all, resources split evenly"),
    )
}


def planner_entry(name: str, *, online: bool = False) -> PlannerEntry:
    """The entry of planner ``name`` (with ``online=True``: one that can drive a training run).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    entry = PLANNERS.get(str(name.value if isinstance(name, PlannerName) else name))
    if entry is None or (online and entry.online is None):
        known = sorted(n for n, e in PLANNERS.items() if e.online or not online)
        raise ValueError(f"unknown planner {name!r}; choose one of {known}" + (" (or 'none')" if online else ""))
    return entry
