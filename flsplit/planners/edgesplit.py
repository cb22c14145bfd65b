"""EdgeSplit planner: a cut and a bandwidth share per device, minimising the round's makespan.

EdgeSplit (DESIGN.md 2, item 3) runs parallel split learning on heterogeneous devices: each
device gets its own cut depth and its own share of the band, chosen so that the slowest
device (the straggler) finishes as early as possible.

Latency model of one client (``flsplit.costmodel``, DESIGN.md 3.6), with cut ``k`` and
bandwidth ``B``::

    T_i(k, B) = compute_i(k) + D_up_i(k) / r_up_i(B) + D_down_i(k) / r_down_i(B)

* ``compute_i(k) = n_i (F^c_fwd(k) + F^c_bwd(k)) / device_flops_per_s
  + n_i (F^s_fwd(k) + F^s_bwd(k)) / server_flops_per_s``, with ``n_i`` the client's samples of
  the round. **The server serves the clients in parallel, each at its full speed** (one
  worker per client; the server is not divided among them).
* ``D_up_i(k) = D_down_i(k) = n_i * smashed_elements(k) * bytes_per_element * 8`` bits: the
  smashed data go up, their gradient (same shape) comes down, so the round moves
  ``2 n_i smashed_elements(k) bytes_per_element * 8`` bits in all.
* **Separate rates**, as in ``costmodel.round_cost``: ``r_up(B) = B log2(1 + p_i g_i / (B N0))``
  at the device's transmit power and ``r_down(B) = B log2(1 + P_s g_i / (B N0))`` at the
  server's, both over the client's share ``B`` of the band (reciprocal channel, gain
  ``g_i = Scenario.channel_gain(client_id, server_round)``).

Objective: ``min max_i T_i`` over cuts ``k_i`` (from the candidate cuts) and bandwidths
``B_i >= 0`` with ``sum_i B_i = W`` (``Channel.total_bandwidth_hz``; an OFDMA band is treated
as continuous).

Algorithm (alternating; each step is solved exactly up to floating-point bisection):

(a) *Cuts fixed -> bandwidth.* ``T_i`` is decreasing in ``B``, so the makespan is minimal when
    all clients finish together: find ``T`` by bisection such that ``sum_i B_i(T) = W``, where
    ``B_i(T)`` is the least bandwidth with ``T_i(k_i, B_i) <= T`` (an inner bisection; a client
    whose compute plus its transfers over the whole band exceed ``T`` cannot meet ``T``: the
    rate saturates at ``p g / (N0 ln 2)`` as ``B`` grows).
(b) *Bandwidth fixed -> cuts.* Each client takes ``argmin_k T_i(k, B_i)``.

The start is each client's best cut under an equal split of the band; the loop stops when
the makespan no longer improves or the cuts no longer change. A fixed point is globally
optimal: if some plan had makespan ``T* < T``, the bandwidths of both plans sum to ``W``, so
some client ``j`` would have ``B*_j <= B_j`` and hence ``T_j(k*_j, B_j) <= T* < T``, and step (b)
would have moved it.

Pure: numpy and plain Python floats, no torch import (the profile is only read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.costmodel import Scenario
from flsplit.planners.checks import candidate_cut_list, int_arg
from flsplit.planners.plan import Plan

if TYPE_CHECKING:  # the planner must not import torch
    from flsplit.profile import ModelProfile

__all__ = ["plan_edgesplit"]

_LN2 = math.log(2.0)
_MAX_BISECT = 300  # bisection steps (stops earlier when the interval stops shrinking)
_VECTORISE_FROM = 64  # clients: from here on the bandwidth bisections run as numpy arrays
_REL_IMPROVE = 1e-12  # a makespan or a client time must drop by this much to count as better


def _rate(bandwidth: float, snr_per_hz: float) -> float:
    """``B log2(1 + a / B)`` with ``a = p g / N0`` (0 at ``B = 0``)."""
    if bandwidth <= 0.0:
        return 0.0
    return bandwidth * math.log1p(snr_per_hz / bandwidth) / _LN2


class _Client:
    """Per-client constants of the latency model at every candidate cut."""

    def __init__(self, compute: list[float], bits: list[float], a_up: float, a_down: float):
        self.compute = compute  # seconds per candidate cut
        self.bits = bits  # bits each way per candidate cut
        self.a_up = a_up
        self.a_down = a_down

    def comm(self, j: int, bandwidth: float) -> float:
        """Uplink + downlink seconds at candidate cut ``j`` over ``bandwidth`` Hz."""
        d = self.bits[j]
        if d == 0.0:
            return 0.0
        ru, rd = _rate(bandwidth, self.a_up), _rate(bandwidth, self.a_down)
        if ru <= 0.0 or rd <= 0.0:
            return math.inf
        return d / ru + d / rd

    def time(self, j: int, bandwidth: float) -> float:
        """``T_i`` at candidate cut ``j`` with ``bandwidth`` Hz."""
        return self.compute[j] + self.comm(j, bandwidth)

    def min_bandwidth(self, j: int, deadline: float, total: float) -> float:
        """Least bandwidth in ``[0, total]`` with ``T_i <= deadline`` (``inf`` if none)."""
        slack = deadline - self.compute[j]
        if slack < 0.0 or self.comm(j, total) > slack:
            return math.inf
        if self.bits[j] == 0.0:
            return 0.0
        lo, hi = 0.0, total  # comm(lo) > slack >= comm(hi); comm is decreasing in B
        for _ in range(_MAX_BISECT):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if self.comm(j, mid) <= slack:
                hi = mid
            else:
                lo = mid
        return hi


def _min_bandwidths(clients: list[_Client], cuts: list[int], deadline: float, total: float) -> np.ndarray:
    """``_Client.min_bandwidth`` of every client at once (numpy; the same bisection per client)."""
    compute = np.array([c.compute[j] for c, j in zip(clients, cuts)])
    bits = np.array([c.bits[j] for c, j in zip(clients, cuts)])
    a_up = np.array([c.a_up for c in clients])
    a_down = np.array([c.a_down for c in clients])
    slack = deadline - compute

    def comm(bandwidth: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            ru = bandwidth * np.log1p(a_up / bandwidth) / _LN2
            rd = bandwidth * np.log1p(a_down / bandwidth) / _LN2
            out = bits / ru + bits / rd
        out = np.where((ru > 0) & (rd > 0), out, np.inf)
        return np.where(bits == 0.0, 0.0, out)

    need = np.full(len(clients), math.inf)
    feasible = (slack >= 0.0) & (comm(np.full(len(clients), total)) <= slack)
    need[feasible & (bits == 0.0)] = 0.0
    active = feasible & (bits > 0.0)
    lo = np.zeros(len(clients))
    hi = np.full(len(clients), total)
    for _ in range(_MAX_BISECT):
        mid = 0.5 * (lo + hi)
        active &= (mid > lo) & (mid < hi)  # a client stops when its interval stops shrinking
        if not active.any():
            break
        ok = comm(mid) <= slack
        hi = np.where(active & ok, mid, hi)
        lo = np.where(active & ~ok, mid, lo)
    fit = feasible & (bits > 0.0)
    need[fit] = hi[fit]
    return need


def _allocate(clients: list[_Client], cuts: list[int], total: float) -> tuple[float, list[float]]:
    """Step (a): equal-finish-time bandwidth split for fixed (candidate-index) cuts.

    Returns the makespan and the bandwidths (summing to ``total``).
    """
    n = len(clients)

    def need(deadline: float) -> np.ndarray:
        if n <= _VECTORISE_FROM:  # numpy's per-call overhead outweighs a short Python loop
            return np.array([c.min_bandwidth(j, deadline, total) for c, j in zip(clients, cuts)])
        return _min_bandwidths(clients, cuts, deadline, total)

    # No client can beat its time over the whole band; the equal split is feasible.
    lo = max(c.time(j, total) for c, j in zip(clients, cuts))
    hi = max(c.time(j, total / n) for c, j in zip(clients, cuts))
    if need(lo).sum() <= total:
        hi = lo
    else:
        for _ in range(_MAX_BISECT):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if need(mid).sum() <= total:
                hi = mid
            else:
                lo = mid
    bandwidth = need(hi)
    used = float(bandwidth.sum())
    if used > 0.0:
        # Hand out the bisection's leftover (tiny) in proportion: nobody gets slower.
        bandwidth = [float(b) * total / used for b in bandwidth]
    else:  # nothing to transfer: any split will do
        bandwidth = [total / n] * n
    makespan = max(c.time(j, b) for c, j, b in zip(clients, cuts, bandwidth))
    return makespan, bandwidth


def _best_cuts(clients: list[_Client], bandwidth: list[float], current: Optional[list[int]]) -> list[int]:
    """Step (b): each client's fastest candidate cut at its bandwidth (keeps ties)."""
    out = []
    for i, (c, b) in enumerate(zip(clients, bandwidth)):
        times = [c.time(j, b) for j in range(len(c.compute))]
        best = min(range(len(times)), key=times.__getitem__)
        if current is not None and times[best] >= times[current[i]] * (1.0 - _REL_IMPROVE):
            best = current[i]
        out.append(best)
    return out


def plan_edgesplit(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    server_round: int = 0,
    bytes_per_element: float = 4.0,
    candidate_cuts: Optional[Sequence[int]] = None,
    max_iter: int = 50,
) -> Plan:
    """Cut and bandwidth share per client minimising the round's makespan (EdgeSplit).

    Parameters
    ----------
    profile : ModelProfile
        Per-block FLOPs and sizes of the model (``flsplit.profile.profile_model``).
    scenario : Scenario
        Devices, server and channel; the band ``channel.total_bandwidth_hz`` is shared.
    samples : sequence of int
        Samples each client trains on in this round.
    client_ids : sequence of int, optional
        Client (partition) ids, selecting device profiles and keying the fading;
        default ``0 .. len(samples) - 1``.
    server_round : int
        Round number (keys the fading).
    bytes_per_element : float
        Wire size of one smashed element (4 for fp32).
    candidate_cuts : sequence of int, optional
        Cuts to choose from (each in ``1 .. L-1``); default all of them.
    max_iter : int
        Maximum number of alternations (bandwidth step + cut step).

    Returns
    -------
    Plan
        ``method="edgesplit"``, ``cuts`` (layer per client), ``bandwidth_hz`` (summing to the
        band), ``latency_s`` (the makespan ``max_i T_i``), ``energy_j`` (devices' compute
        energy ``kappa f^2 cycles`` plus ``tx_power * uplink time``) and ``details``
        (``iterations``, ``converged``, ``makespan_history``, per-client ``client_latency_s``,
        ``compute_s``, ``uplink_s``, ``downlink_s``, ``energy_j``, ``client_ids`` and the model
        assumptions).

    Raises
    ------
    ValueError
        On a non-positive bandwidth, empty or out-of-range candidate cuts, ``samples`` and
        ``client_ids`` of different lengths, or other malformed arguments.
    """
    samples = [int_arg(f"samples[{i}]", s, minimum=0) for i, s in enumerate(samples)]
    n = len(samples)
    if n == 0:
        raise ValueError("samples: at least one client is needed")
    ids = list(range(n)) if client_ids is None else list(client_ids)
    if len(ids) != n:
        raise ValueError(f"samples has {n} entries but client_ids has {len(ids)}")
    ids = [int_arg(f"client_ids[{i}]", c, minimum=0) for i, c in enumerate(ids)]
    if len(set(ids)) != n:
        raise ValueError(f"client_ids must be distinct, got {ids}")
    server_round = int_arg("server_round", server_round, minimum=0)
    max_iter = int_arg("max_iter", max_iter, minimum=1)
    if isinstance(bytes_per_element, bool) or not isinstance(bytes_per_element, (int, float)):
        raise ValueError(f"bytes_per_element must be a number, got {bytes_per_element!r}")
    if not (math.isfinite(bytes_per_element) and bytes_per_element > 0):
        raise ValueError(f"bytes_per_element must be > 0, got {bytes_per_element}")
    total = scenario.channel.total_bandwidth_hz
    if total is None or not math.isfinite(total) or total <= 0:
        raise ValueError(f"bandwidth: the channel's total bandwidth must be > 0 Hz, got {total}")

    cands = candidate_cut_list(len(profile.blocks), candidate_cuts)
    cut_profiles = [profile.cut(k) for k in cands]

    server = scenario.server
    n0 = scenario.channel.noise_psd_w_per_hz
    clients: list[_Client] = []
    devices = [scenario.device(c) for c in ids]
    gains = [scenario.channel_gain(c, server_round) for c in ids]
    for s, dev, g in zip(samples, devices, gains):
        compute = [
            s * (cp.client_forward_flops + cp.client_backward_flops) / dev.flops_per_s
            + s * (cp.server_forward_flops + cp.server_backward_flops) / server.flops_per_s
            for cp in cut_profiles
        ]
        bits = [s * cp.smashed_elements * bytes_per_element * 8.0 for cp in cut_profiles]
        clients.append(_Client(compute, bits, dev.tx_power_w * g / n0, server.tx_power_w * g / n0))

    # Start: each client's best cut with an equal split of the band.
    cuts = _best_cuts(clients, [total / n] * n, None)
    best: Optional[tuple[float, list[int], list[float]]] = None
    history: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        makespan, bandwidth = _allocate(clients, cuts, total)
        history.append(makespan)
        if best is not None and makespan >= best[0] * (1.0 - _REL_IMPROVE):
            converged = True
            break
        best = (makespan, cuts, bandwidth)
        new_cuts = _best_cuts(clients, bandwidth, cuts)
        if new_cuts == cuts:
            converged = True
            break
        cuts = new_cuts
    assert best is not None
    makespan, cuts, bandwidth = best

    latency, compute_s, up_s, down_s, energy = [], [], [], [], []
    for c, j, b, dev, s in zip(clients, cuts, bandwidth, devices, samples):
        d = c.bits[j]
        up = d / _rate(b, c.a_up) if d > 0 else 0.0
        down = d / _rate(b, c.a_down) if d > 0 else 0.0
        cp = cut_profiles[j]
        e = dev.compute_energy_j(s * (cp.client_forward_flops + cp.client_backward_flops)) + dev.tx_power_w * up
        compute_s.append(c.compute[j])
        up_s.append(up)
        down_s.append(down)
        latency.append(c.compute[j] + up + down)
        energy.append(e)

    return Plan(
        method="edgesplit",
        cuts=[cands[j] for j in cuts],
        latency_s=max(latency),
        energy_j=float(sum(energy)),
        bandwidth_hz=[float(b) for b in bandwidth],
        details={
            "iterations": iterations,
            "converged": converged,
            "makespan_history": history,
            "client_ids": ids,
            "client_latency_s": latency,
            "compute_s": compute_s,
            "uplink_s": up_s,
            "downlink_s": down_s,
            "energy_j": energy,
            "candidate_cuts": cands,
            "model": "server parallel at full speed per client; up and down each carry "
            "samples*smashed_elements*bytes_per_element*8 bits; uplink at device power, "
            "downlink at server power over the same share",
        },
    )
