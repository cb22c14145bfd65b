"""Argument checks: one family, a clear ValueError naming the argument.

Used at every checked edge: the scenario types, ``PlanningProblem``, the planners' options, the
wire's ``SplitConfig`` (``flsplit.wire.protocol``) and the app's run config; the kernels
(``flsplit.sim.kernels``) check nothing. Numbers (``int_arg``, ``real_arg``), cuts
(``cut_arg`` for one, ``cut_list`` per client, ``candidate_cut_list`` for a planner's choice)
and energy budgets (``budget_array``; a run-config or command-line text is read first by
``parse_budget``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

__all__ = ["BudgetArg", "budget_array", "candidate_cut_list", "column_arg", "cut_arg", "cut_list", "fraction_arg", "int_arg", "parse_budget",
           "real_arg", "sequence_arg"]

BudgetArg = Union[None, float, Sequence[Optional[float]]]


def int_arg(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (numpy integers and integral floats such as
    ``16.0`` accepted; booleans are not integers)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float, np.floating)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        span = (f">= {minimum}" if maximum is None else f"<= {maximum}" if minimum is None
                else f"in [{minimum}, {maximum}]")
        raise ValueError(f"{name} must be {span}, got {v}")
    return v


def real_arg(name: str, value, *, finite: bool = True, positive: bool = False, nonnegative: bool = False,
             low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
             high_open: bool = False) -> float:
    """``value`` as a float (finite unless ``finite=False``; optionally > 0 or >= 0, or within
    ``low`` .. ``high``, each bound closed unless ``low_open`` / ``high_open``)."""
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
    below = low is not None and (v <= low if low_open else v < low)
    above = high is not None and (v >= high if high_open else v > high)
    if below or above:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"{'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {span}, got {v:g}")
    return v


def column_arg(name: str, values, n: int, *, minimum: float = 0.0, positive: bool = False,
               integer: bool = False) -> np.ndarray:
    """One per-client column as a read-only float (or, with ``integer``, int64) array of ``n``
    entries, each finite and ``>= minimum`` (``> 0`` with ``positive``)."""
    try:
        arr = np.array(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {values!r}") from None
    if arr.shape != (n,):
        raise ValueError(f"{name} has {arr.size} entries for {n} clients")
    bad = ~np.isfinite(arr) | ((arr <= 0) if positive else (arr < minimum))
    if bad.any():
        i = int(np.argmax(bad))
        bound = "> 0" if positive else f">= {minimum:g}"
        raise ValueError(f"{name}[{i}] must be finite and {bound}, got {float(arr[i])!r}")
    if integer:
        if np.any(arr != np.floor(arr)):
            i = int(np.argmax(arr != np.floor(arr)))
            raise ValueError(f"{name}[{i}] must be an integer, got {float(arr[i])!r}")
        arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def fraction_arg(name: str, value) -> float:
    """``value`` as a float in ``[0, 1]`` (EPSL's aggregated fraction ``phi``)."""
    v = real_arg(name, value, finite=False)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def sequence_arg(name: str, value) -> list:
    """``value`` as a list: a sequence or an array, not a string."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence, got {value!r}")
    return list(value)


def cut_arg(name: str, k, num_blocks: int) -> int:
    """``k`` as a cut of a model of ``num_blocks`` blocks: an integer in ``1 .. num_blocks - 1``."""
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= num_blocks - 1:
        raise ValueError(f"{name} {k!r} is outside the model: valid cuts are 1..{num_blocks - 1}")
    return int(k)


def cut_list(cuts, n: int, num_blocks: int) -> list[int]:
    """Per-client cuts: ``n`` of them, each a cut of the model (``cut_arg``)."""
    cuts = list(cuts)
    if len(cuts) != n:
        raise ValueError(f"cuts has {len(cuts)} entries for {n} clients")
    return [cut_arg("cut", k, num_blocks) for k in cuts]


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
    run-config or command-line text is parsed first by ``parse_budget``.)
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


def parse_budget(value: Union[None, str, float, Sequence[float]]) -> Union[None, float, list[float]]:
    """An energy-budget setting: empty/None (the default), one number, or a comma list."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            return None
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"energy budget must be a number or a comma list of numbers, got {value!r}") from None
    elif isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"energy budgets must be finite and > 0 J, got {v}")
    return values[0] if len(values) == 1 else values
