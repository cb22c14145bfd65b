"""SFL-V2 (SplitFed v2): parallel clients, one shared server part updated batch by batch."""

from __future__ import annotations

from flwr.app import RecordDict

from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import PerNode
from flsplit.strategies.base import SplitStrategy

__all__ = ["SFLV2"]


class SFLV2(SplitStrategy):
    """SplitFed v2.

    Clients train in parallel on their side; the server keeps one server part and updates it
    once per client batch, in the order the batches arrive (``ServerPart.step_each``). Client
    parts are averaged at round end, weighted by samples.
    """

    scheme = "sflv2"
    schedule = PerNode

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return PerNode(lambda node: self.server).run(self.round, requests)
