"""The seam between a split strategy's round loop and a planner in the loop.

``SplitStrategy.start(..., planning=...)`` takes a ``RoundPlanning``; the strategy calls it
without handing itself over, and does not know who implements it (``Adaptive`` passes
itself, as Flower's DP wrappers hold their strategy: the wrapper knows the strategy, not the
other way round). Each round the loop asks it for the round's plan, then gives it the
round's history entry; a checkpoint carries its settings and state under ``planner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flsplit.runtime.exchange import RoundExchange
    from flsplit.planners.online import RoundPlan

__all__ = ["RoundPlanning"]


class RoundPlanning(Protocol):
    """What the round loop asks of a planner in the loop."""

    def plan_round(self, exchange: RoundExchange, nodes: list[int]) -> RoundPlan:
        """Cuts and allocation for the sampled ``nodes`` of ``exchange.server_round``. It may
        query the nodes over ``exchange.data_plane``, record a node that sits out with
        ``exchange.reject`` and record who a node is in ``exchange.devices``; the plan's
        ``nodes`` are those that train."""

    def observe_round(self, plan: RoundPlan, entry: dict) -> None:
        """The round's history entry (with ``plan`` already recorded): what was measured;
        the planner may add to ``entry["plan"]``."""

    def planner_config(self) -> dict:
        """The planner's settings a resumed run must share (checkpoint ``config["planner"]``)."""

    def planner_state(self) -> dict:
        """What the planner carries across rounds (checkpoint ``state["planner"]``)."""

    def restore_planner(self, state: dict) -> None:
        """Take back what ``planner_state`` returned."""
