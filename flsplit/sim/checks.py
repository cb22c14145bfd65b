"""Argument checks of the simulator and the planners: one family, a clear ValueError naming the argument.

Used at the checked edges (scenario types, ``PlanningProblem``, the planners' options); the
kernels (``flsplit.sim.kernels``) check nothing.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["int_arg", "real_arg"]


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
