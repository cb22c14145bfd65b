"""SL: vanilla (sequential, relay) split learning."""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import Relay
from flsplit.strategies.averaging import client_part_of
from flsplit.strategies.base import SplitStrategy

__all__ = ["SL"]


class SL(SplitStrategy):
    """Vanilla split learning.

    One client at a time trains through its data with the (single) server part; its client
    part is then handed on to the next client (relay, in sampled order). Nothing is averaged:
    after the round the global model is the last client's part plus the server part.
    """

    scheme = "sl"
    schedule = Relay

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return Relay(lambda node: self.server, self._hand_over, self._take_back).run(self.round, requests)

    def _hand_over(self, node_id: int, content: RecordDict) -> None:
        """The relay: this client starts from the blocks the previous client trained."""
        content[p.CLIENT_PART] = self.client_part_record(self.cuts[node_id])

    def _take_back(self, reply: Reply) -> None:
        self.model.blocks.load_state_dict(client_part_of(reply), strict=False)

    def aggregate_train(self, server_round, replies):
        """Nothing to average: the relay already left the last client's part in the model."""
        examples = sum(int(r.content.metric_records[p.METRICS]["num-examples"]) for r in replies)
        return ArrayRecord(self.model.blocks.state_dict()), MetricRecord({"num-examples": examples})
