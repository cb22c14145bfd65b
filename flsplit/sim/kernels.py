"""Physics kernels of the wireless edge model: vectorised, unchecked, numpy only.

These are the formulas of DESIGN.md 3.6 written once, element-wise on arrays, for the inner
loops of the pricing function and of the planners; the only place the Shannon rate is written
(``rate_bps``; ``rate_bps_scalar`` and ``rate_log2_bps`` are the same rate in the forms some
planners have always used, kept for bit-identical plans). They do **not** check their arguments
(like ``torch.optim``'s functional kernels under the checked optimizer classes): callers
validate once, at the edge (``flsplit.sim.pricing.price``, ``flsplit.planners.problem``), and
then call these as often as they like.

Units: Hz, W, W/Hz, bits or bytes (as named), FLOPs, seconds, joules.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LN2",
    "snr_per_hz",
    "rate_bps",
    "rate_bps_scalar",
    "rate_log2_bps",
    "transfer_s",
    "compute_s",
    "compute_energy_j",
]

LN2 = math.log(2.0)


def snr_per_hz(power_w, gain, noise_psd_w_per_hz):
    """``a = p g / N0``: the rate over ``B`` Hz is ``B log2(1 + a / B)``."""
    return np.asarray(power_w, dtype=float) * np.asarray(gain, dtype=float) / noise_psd_w_per_hz


def rate_bps(bandwidth_hz, a):
    """Shannon rate ``B log2(1 + a / B)`` in bit/s, element-wise; 0 where ``B = 0``.

    ``a`` is ``snr_per_hz(p, g, N0)``. Written with ``log1p`` so a small SNR keeps its digits.
    """
    b = np.asarray(bandwidth_hz, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = b * np.log1p(np.asarray(a, dtype=float) / b) / LN2
    return np.where(b > 0, r, 0.0)


def rate_bps_scalar(bandwidth_hz: float, a: float) -> float:
    """``rate_bps`` on Python floats (``math.log1p``), for the scalar inner loops of a planner.

    numpy's vectorised ``log1p`` and ``math.log1p`` may differ in the last bit; EdgeSplit's
    small-instance loop has always used ``math``, and its plans stay bit-identical.
    """
    if bandwidth_hz <= 0.0:
        return 0.0
    return bandwidth_hz * math.log1p(a / bandwidth_hz) / LN2


def rate_log2_bps(bandwidth_hz, snr):
    """Shannon rate ``B log2(1 + snr)`` with the SNR ``snr = p g / (B N0)`` already formed.

    The SFL-GA and EPSL planners' form (``log2(1 + x)`` differs from ``rate_bps``'s
    ``log1p(x) / ln 2`` in the last bit), kept so that their plans, and the CCC agent trained
    on them, stay bit-identical to the history. Floats (numpy scalars included) go through
    ``math.log2``, arrays through ``np.log2``, as those planners always computed them.
    """
    if isinstance(snr, float):
        return bandwidth_hz * math.log2(1.0 + snr)
    return bandwidth_hz * np.log2(1.0 + snr)


def transfer_s(num_bytes, rate):
    """Seconds to send ``num_bytes`` at ``rate`` bit/s: ``8 bytes / rate``; 0 for 0 bytes,
    ``inf`` for a positive payload at rate 0."""
    n = np.asarray(num_bytes, dtype=float)
    r = np.asarray(rate, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = n * 8.0 / r
    return np.where(n > 0, np.where(r > 0, t, np.inf), 0.0)


def compute_s(flops, cpu_hz, flops_per_cycle):
    """Seconds to execute ``flops`` at ``cpu_hz`` cycles/s and ``flops_per_cycle``."""
    return np.asarray(flops, dtype=float) / (np.asarray(cpu_hz, dtype=float) * np.asarray(flops_per_cycle, dtype=float))


def compute_energy_j(flops, cpu_hz, flops_per_cycle, kappa):
    """Joules of ``flops`` at clock ``cpu_hz``: ``kappa f^2 cycles`` (cycles = flops / c)."""
    f = np.asarray(cpu_hz, dtype=float)
    return np.asarray(kappa, dtype=float) * f * f * np.asarray(flops, dtype=float) / np.asarray(flops_per_cycle, dtype=float)
