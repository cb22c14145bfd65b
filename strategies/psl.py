"""PSL: parallel split learning (one server part, one step over the union of the clients' batches)."""

from __future__ import annotations

from flwr.app import ArrayRecord, RecordDict

from flsplit.wire import protocol as p

from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import Lockstep
from flsplit.runtime.server import StepGrads
from flsplit.strategies.base import SplitStrategy

__all__ = ["PSL"]


class PSL(SplitStrategy):
    """Parallel split learning.

    Every step, all sampled clients send a batch; the server runs one forward/backward over
    their union with one loss (mean over all samples), updates its single server part once
    and returns each client the gradient of its own mean loss (``ServerPart.step_union``).
    Client parts are averaged at round end (weighted by samples). With ``sync_clients``
    false each client starts the next round from its own part instead of the average (the
    global client part is still the average, for evaluation and the saved model).
    Clients with fewer batches finish early and leave the remaining steps.

    Parameters
    ----------
    sync_clients : bool
        Average the client parts at round end and send the average next round.
    **kwargs
        See ``SplitStrategy``.
    """

    scheme = "psl"
    schedule = Lockstep

    def __init__(self, *args, sync_clients: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sync_clients = sync_clients
        self._own_parts: dict[int, tuple[int, ArrayRecord]] = {}

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "sync_clients": self.sync_clients}

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        if not self.sync_clients:  # where each client starts its next round
            state["own_parts"] = {str(n): {"cut": cut, "part": part} for n, (cut, part) in self._own_parts.items()}
        return state

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self._own_parts = {int(n): (int(v["cut"]), v["part"]) for n, v in state.get("own_parts", {}).items()}

    def start_part(self, node_id: int, cut: int) -> ArrayRecord:
        own = self._own_parts.get(node_id)
        if self.sync_clients or own is None or own[0] != cut:
            return self.client_part_record(cut)
        return own[1]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            node = reply.node_id
            self._own_parts[node] = (self.cuts[node], reply.content.array_records[p.CLIENT_PART])
        return super().aggregate_train(server_round, replies)

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return Lockstep(lambda batches: StepGrads(self.server.step_union(batches)), server=self.server).run(self.round,
                                                                                                       requests)
