"""Argument checks shared by the planners: a clear ValueError that names the argument."""

from __future__ import annotations

import math
import numbers

__all__ = ["candidate_cut_list", "int_arg", "real_arg"]


def int_arg(name: str, value, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers and integral floats accepted)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def real_arg(name: str, value, *, finite: bool = True, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a float (finite unless ``finite=False``; optionally > 0 or >= 0)."""
    # bool is an int subclass: True is a mistake here, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


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
