"""Layer-wise averaging of model parts (DESIGN.md 3.4).

Every trainer (a client part, a server copy, the shared server part) contributes the
tensors of the blocks it trained with a weight (its samples). Each tensor is averaged over
the contributions that hold it, so with heterogeneous cuts a block is averaged over everyone
who trained it; with equal cuts this is plain FedAvg of the client parts.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

__all__ = ["average_states", "block_of"]


def block_of(key: str) -> int:
    """Block index of a blocks state-dict key (``"3.weight"`` -> 3)."""
    return int(key.split(".", 1)[0])


def average_states(contributions: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """Weighted average, key by key, over the contributions that hold the key.

    Contributions with weight <= 0 are ignored. Integer tensors (e.g. batch norm's
    ``num_batches_tracked``) are averaged in float64 and rounded back. The average is on the
    CPU, whatever device a contribution is on.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    dtypes: dict[str, torch.dtype] = {}
    for state, weight in contributions:
        if weight <= 0:
            continue
        for key, value in state.items():
            dtypes.setdefault(key, value.dtype)
            term = value.detach().to("cpu", torch.float64) * weight  # server parts may be on a GPU
            sums[key] = sums[key] + term if key in sums else term
            weights[key] = weights.get(key, 0.0) + weight
    out = {}
    for key, total in sums.items():
        mean = total / weights[key]
        out[key] = (mean if dtypes[key].is_floating_point else mean.round()).to(dtypes[key])
    return out
