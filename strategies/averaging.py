"""The round's averaging: what each trainer contributes to the global model (``flsplit.runtime.aggregation``).

A client part counts with the samples its node reports; the shared server part's blocks
each count with the samples that went through them (a block past a node's cut trained on
that node's samples).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch
from flwr.app import Message

from flsplit.wire import protocol as p
from flsplit.runtime.aggregation import block_of
from flsplit.planes.dataplane import Reply
from flsplit.model.splitting import SplitModel

__all__ = ["Contribution", "client_contributions", "client_part_of", "shared_part_contributions"]

Contribution = tuple[dict[str, torch.Tensor], float]  # (tensors by blocks' key, weight)


def client_part_of(reply: Message | Reply) -> dict[str, torch.Tensor]:
    """A final reply's client part: as the reply gate decoded it when it let the reply through,
    else decoded here."""
    part = getattr(reply, "client_part", None)
    return part if part is not None else reply.content.array_records[p.CLIENT_PART].to_torch_state_dict()


def client_contributions(replies: Iterable[Message | Reply]) -> tuple[list[Contribution], int]:
    """Each final reply's client part, weighted by its samples; and the samples in all."""
    contributions, examples = [], 0
    for reply in replies:
        content = reply.content
        n = int(content.metric_records[p.METRICS]["num-examples"])
        contributions.append((client_part_of(reply), n))
        examples += n
    return contributions, examples


def shared_part_contributions(model: SplitModel, entry: int, per_cut_samples: dict[int, int],
                              end: int | None = None, keys: Collection[str] | None = None) -> list[Contribution]:
    """The blocks of a shared server part over ``model`` from block ``entry`` on (to ``end``, a
    U-shaped split's tail cut), each weighted by the samples that went through it
    (``per_cut_samples``: samples per cut); only ``keys`` where given (frozen weights are not
    averaged: an average of equal values need not round back to the value)."""
    full = model.blocks.state_dict()
    out = []
    for block in range(entry, end or model.num_blocks):
        weight = sum(n for cut, n in per_cut_samples.items() if cut <= block)
        state = {k: v for k, v in full.items() if block_of(k) == block and (keys is None or k in keys)}
        if state:
            out.append((state, weight))
    return out
