"""SFL-V1 (SplitFed v1): parallel clients, one server copy per client, both averaged."""

from __future__ import annotations

import copy

import torch
from flwr.app import RecordDict

from flsplit.runtime.aggregation import block_of
from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import PerNode
from flsplit.runtime.server import ServerPart, StepStats
from flsplit.strategies.base import SplitStrategy

__all__ = ["SFLV1"]


class SFLV1(SplitStrategy):
    """SplitFed v1.

    Clients train in parallel; the server keeps one copy of the server part per client (made
    from the global model at round start) and trains each on its client's batches only. At
    round end the client parts and the server copies are averaged (FedAvg, weighted by
    samples); a block is averaged over every copy that trained it.
    """

    scheme = "sflv1"
    schedule = PerNode

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.copies: dict[int, ServerPart] = {
            node_id: self.new_server_part(copy.deepcopy(self.model)) for node_id in requests
        }
        done = PerNode(lambda node: self.copies[node]).run(self.round, requests)
        self.finished = {reply.node_id for reply in done}
        return done

    def server_contributions(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """Each finished node's copy: its blocks from the node's cut on, weighted by the samples
        it trained on. The copy of a node dropped mid-round is left out with its client part."""
        out = []
        for node_id, part in self.copies.items():
            if node_id not in self.finished:
                continue
            cut = self.cuts[node_id]
            end = part.end or part.model.num_blocks  # a U-shaped split's tail is in the client part
            state = {k: v for k, v in part.model.blocks.state_dict().items()
                     if cut <= block_of(k) < end and k in self.exchanged}
            out.append((state, part.stats.samples))
        return out

    def train_stats(self) -> StepStats:
        return StepStats.merged(part.stats for part in self.copies.values())
