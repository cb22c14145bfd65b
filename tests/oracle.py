"""The tests' reference oracle: the old checked pricing front, kept only to check the product.

``round_cost`` (and ``shannon_rate_bps``, ``transfer_time_s``, ``broadcast_time_s``) were
the former ``flsplit.costmodel``'s public functions, and ``scheme_round_cost`` the former
``flsplit.planners.fixed``'s, with no product caller (``kernels.path_gain``, also
without one, was deleted); the product prices every round with ``flsplit.sim.price``. The tests
use them as an independent, argument-checked statement of DESIGN.md 3.6 (``round_cost``
still translates into one ``price`` call, so it checks the translation and the checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

from flsplit.sim import kernels
from flsplit.sim.checks import int_arg as _integer
from flsplit.sim.checks import real_arg as _number
from flsplit.sim.pricing import Allocation, RoundCost, ServerTiming, price
from flsplit.sim.scenario import Scenario, _check_length
from flsplit.sim.traffic import ElementWire, predict_workload
from flsplit.sim.workload import RoundWorkload

__all__ = ["round_cost", "scheme_round_cost", "shannon_rate_bps", "transfer_time_s", "broadcast_time_s", "TIMING_RULES"]

TIMING_RULES = ("parallel", "sequential")

ArrayLike = Union[float, Sequence[float], np.ndarray]


def shannon_rate_bps(
    bandwidth_hz: ArrayLike, tx_power_w: ArrayLike, gain: ArrayLike, noise_psd_w_per_hz: float
) -> ArrayLike:
    """Achievable rate ``B log2(1 + p g / (B N0))`` in bit/s (element-wise on arrays).

    A zero bandwidth gives a zero rate (the limit of the formula), so an unused share is
    harmless; negative inputs are errors.
    """
    b, p, g = (np.asarray(x, dtype=float) for x in (bandwidth_hz, tx_power_w, gain))
    if np.any(b < 0) or np.any(p < 0) or np.any(g < 0) or noise_psd_w_per_hz <= 0:
        raise ValueError("bandwidth, power and gain must be >= 0 and the noise PSD > 0")
    return kernels.rate_bps(b, kernels.snr_per_hz(p, g, noise_psd_w_per_hz))  # checked front, one kernel


def transfer_time_s(num_bytes: ArrayLike, rate_bps: ArrayLike) -> ArrayLike:
    """Time to send ``num_bytes`` at ``rate_bps``: ``bytes * 8 / rate`` (0 for 0 bytes).

    Sending a positive payload at rate 0 is infinite time: a ValueError, since it means the
    link has no bandwidth or no power.
    """
    n, r = np.asarray(num_bytes, dtype=float), np.asarray(rate_bps, dtype=float)
    if np.any(n < 0):
        raise ValueError(f"bytes must be >= 0, got {num_bytes}")
    if np.any((n > 0) & (r <= 0)):
        raise ValueError("a payload cannot be sent at rate 0 (no bandwidth or no power on the link)")
    return kernels.transfer_s(n, r)


def broadcast_time_s(num_bytes: float, rates_bps: ArrayLike) -> float:
    """Time to broadcast one payload to receivers with the given rates: limited by the weakest."""
    rates = np.atleast_1d(np.asarray(rates_bps, dtype=float))
    if num_bytes == 0:
        return 0.0
    if rates.size == 0:
        raise ValueError("a broadcast needs at least one receiver")
    return float(transfer_time_s(num_bytes, rates.min()))


def _per_client(name: str, values: Sequence[float], n: int) -> list[float]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} clients")
    return [_number(f"{name}[{i}]", v, nonnegative=True) for i, v in enumerate(values)]


def round_cost(
    scenario: Scenario,
    *,
    client_ids: Sequence[int],
    client_flops: Sequence[float],
    uplink_bytes: Sequence[float],
    downlink_bytes: Sequence[float],
    server_flops: float = 0.0,
    server_round: int = 0,
    timing: str = "parallel",
    broadcast_bytes: float = 0.0,
    broadcast_receivers: Optional[Sequence[int]] = None,
    bandwidth_shares: Optional[Sequence[float]] = None,
    subchannels: Optional[Sequence[int]] = None,
    tx_power_w: Optional[Sequence[float]] = None,
) -> RoundCost:
    """Simulated latency and energy of one round.

    Parameters
    ----------
    scenario : Scenario
        Devices, server and channel.
    client_ids : sequence of int
        The round's clients (partition ids: they select the device profile and key the fading).
    client_flops : sequence of float
        FLOPs each client executed (forward + backward; see ``client_flops``).
    uplink_bytes, downlink_bytes : sequence of float
        Bytes each client sent, and received by unicast.
    server_flops : float
        FLOPs the server executed in the round (see ``server_flops``).
    server_round : int
        Round number (keys the fading).
    timing : {"parallel", "sequential"}
        How the clients' chains combine into the round latency (see module docstring).
    broadcast_bytes : float
        A payload broadcast once to the receivers over the whole band (e.g. EPSL's or
        SFL-GA's aggregated gradient, summed over the round's broadcasts).
    broadcast_receivers : sequence of int, optional
        Positions in ``client_ids`` of the clients that receive the broadcast (default: all).
    bandwidth_shares : sequence of float, optional
        Fraction of the band per client (default: equal split; whole band when sequential).
    subchannels : sequence of int, optional
        OFDMA subchannels per client (instead of ``bandwidth_shares``).
    tx_power_w : sequence of float, optional
        Uplink transmit power per client (default: each device's ``tx_power_w``).

    Returns
    -------
    RoundCost
    """
    if timing not in TIMING_RULES:
        raise ValueError(f"timing must be one of {TIMING_RULES}, got {timing!r}")
    ids = [_integer(f"client_ids[{i}]", c, minimum=0) for i, c in enumerate(client_ids)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"client_ids must be distinct, got {ids}")
    n = len(ids)
    flops = _per_client("client_flops", client_flops, n)
    up_bytes = np.array(_per_client("uplink_bytes", uplink_bytes, n))
    down_bytes = np.array(_per_client("downlink_bytes", downlink_bytes, n))
    server_round = _integer("server_round", server_round, minimum=0)
    broadcast_bytes = _number("broadcast_bytes", broadcast_bytes, nonnegative=True)
    receivers = _broadcast_receivers(broadcast_receivers, n, broadcast_bytes)

    powers = None if tx_power_w is None else [
        _number(f"tx_power_w[{i}]", p, positive=True) for i, p in enumerate(tx_power_w)
    ]
    if powers is not None:
        _check_length("tx_power_w", np.array(powers), n)
    bandwidth = scenario.channel.client_bandwidths_hz(
        n, shares=bandwidth_shares, subchannels=subchannels, exclusive=timing == "sequential"
    )
    gets_broadcast = np.zeros(n, dtype=bool)
    gets_broadcast[receivers] = True
    # One price for every round (flsplit.sim.pricing): this front only checks and translates.
    work = RoundWorkload(
        client_ids=ids,
        cuts=np.ones(n),  # the cost model needs no cut: the FLOPs and bytes are given
        flops=flops,
        uplink_bytes=up_bytes,
        downlink_bytes=down_bytes,
        receives_broadcast=gets_broadcast,
        timing=timing,
        server_flops=_number("server_flops", server_flops, nonnegative=True),
        broadcast_bytes=broadcast_bytes if n else 0.0,
    )
    return price(
        work,
        scenario,
        Allocation(bandwidth_hz=tuple(bandwidth), tx_power_w=powers, cpu_hz=None),
        server_round=server_round,
    )


def _broadcast_receivers(receivers: Optional[Sequence[int]], n: int, broadcast_bytes: float) -> np.ndarray:
    """Positions of the broadcast's receivers as an index array (validated)."""
    if receivers is None:
        idx = list(range(n))
    else:
        idx = [_integer("broadcast_receivers", r, minimum=0) for r in receivers]
        if any(r >= n for r in idx):
            raise ValueError(f"broadcast_receivers are positions in client_ids (0..{n - 1}), got {idx}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"broadcast_receivers must be distinct, got {idx}")
    if broadcast_bytes > 0 and not idx:
        raise ValueError("broadcast_bytes > 0 needs at least one receiver")
    return np.array(idx, dtype=int)


def scheme_round_cost(
    profile,
    scenario: Scenario,
    *,
    cuts: Sequence[int],
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    server_round: int = 0,
    bytes_per_element: float = 4.0,
    scheme: str = "psl",
    phi: float = 0.0,
    bandwidth_shares: Optional[Sequence[float]] = None,
    subchannels: Optional[Sequence[int]] = None,
    tx_power_w: Optional[Sequence[float]] = None,
    server_timing: ServerTiming = ServerTiming.AFTER_CLIENTS,
) -> RoundCost:
    """The price of one round of ``scheme`` with these cuts and this allocation (the former
    ``flsplit.planners.fixed.scheme_round_cost``, with no product caller).

    ``predict_workload`` (the scheme's traffic model, ``ElementWire``) priced by ``price``;
    the allocation as ``Allocation`` holds it (default: an even split at maximum power).
    """
    ids = list(range(len(samples))) if client_ids is None else list(client_ids)
    work = predict_workload(
        scheme, profile, cuts=list(cuts), samples=list(samples), client_ids=ids, phi=phi,
        wire=ElementWire(profile, float(bytes_per_element)),
    )
    bandwidth = None
    if bandwidth_shares is not None or subchannels is None:
        bandwidth = scenario.channel.client_bandwidths_hz(len(ids), shares=bandwidth_shares, exclusive=scheme == "sl")
    allocation = Allocation(bandwidth_hz=bandwidth, subchannels=subchannels, tx_power_w=tx_power_w)
    return price(work, scenario, allocation, server_round=server_round, server_timing=server_timing)
