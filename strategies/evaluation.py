"""Federated split evaluation after a round: the requests, and the pooling of the replies.

Clients send the smashed data of their evaluation sets; the server finishes the forward pass
with the global model. ``SplitStrategy.configure_evaluate`` / ``aggregate_evaluate`` (Flower's
API) call these with the round's exchange state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import Reply, innermost_error
from flsplit.runtime.exchange import RoundExchange
from flsplit.wire.gate import ReplyGate
from flsplit.runtime.server import evaluate_smashed
from flsplit.model.splitting import SplitModel

__all__ = ["evaluation_requests", "pool_evaluation"]


def evaluation_requests(server_round: int, cuts: dict[int, int], config: Callable[[int, int], ConfigRecord],
                        client_part: Callable[[int], ArrayRecord]) -> list[Message]:
    """One ``EVALUATE`` message a node: its ``SplitConfig`` and the global client part at its cut."""
    return [Message(RecordDict({p.CONFIG: config(server_round, cut), p.CLIENT_PART: client_part(cut)}), node_id,
                    p.EVALUATE, group_id=str(server_round)) for node_id, cut in cuts.items()]


def pool_evaluation(replies: Iterable[Message | Reply], exchange: RoundExchange, gate: ReplyGate,
                    model: SplitModel) -> Optional[MetricRecord]:
    """Finish the forward pass of each node's smashed evaluation data (at its cut in
    ``exchange.eval_cuts``); pool the metrics (``None`` if no sample came back).

    A failed reply (an error reply: the node's ``split_eval`` handler raised, or no reply in
    time) and a refused one are recorded in the round's ``errors`` with the reason; the
    replies pooled are counted in ``exchange.eval_finished``."""
    loss_sum, correct, n = 0.0, 0, 0
    exchange.eval_finished = 0
    for reply in replies:
        if isinstance(reply, Reply):
            node_id, error, content = reply.node_id, reply.error, reply.content
        else:  # a Flower Message (called through Flower's Strategy API)
            node_id = reply.metadata.src_node_id
            error = innermost_error(reply.error.reason or f"error code {reply.error.code}") if reply.has_error() else None
            content = reply.content if reply.has_content() else None
        if error is not None or content is None:
            exchange.reject(node_id, f"evaluation failed: {error or 'the reply has no content'}")
            continue
        cut = exchange.eval_cuts[node_id]
        try:
            batches = gate.evaluation(content, cut)
        except p.ProtocolError as err:
            exchange.reject(node_id, f"evaluation: {err}")
            continue
        ls, c, k = evaluate_smashed(model, cut, batches)
        loss_sum, correct, n = loss_sum + ls, correct + c, n + k
        exchange.eval_finished += 1
    if n == 0:
        return None
    return MetricRecord({"eval-loss": loss_sum / n, "eval-accuracy": correct / n, "num-examples": n})
