"""EdgeSplit planner: a cut and a bandwidth share per device, minimising the round's makespan.

EdgeSplit (DESIGN.md 2, item 3) runs parallel split learning on heterogeneous devices: each
device gets its own cut depth and its own share of the band, chosen so that the slowest
device (the straggler) finishes as early as possible.

Latency model of one client (``flsplit.sim``, DESIGN.md 3.6), with cut ``k`` and
bandwidth ``B``::

    T_i(k, B) = compute_i(k) + D_up_i(k) / r_up_i(B) + D_down_i(k) / r_down_i(B)

* ``compute_i(k) = n_i (F^c_fwd(k) + F^c_bwd(k)) / device_flops_per_s
  + n_i (F^s_fwd(k) + F^s_bwd(k)) / server_flops_per_s``, with ``n_i`` the client's samples of
  the round. **The server serves the clients in parallel, each at its full speed** (one
  worker per client; the server is not divided among them).
* ``D_up_i(k) = D_down_i(k) = n_i * smashed_elements(k) * bytes_per_element * 8`` bits: the
  smashed data go up, their gradient (same shape) comes down, so the round moves
  ``2 n_i smashed_elements(k) bytes_per_element * 8`` bits in all.
* **Separate rates**, as in ``flsplit.sim.price``: ``r_up(B) = B log2(1 + p_i g_i / (B N0))``
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

Pure: numpy and plain Python floats, no torch import (the profile is only read). The arguments are
checked once by ``flsplit.planners.problem.PlanningProblem``; the reported latency and energy are
the one price of the plan (``flsplit.sim.price``, PSL traffic, ``ServerTiming.PER_CLIENT``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from flsplit.sim.checks import int_arg
from flsplit.planners.plan import Plan
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PlanInputs
from flsplit.sim import kernels as k
from flsplit.sim.pricing import ServerTiming

__all__ = ["plan_edgesplit", "edgesplit_rounds"]

_LN2 = math.log(2.0)
_MAX_BISECT = 300  # bisection steps (stops earlier when the interval stops shrinking)
_VECTORISE_FROM = 64  # clients: from here on the bandwidth bisections run as numpy arrays
_REL_IMPROVE = 1e-12  # a makespan or a client time must drop by this much to count as better


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
        ru, rd = k.rate_bps_scalar(bandwidth, self.a_up), k.rate_bps_scalar(bandwidth, self.a_down)
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


def _min_bandwidths(
    compute: np.ndarray, bits: np.ndarray, a_up: np.ndarray, a_down: np.ndarray, deadline: float, total: float
) -> np.ndarray:
    """``_Client.min_bandwidth`` of every client at once (numpy), by safeguarded Newton steps.

    ``comm(B) = D / r_up(B) + D / r_down(B)`` is convex and decreasing in ``B`` (``1 / r`` of a
    concave positive rate), so Newton's method on ``comm(B) - slack`` converges to the root
    from either side (from the right it lands left of the root, from the left it climbs
    monotonically); a step that leaves the bracket ``(lo, hi)`` is replaced by bisection. It
    meets the bisection's answer to rounding, in about ten steps instead of ~60.
    """
    n = compute.shape[0]
    slack = deadline - compute
    need = np.full(n, math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        comm_total = bits / k.rate_bps(total, a_up) + bits / k.rate_bps(total, a_down)
    comm_total = np.where(bits == 0.0, 0.0, comm_total)
    feasible = (slack >= 0.0) & (comm_total <= slack)
    need[feasible & (bits == 0.0)] = 0.0
    idx = np.flatnonzero(feasible & (bits > 0.0))
    if idx.size == 0:
        return need
    d, au, ad, sl = bits[idx], a_up[idx], a_down[idx], slack[idx]
    lo = np.zeros(idx.size)
    hi = np.full(idx.size, total)
    b = np.full(idx.size, total / n)
    active = np.ones(idx.size, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(_MAX_BISECT):
            xu, xd = au / b, ad / b
            lu, ld = np.log1p(xu), np.log1p(xd)  # for the slope; b > 0 inside the bracket
            ru, rd = k.rate_bps(b, au), k.rate_bps(b, ad)
            f = d / ru + d / rd - sl
            df = -d * (lu - xu / (1.0 + xu)) / (_LN2 * ru * ru) - d * (ld - xd / (1.0 + xd)) / (_LN2 * rd * rd)
            ok = f <= 0.0
            hi = np.where(active & ok, b, hi)
            lo = np.where(active & ~ok, b, lo)
            new = b - f / df
            new = np.where((new > lo) & (new < hi), new, 0.5 * (lo + hi))
            step = np.abs(new - b)
            active &= ~((step <= 4e-16 * b) | (hi - lo <= 4e-16 * hi) | (f == 0.0))
            b = np.where(active, new, b)
            if not active.any():
                break
    need[idx] = b
    return need


class _Terms:
    """The latency model's constants as arrays: ``compute``, ``bits`` ``(N, K)``; ``a_up``, ``a_down`` ``(N,)``."""

    def __init__(self, problem: PlanningProblem):
        s = problem.samples_array[:, None]
        self.compute = (
            s * problem.client_flops[None, :] / problem.device_flops_per_s[:, None]
            + s * problem.server_flops[None, :] / problem.server_flops_per_s
        )
        # Each way: the smashed data (or its gradient), plus the client part's weights when the
        # problem counts them (down at round start, back at round end).
        self.bits = (s * problem.smashed_elements[None, :] * problem.bytes_per_element + problem.weight_bytes[None, :]) * 8.0
        self.a_up = np.asarray(k.snr_per_hz(problem.tx_power_w, problem.gains, problem.noise_psd_w_per_hz))
        self.a_down = np.asarray(k.snr_per_hz(problem.server_tx_power_w, problem.gains, problem.noise_psd_w_per_hz))
        self.rows = np.arange(s.shape[0])
        self._clients: Optional[list[_Client]] = None

    @property
    def clients(self) -> list[_Client]:
        """Per-client objects of the small-instance (pure Python) path."""
        if self._clients is None:
            self._clients = [
                _Client(c, b, au, ad)
                for c, b, au, ad in zip(self.compute.tolist(), self.bits.tolist(), self.a_up.tolist(), self.a_down.tolist())
            ]
        return self._clients

    def times(self, bandwidth: np.ndarray) -> np.ndarray:
        """``T_i`` at every candidate cut, ``(N, K)``, for per-client bandwidths."""
        ru = k.rate_bps(bandwidth, self.a_up)[:, None]
        rd = k.rate_bps(bandwidth, self.a_down)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            comm = self.bits / ru + self.bits / rd
        comm = np.where((ru > 0) & (rd > 0), comm, math.inf)
        return self.compute + np.where(self.bits == 0.0, 0.0, comm)


def _allocate(terms: _Terms, cuts: list[int], total: float) -> tuple[float, list[float]]:
    """Step (a): equal-finish-time bandwidth split for fixed (candidate-index) cuts.

    Returns the makespan and the bandwidths (summing to ``total``).
    """
    n = len(cuts)
    if n <= _VECTORISE_FROM:  # numpy's per-call overhead outweighs a short Python loop
        clients = terms.clients

        def need(deadline: float) -> np.ndarray:
            return np.array([c.min_bandwidth(j, deadline, total) for c, j in zip(clients, cuts)])

        def time_at(bandwidths) -> float:
            return max(c.time(j, b) for c, j, b in zip(clients, cuts, bandwidths))
    else:
        sel = np.asarray(cuts)
        compute, bits = terms.compute[terms.rows, sel], terms.bits[terms.rows, sel]

        def need(deadline: float) -> np.ndarray:
            return _min_bandwidths(compute, bits, terms.a_up, terms.a_down, deadline, total)

        def time_at(bandwidths) -> float:
            return float(terms.times(np.broadcast_to(np.asarray(bandwidths, dtype=float), (n,)))[terms.rows, sel].max())

    # No client can beat its time over the whole band; the equal split is feasible.
    lo = time_at([total] * n)
    hi = time_at([total / n] * n)
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
    return time_at(bandwidth), bandwidth


def _best_cuts(terms: _Terms, bandwidth: list[float], current: Optional[list[int]]) -> list[int]:
    """Step (b): each client's fastest candidate cut at its bandwidth (keeps ties)."""
    times = terms.times(np.asarray(bandwidth, dtype=float))
    best = np.argmin(times, axis=1)  # the first of equal times, as min() over the cuts
    if current is not None:
        cur = np.asarray(current)
        keep = times[terms.rows, best] >= times[terms.rows, cur] * (1.0 - _REL_IMPROVE)
        best = np.where(keep, cur, best)
    return [int(j) for j in best]


def _alternate(terms: _Terms, problem: PlanningProblem,
               max_iter: int) -> tuple[float, list[int], list[float], list[float], bool, int]:
    """Alternate the bandwidth step (a) and the cut step (b) from each client's best cut at an
    equal split, until the makespan stops falling or the cuts stop changing.

    Returns the best ``(makespan, cut indices, bandwidths)``, the makespan of every pass,
    whether it converged, and the number of passes.
    """
    n, total = problem.num_clients, problem.total_bandwidth_hz
    cuts = _best_cuts(terms, [total / n] * n, None)
    best: Optional[tuple[float, list[int], list[float]]] = None
    history: list[float] = []
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        makespan, bandwidth = _allocate(terms, cuts, total)
        history.append(makespan)
        if best is not None and makespan >= best[0] * (1.0 - _REL_IMPROVE):
            converged = True
            break
        best = (makespan, cuts, bandwidth)
        new_cuts = _best_cuts(terms, bandwidth, cuts)
        if new_cuts == cuts:
            converged = True
            break
        cuts = new_cuts
    assert best is not None
    return (*best, history, converged, iterations)


def plan_edgesplit(problem: PlanningProblem, *, max_iter: int = 50) -> Plan:
    """Cut and bandwidth share per client minimising the round's makespan (EdgeSplit).

    Parameters
    ----------
    problem : PlanningProblem
        The round, checked once (``PlanningProblem.build(profile, scenario, samples=...,
        client_ids=..., server_round=..., bytes_per_element=..., candidate_cuts=...)``); the
        band ``scenario.channel.total_bandwidth_hz`` is shared.
    max_iter : int
        Maximum number of alternations (bandwidth step + cut step).

    Returns
    -------
    Plan
        ``method="edgesplit"``, ``scheme="psl"``, ``server_timing="per-client"``, ``cuts``
        (layer per client), ``bandwidth_hz`` (summing to the band), ``latency_s`` and
        ``energy_j`` (the one price, ``flsplit.sim.price``, of a PSL round with this plan and
        a full-speed server worker per client: equal to the makespan ``max_i T_i`` of the
        model above, to rounding) and ``details`` (``iterations``, ``converged``,
        ``makespan_history``, per-client ``client_latency_s``, ``compute_s``, ``uplink_s``,
        ``downlink_s``, ``energy_per_client_j``, ``client_ids`` and the model assumptions).

    Raises
    ------
    ValueError
        If ``problem`` is not a ``PlanningProblem`` or ``max_iter`` < 1 (the round's own
        arguments are checked by ``PlanningProblem.build``).

    Examples
    --------
    >>> plan = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=[32] * 8))  # doctest: +SKIP
    >>> plan.cuts, plan.bandwidth_hz, plan.latency_s  # doctest: +SKIP
    """
    max_iter = int_arg("max_iter", max_iter, minimum=1)
    if not isinstance(problem, PlanningProblem):
        raise ValueError(f"problem must be a PlanningProblem, got {type(problem).__name__}")

    cands = list(problem.candidate_cuts)
    makespan, cuts, bandwidth, history, converged, iterations = _alternate(_Terms(problem), problem, max_iter)
    plan = Plan(
        method="edgesplit",
        cuts=[cands[j] for j in cuts],
        latency_s=makespan,
        energy_j=0.0,
        bandwidth_hz=[float(b) for b in bandwidth],
    )
    # The reported numbers: the one price (PSL traffic, a full-speed server worker per client,
    # which is this planner's model exactly).
    cost = problem.price_plan(plan, scheme="psl", server_timing=ServerTiming.PER_CLIENT)
    clients = cost.clients
    details = {
        "iterations": iterations,
        "converged": converged,
        "makespan_history": history,
        "client_ids": list(problem.client_ids),
        "client_latency_s": [c.latency_s for c in clients],
        "compute_s": [c.compute_latency_s + c.server_latency_s for c in clients],
        "uplink_s": [c.uplink_latency_s for c in clients],
        "downlink_s": [c.downlink_latency_s for c in clients],
        "energy_per_client_j": [c.energy_j for c in clients],
        "candidate_cuts": cands,
        "model": "server parallel at full speed per client; up and down each carry "
        "samples*smashed_elements*bytes_per_element*8 bits; uplink at device power, "
        "downlink at server power over the same share",
    }
    if not math.isclose(makespan, cost.round_latency_s, rel_tol=1e-9):
        details["objective_latency_s"] = makespan
    return Plan(
        method="edgesplit",
        cuts=plan.cuts,
        latency_s=float(cost.round_latency_s),
        energy_j=float(cost.total_energy_j),
        bandwidth_hz=plan.bandwidth_hz,
        details=details,
        server_timing=ServerTiming.PER_CLIENT.value,
        scheme="psl",
    )


def edgesplit_rounds(inputs: PlanInputs):
    """``flsplit plan --method edgesplit``: each round planned on its own channel."""
    return lambda server_round: plan_edgesplit(inputs.problem(server_round))
