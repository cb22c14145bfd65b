"""SFL-GA allocation, part 1 of 3: the argument checks and the per-cut constants.

The round model is in ``flsplit.planners.sflga_allocation``'s module docstring; the solvers
are ``flsplit.planners.sflga_solvers``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from flsplit.sim.scenario import Scenario
from flsplit.planners.problem import client_id_list, sample_list
from flsplit.sim.checks import cut_arg

if TYPE_CHECKING:
    from flsplit.profile import ModelProfile

_LN2 = math.log(2.0)
_BISECT = 64  # root finders stop after 4 * _BISECT steps (bisection alone needs < 64 for 1e-14 in ln u)
_NEWTON = 3  # Newton polish steps after the Lambert-W estimate
_U_MAX = 600.0  # largest spectral efficiency tried, in nats (e^u stays finite)
_CAP = 2.0  # a client needing more than this many whole bands counts as this many
BudgetArg = Union[None, float, Sequence[Optional[float]]]


# --- argument checks -------------------------------------------------------------------------


def _sequence(name: str, value) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a sequence, got {value!r}")
    return list(value)


def _samples_arg(samples, num_clients: Optional[int] = None) -> list[int]:
    """Samples per client: one positive int per client (an int is repeated ``num_clients`` times)."""
    if isinstance(samples, numbers.Integral) and not isinstance(samples, bool):
        if num_clients is None:
            raise ValueError("samples must be one positive integer per client")
        samples = [samples] * num_clients
    out = sample_list(samples, minimum=1)
    if num_clients is not None and len(out) != num_clients:
        raise ValueError(f"samples has {len(out)} entries for num_clients={num_clients}")
    return out


def _ids_arg(client_ids, n: int) -> list[int]:
    return client_id_list(client_ids, n)


def _cut_arg(name: str, k, num_blocks: int) -> int:
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    return cut_arg(name, k, num_blocks)


def _total_band(scenario: Scenario) -> float:
    total = scenario.channel.total_bandwidth_hz
    if total is None or not isinstance(total, numbers.Real) or not math.isfinite(total) or total <= 0:
        raise ValueError(f"bandwidth: the channel's total bandwidth must be > 0 Hz, got {total}")
    return float(total)


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


def _cut_terms(profile: "ModelProfile", scenario: Scenario, cut: int, samples: list[int], ids: list[int],
               bpe: float, budgets: Optional[np.ndarray]) -> _CutTerms:
    cp = profile.cut(cut)
    if cp.smashed_elements <= 0:
        raise ValueError(f"cut {cut}: the smashed data has no elements")
    devices = [scenario.device(c) for c in ids]
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
    rate = total * math.log2(1.0 + server_power * float(gains.min()) / (total * n0))
    if rate <= 0:
        raise ValueError("the broadcast has rate 0 (a zero channel gain)")
    return terms.broadcast_bytes * 8.0 / rate


class _Infeasible(ValueError):
    """An energy budget that no allocation can meet (names the client)."""
