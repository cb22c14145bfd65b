"""SFL-GA: split federated learning with cut-layer gradient aggregation and broadcast."""

from __future__ import annotations

from flwr.app import RecordDict

from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import Lockstep
from flsplit.runtime.server import gradient_average
from flsplit.strategies.base import SplitStrategy

__all__ = ["SFLGA"]


class SFLGA(SplitStrategy):
    """SFL with gradient aggregation.

    Each step, every sampled client sends a batch; the server takes one step over their
    union (as PSL), computes every client's cut-layer gradient, averages them position by
    position weighted by batch share, and broadcasts the single aggregate
    (``ServerPart.step_gradient_average`` states the rule for unequal batch sizes). Each
    client back-propagates the aggregate through its own activations; client parts are
    averaged at round end. The cut may change between rounds (``cut_layer`` as a function of
    the round) but is the same for all clients within a round. U-shaped (``tail_cut``), the
    average is of the cut-layer gradients the server part returns after the clients' tails.
    """

    scheme = "sflga"
    schedule = Lockstep

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        # U-shaped: the same broadcast, of the cut-layer gradients the middle returns after the tails
        return Lockstep(self.server.step_gradient_average, server=self.server, combine=gradient_average).run(
            self.round, requests)
