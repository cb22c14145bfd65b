"""SFL-GA: split federated learning with cut-layer gradient aggregation and broadcast."""

from __future__ import annotations

from flwr.app import RecordDict

from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import Lockstep
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
    the round) but is the same for all clients within a round.
    """

    scheme = "sflga"
    u_shape_refusal = ("SFL-GA broadcasts the position-wise average of the cut-layer gradients; in a U-shaped split "
                       "those come back from the server part after the clients' tails, and that average is not built "
                       "yet (use psl)")
    schedule = Lockstep

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return Lockstep(self.server.step_gradient_average).run(self.round, requests)
