"""Argument checks shared by the planners: a clear ValueError that names the argument.

The number checks are the simulator's one family (``flsplit.sim.checks``).
"""

from __future__ import annotations

import numbers

from flsplit.sim.checks import int_arg, real_arg

__all__ = ["candidate_cut_list", "int_arg", "real_arg"]


def candidate_cut_list(num_blocks: int, candidate_cuts) -> list[int]:
    """The cuts a planner may choose, sorted and without repeats (default: all, ``1 .. L-1``)."""
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    if candidate_cuts is None:
        return list(range(1, num_blocks))
    raw = list(candidate_cuts)
    if not raw:
        raise ValueError("candidate_cuts is empty")
    cands: list[int] = []
    for k in raw:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_blocks - 1:
            raise ValueError(f"candidate_cuts: cut {k!r} is outside 1..{num_blocks - 1} (outside the model)")
        if int(k) not in cands:
            cands.append(int(k))
    return sorted(cands)
