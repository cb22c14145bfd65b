"""The one registry of planners, used by ``flwr run`` (``planner=...``) and ``flsplit plan --method``.

Each entry names a planner, the scheme whose rounds it plans and prices, what drives it:
``offline`` (``"module:function"``: ``rounds(inputs: PlanInputs) -> round -> Plan``, what
``flsplit plan`` runs) and, for planners that can drive a training run, ``online``
(``"module:Class"``, an ``flsplit.planners.online.OnlinePlanner``), and which of the command's
planner options (``PLAN_OPTIONS``) it reads. Both are found by name when used, as entry points
are, so this table imports no planner. ``planner_entry`` looks a name up with a helpful error.

Adding a planner: its module (the solver ``plan(problem) -> Plan``, its ``rounds`` driver and,
to run it in training, an ``OnlinePlanner`` subclass) and its entry here: two files.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

from flsplit.planners.problem import PlanningProblem

__all__ = ["PlannerName", "PlannerEntry", "PLANNERS", "PLAN_OPTIONS", "PlanInputs", "planner_entry", "register_planner"]


class PlannerName(str, Enum):
    """The built-in planners' names, as run configs and the command line spell them."""

    EPSL = "epsl"
    EDGESPLIT = "edgesplit"
    ASL = "asl"
    CCC = "ccc"
    FIXED = "fixed"


# The planner options of `flsplit plan`: a planner reads those its entry lists, the others are refused.
PLAN_OPTIONS = ("cut", "phi", "energy_budget_j", "V", "agent_path")


@dataclass(frozen=True)
class PlanInputs:
    """What an offline planner gets from ``flsplit plan``: the model's profile, the scenario,
    the clients' samples, the wire's bytes per element, the planner options (at their defaults:
    not given) and the baseline's plans (the best fixed cut's, one per round)."""

    profile: Any
    scenario: Any
    samples: list[int]
    bytes_per_element: float = 4.0
    cut: Optional[int] = None
    phi: float = 0.0
    energy_budget_j: Optional[list[float]] = None
    V: float = 0.01
    agent_path: Any = None
    baseline: list = field(default_factory=list)

    def problem(self, server_round: Optional[int] = None, **extra: Any) -> PlanningProblem:
        """The round's ``PlanningProblem`` (``None``: a problem for every round, as OPEN plans)."""
        rounds = {} if server_round is None else {"server_round": server_round}
        return PlanningProblem.build(self.profile, self.scenario, samples=self.samples,
                                     bytes_per_element=self.bytes_per_element, **rounds, **extra)


    def given(self) -> list[str]:
        """The planner options set to other than their defaults."""
        defaults = PlanInputs(None, None, [])
        return [o for o in PLAN_OPTIONS if getattr(self, o) != getattr(defaults, o)]


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class PlannerEntry:
    """One planner: its name, the scheme it plans, how ``flsplit plan`` and a training run
    drive it (``"module:attribute"``; ``online=None``: offline only), the options it reads."""

    name: str
    scheme: str
    offline: str
    online: Optional[str] = None
    options: tuple[str, ...] = ()
    summary: str = ""

    def rounds(self, inputs: PlanInputs) -> Callable[[int], Any]:
        """The offline planner over ``inputs``: a function from the round to its ``Plan``."""
        return _resolve(self.offline)(inputs)

    def online_class(self) -> type:
        """The ``OnlinePlanner`` subclass that drives a training run."""
        if self.online is None:
            raise ValueError(f"planner {self.name!r} plans offline only")
        return _resolve(self.online)


_P = "flsplit.planners."
PLANNERS: dict[str, PlannerEntry] = {
    e.name: e
    for e in (
        PlannerEntry(PlannerName.EPSL.value, "epsl", _P + "epsl:epsl_rounds", _P + "online:EPSLOnline",
                     ("phi", "energy_budget_j"), "one cut, OFDMA subchannels and powers (BCD + cvxpy)"),
        PlannerEntry(PlannerName.EDGESPLIT.value, "psl", _P + "edgesplit:edgesplit_rounds", _P + "online:EdgeSplitOnline",
                     (), "a cut and a band share per client"),
        PlannerEntry(PlannerName.ASL.value, "psl", _P + "open:open_rounds", _P + "online:OpenOnline",
                     ("energy_budget_j", "V"), "OPEN: online cuts and server CPU shares (Lyapunov)"),
        PlannerEntry(PlannerName.CCC.value, "sflga", _P + "ccc:ccc_rounds", _P + "online:CCCOnline",
                     ("energy_budget_j", "agent_path"), "SFL-GA's cut by a Double-DQN agent + convex allocation"),
        PlannerEntry(PlannerName.FIXED.value, "psl", _P + "fixed:fixed_rounds", None,
                     ("cut",), "the baseline: one cut for all, resources split evenly"),
    )
}


def register_planner(entry: PlannerEntry) -> PlannerEntry:
    """Add a planner from outside flsplit (a built-in one has its row above); a name is taken once."""
    if not isinstance(entry, PlannerEntry):
        raise ValueError(f"expected a PlannerEntry, got {type(entry).__name__}")
    unknown = set(entry.options) - set(PLAN_OPTIONS)
    if unknown:
        raise ValueError(f"planner {entry.name!r}: unknown options {sorted(unknown)}; the options are {list(PLAN_OPTIONS)}")
    if PLANNERS.setdefault(entry.name, entry) != entry:
        raise ValueError(f"planner {entry.name!r} is registered already")
    return entry


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
