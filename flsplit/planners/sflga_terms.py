"""SFL-GA allocation, part 1 of 3: the problem's check and the per-cut constants.

The round model is in ``flsplit.planners.sflga_allocation``'s module docstring; the solvers
are ``flsplit.planners.sflga_solvers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from flsplit.planners.problem import PlanningProblem
from flsplit.sim import kernels as kern
from flsplit.sim.checks import cut_arg

_LN2 = math.log(2.0)
_BISECT = 64  # root finders stop after 4 * _BISECT steps (bisection alone needs < 64 for 1e-14 in ln u)
_NEWTON = 3  # Newton polish steps after the Lambert-W estimate
_U_MAX = 600.0  # largest spectral efficiency tried, in nats (e^u stays finite)
_CAP = 2.0  # a client needing more than this many whole bands counts as this many


# --- the problem ------------------------------------------------------------------------------


def sflga_problem(problem: PlanningProblem, cuts: Sequence[int]) -> list[int]:
    """Check that the SFL-GA allocation can solve ``problem`` at ``cuts`` (candidates of it).

    The allocation needs a sample on every client (its uplink carries data); the problem has
    checked everything else once.
    """
    if not isinstance(problem, PlanningProblem):
        raise ValueError(f"problem must be a PlanningProblem, got {type(problem).__name__}")
    if min(problem.samples) < 1:
        raise ValueError(f"samples: every client needs at least 1 sample, got {list(problem.samples)}")
    num_blocks = len(problem.profile.blocks)
    out = []
    for k in cuts:
        k = cut_arg("cut", k, num_blocks)
        if k not in problem.candidate_cuts:
            raise ValueError(f"cut {k} is not a candidate cut of the problem {list(problem.candidate_cuts)}")
        out.append(k)
    return out


# --- per-cut constants -----------------------------------------------------------------------


@dataclass
class _CutTerms:
    """Everything of one cut that does not depend on the channel or the allocation."""

    cut: int
    client_flops: np.ndarray  # FLOPs per client (forward + backward)
    cycles: np.ndarray  # C_i
    tc_min: np.ndarray  # C_i / cpu_hz_i
    fmax: np.ndarray
    kappa: np.ndarray
    pmax: np.ndarray
    bits: np.ndarray  # D_i
    uplink_bytes: np.ndarray
    broadcast_bytes: float
    server_flops: float
    server_s: float
    budgets: Optional[np.ndarray]


def _cut_terms(problem: PlanningProblem, cut: int, budgets: Optional[np.ndarray]) -> _CutTerms:
    scenario, samples, bpe = problem.scenario, problem.samples, problem.bytes_per_element
    cp = problem.profile.cut(cut)
    if cp.smashed_elements <= 0:
        raise ValueError(f"cut {cut}: the smashed data has no elements")
    devices = [scenario.device(c) for c in problem.client_ids]
    s = np.array(samples, dtype=float)
    flops = s * (cp.client_forward_flops + cp.client_backward_flops)
    fpc = np.array([d.flops_per_cycle for d in devices])
    fmax = np.array([d.cpu_hz for d in devices])
    up_bytes = s * cp.smashed_elements * bpe
    server_flops = float(s.sum()) * (cp.server_forward_flops + cp.server_backward_flops)
    return _CutTerms(
        cut=cut,
        client_flops=flops,
        cycles=flops / fpc,
        tc_min=flops / (fpc * fmax),
        fmax=fmax,
        kappa=np.array([d.kappa for d in devices]),
        pmax=np.array([d.tx_power_w for d in devices]),
        bits=up_bytes * 8.0,
        uplink_bytes=up_bytes,
        broadcast_bytes=float(up_bytes.max()),
        server_flops=server_flops,
        server_s=server_flops / scenario.server.flops_per_s,
        budgets=budgets,
    )


def _broadcast_s(terms: _CutTerms, gains: np.ndarray, total: float, n0: float, server_power: float) -> float:
    rate = kern.rate_log2_bps(total, server_power * float(gains.min()) / (total * n0))
    if rate <= 0:
        raise ValueError("the broadcast has rate 0 (a zero channel gain)")
    return terms.broadcast_bytes * 8.0 / rate


class _Infeasible(ValueError):
    """An energy budget that no allocation can meet (names the client)."""
