"""Argument checks of the simulator and the planners: one family, a clear ValueError naming the argument.

Used at the checked edges (scenario types, ``PlanningProblem``, the planners' options); the
kernels (``flsplit.sim.kernels``) check nothing.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["int_arg", "real_arg", "cut_arg", "cut_list"]


def int_arg(name: str, value, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers and integral floats such as ``16.0`` accepted)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float, np.floating)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def real_arg(name: str, value, *, finite: bool = True, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a float (finite unless ``finite=False``; optionally > 0 or >= 0)."""
    # bool is an int subclass: ``cpu_hz = true`` in a file is a mistake, not 1 Hz.
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


def cut_arg(name: str, k, num_blocks: int) -> int:
    """``k`` as a cut of a model of ``num_blocks`` blocks: an integer in ``1 .. num_blocks - 1``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= num_blocks - 1:
        raise ValueError(f"{name} {k!r} is outside the model: valid cuts are 1..{num_blocks - 1}")
    return int(k)


def cut_list(cuts, n: int, num_blocks: int) -> list[int]:
    """Per-client cuts: ``n`` of them, each a cut of the model (``cut_arg``)."""
    cuts = list(cuts)
    if len(cuts) != n:
        raise ValueError(f"cuts has {len(cuts)} entries for {n} clients")
    return [cut_arg("cut", k, num_blocks) for k in cuts]
