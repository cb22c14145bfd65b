"""Argument checks shared by the planners: a clear ValueError that names the argument.

The number checks are the simulator's one family (``flsplit.sim.checks``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import numpy as np

from flsplit.sim.checks import cut_arg, cut_list, int_arg, real_arg

__all__ = ["budget_array", "candidate_cut_list", "cut_arg", "cut_list", "int_arg", "real_arg"]


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
        k = cut_arg("candidate_cuts: cut", k, num_blocks)
        if k not in cands:
            cands.append(k)
    return sorted(cands)


def budget_array(energy_budget_j, n: int, *, allow_unlimited: bool = False) -> Optional[np.ndarray]:
    """Per-client energy budgets in J, the one parser of the planners' ``energy_budget_j``.

    ``None`` (no budgets), one number for every client, or one number per client, each finite
    and > 0. With ``allow_unlimited`` an entry ``None`` or ``inf`` means no budget for that
    client (``inf`` in the array), and ``None`` is returned when no client has one. (A
    run-config or command-line text is parsed first by ``flsplit.planners.online.parse_budget``.)
    """
    if energy_budget_j is None:
        return None
    if isinstance(energy_budget_j, numbers.Real) and not isinstance(energy_budget_j, bool):
        values = [energy_budget_j] * n
    else:
        if isinstance(energy_budget_j, (str, bytes)) or not isinstance(energy_budget_j, (Sequence, np.ndarray)):
            raise ValueError(f"energy_budget_j must be a number or one number per client, got {energy_budget_j!r}")
        values = list(energy_budget_j)
        if len(values) != n:
            raise ValueError(f"energy_budget_j has {len(values)} entries for {n} clients")
    out = np.empty(n)
    for i, v in enumerate(values):
        if allow_unlimited and (v is None or (isinstance(v, numbers.Real) and float(v) == math.inf)):
            out[i] = math.inf
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or float(v) <= 0:
            none = " (or None / inf for none)" if allow_unlimited else ""
            raise ValueError(f"energy_budget_j[{i}] must be a finite number > 0 J{none}, got {v!r}")
        out[i] = float(v)
    if allow_unlimited and np.all(np.isinf(out)):
        return None
    return out
