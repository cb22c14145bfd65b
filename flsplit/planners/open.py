"""OPEN: online split-point and server-CPU planning under long-term energy budgets (ASL).

DESIGN.md 2 item 5. Each device ``i`` has a long-term average energy budget ``E_budget_i``
per round. A virtual energy-deficit queue per device,

    Q_i(t+1) = max(Q_i(t) + E_i(t) - E_budget_i, 0),

turns the long-term constraint into a per-round drift-plus-penalty problem (Lyapunov
optimisation): each round, with the round's channel state,

    minimise   V * latency + sum_i Q_i * E_i
    over       the cut k_i of every client and the server CPU shares s_i (sum s_i = 1, s_i > 0).

A larger ``V`` weighs latency more (lower latency, energy closer to or above budget over a
finite horizon); ``V = 0`` minimises the queue-weighted energy only.

Cost model (the terms of ``flsplit.sim``, DESIGN.md 3.6), for client ``i`` with ``n_i``
samples at cut ``k`` in round ``t``:

* device compute: ``F = n_i * (client forward + backward FLOPs of k)``, time
  ``t_d = F / (cpu_hz * flops_per_cycle)``, energy ``kappa * cpu_hz**2 * F / flops_per_cycle``;
* uplink of the smashed data: ``bits = n_i * smashed_elements(k) * bytes_per_element * 8``,
  rate ``r_i = B/N log2(1 + p g_i(t) / (B/N N0))`` (an equal share of the band among the
  ``N`` clients, gain ``g_i(t) = scenario.channel_gain(client_id, t)``), time
  ``t_u = bits / r_i``, energy ``tx_power_w * t_u``;
* server: ``w_i = n_i * (server forward + backward FLOPs of k) / server FLOP/s`` is the time
  with the whole server; with share ``s_i`` it takes ``w_i / s_i``.

The client finishes at ``a_i + w_i / s_i`` with ``a_i = t_d + t_u`` and the round latency is
``max_i (a_i + w_i / s_i)`` (clients in parallel). Device energy ``E_i = compute + transmit``
does not depend on the shares (downlink reception is not counted, as in the cost model).

Solution method:

* **Inner problem** (cuts fixed): ``min_s max_i (a_i + w_i / s_i)`` s.t. ``sum s_i = 1``.
  At the optimum every client with server work finishes at the same time ``T`` (KKT of the
  min-max problem), so ``s_i = w_i / (T - a_i)`` and ``T`` is the unique root of
  ``sum_i w_i / (T - a_i) = 1`` on ``T > max_i a_i``: the left side is strictly decreasing
  and convex there, so Newton's method from ``max_i (a_i + w_i)`` (where ``f >= 0``) climbs
  to it monotonically, to machine precision.
  Clients without server work (``w_i = 0``) finish at ``a_i``; if one of them is the slowest,
  the spare CPU is split evenly among all clients (every share stays > 0).
* **Outer problem** (cuts): full enumeration of the candidate cut combinations when there
  are at most ``max_enumeration`` of them (vectorised: all combinations are solved in one
  batched Newton solve), otherwise per-client coordinate descent (each client in turn takes its
  best cut with the others fixed, until no client changes; a local optimum). Only trials whose
  O(1) lower bound on the objective can beat the incumbent are solved (``OpenPlanner._descent``):
  the moves are those of the exhaustive sweep.

Checks and constants: ``flsplit.planners.problem.PlanningProblem`` (built once per planner;
``plan(r)`` takes round ``r``'s channel gains from it).

Reported numbers. ``Plan.latency_s`` stays OPEN's own makespan above (its objective, queues and
tests are written in it); the one price of the plan (``flsplit.sim.price`` of a PSL round with
each client's server work at its CPU share, ``ServerTiming.PER_CLIENT``), which adds the
gradients' downlink that this model leaves out, is ``details["priced_latency_s"]`` and
``details["priced_energy_j"]`` (the energies agree: reception is not counted).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional

import numpy as np

from flsplit.planners.plan import Plan
from flsplit.sim.checks import budget_array, int_arg, real_arg, sequence_arg
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PlanInputs
from flsplit.sim import kernels as kern
from flsplit.sim.pricing import ServerTiming

__all__ = ["OpenPlanner", "min_makespan_shares", "open_rounds"]

_NEWTON_STEPS = 200


def _min_makespan(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Batched optimal makespan ``min_s max_i (a_i + w_i / s_i)``, ``sum s = 1``.

    ``a`` and ``w`` have shape ``(..., n)``; returns ``T`` of shape ``(...)``.

    ``f(T) = sum_i w_i / (T - a_i) - 1`` is convex and decreasing on ``T > max a``, so Newton's
    method started left of the root (at ``max_i (a_i + w_i)``, where one term alone is 1, or at
    ``min_j a_j + sum_i w_i`` if later; ``f >= 0`` at both) climbs to the root monotonically, never overshooting, and converges
    quadratically near it: a few tens of steps instead of a bisection's ~55.
    """
    has_work = w > 0
    any_work = has_work.any(axis=-1)
    # Two points where f >= 0: one client alone needs the whole server until a_i + w_i, and at
    # min_j a_j + sum_i w_i every term is at least w_i / sum w. The later one is closer.
    t = np.where(has_work, a + w, -np.inf).max(axis=-1)
    t = np.maximum(t, np.where(has_work, a, np.inf).min(axis=-1) + w.sum(axis=-1))
    t = np.where(any_work, t, 0.0)
    # A client without server work contributes w / gap = 0: push its a far away so that the
    # loop needs no masks (gap stays > 0 for the others, as t >= a_i + w_i > a_i).
    a_eff = np.where(has_work, a, -1e300)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_NEWTON_STEPS):
            gap = t[..., None] - a_eff
            ratio = w / gap
            f = ratio.sum(axis=-1) - 1.0
            step = np.where(f > 0, f / (ratio / gap).sum(axis=-1), 0.0)
            t = t + step
            if (step <= 4e-16 * np.abs(t)).all():
                break
    t_work = np.where(any_work, t, -np.inf)
    return np.maximum(t_work, a.max(axis=-1))


def min_makespan_shares(a: Sequence[float], w: Sequence[float]) -> tuple[float, np.ndarray]:
    """Server CPU shares minimising the makespan ``max_i (a_i + w_i / s_i)``.

    Parameters
    ----------
    a : sequence of float
        Time at which each client's smashed data reaches the server (>= 0).
    w : sequence of float
        Server time of each client's work with the whole server (>= 0).

    Returns
    -------
    tuple of (float, numpy.ndarray)
        The optimal makespan ``T`` and the shares (each > 0, summing to 1). Clients with
        ``w_i > 0`` finish exactly at ``T`` when one of them is the slowest.
    """
    a_arr = np.asarray(a, dtype=float)
    w_arr = np.asarray(w, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != w_arr.shape or a_arr.size == 0:
        raise ValueError("a and w must be non-empty 1-D sequences of the same length")
    if np.any(~np.isfinite(a_arr)) or np.any(a_arr < 0) or np.any(~np.isfinite(w_arr)) or np.any(w_arr < 0):
        raise ValueError("a and w must be finite and >= 0")
    n = a_arr.size
    if not np.any(w_arr > 0):
        return float(a_arr.max()), np.full(n, 1.0 / n)
    t = float(_min_makespan(a_arr, w_arr))
    shares = np.zeros(n)
    work = w_arr > 0
    shares[work] = w_arr[work] / (t - a_arr[work])
    total = shares.sum()
    if total >= 1.0 - 1e-12:
        shares /= total  # root-finding residual only: finishing times stay equal to ~1e-15
    else:  # a client without server work is the slowest: spread the spare CPU evenly
        shares += (1.0 - total) / n
    return t, shares


class OpenPlanner:
    """Online Lyapunov planner of cuts and server CPU shares (OPEN / ASL).

    Parameters
    ----------
    problem : PlanningProblem
        The clients to plan, checked once (``PlanningProblem.build(profile, scenario,
        samples=..., client_ids=..., bytes_per_element=..., candidate_cuts=...)``); its
        ``server_round`` is ignored: ``plan`` takes the round, and fading is drawn per round
        from the scenario's seed.
    energy_budget_j : list of float
        Per client, the long-term average device energy allowed per round (J, > 0).
    V : float
        Lyapunov trade-off weight of the latency (>= 0).
    initial_queues : list of float, optional
        Initial energy-deficit queues (>= 0); default zeros.
    max_enumeration : int
        Enumerate all cut combinations up to this many; beyond, coordinate descent.

    Notes
    -----
    The model and the algorithm are in the module docstring. ``plan`` updates the queues
    with the planned energies; ``queues`` reads them.

    Examples
    --------
    >>> problem = PlanningProblem.build(profile, scenario, samples=[64] * 4)  # doctest: +SKIP
    >>> OpenPlanner(problem, energy_budget_j=[0.05] * 4, V=0.01).plan(server_round=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        problem: PlanningProblem,
        *,
        energy_budget_j: Sequence[float],
        V: float,
        initial_queues: Optional[Sequence[float]] = None,
        max_enumeration: int = 4096,
    ) -> None:
        if not isinstance(problem, PlanningProblem):
            raise ValueError(f"problem must be a PlanningProblem, got {type(problem).__name__}")
        n = problem.num_clients
        if energy_budget_j is None:
            raise ValueError("energy_budget_j: OPEN needs a long-term energy budget per device")
        self.energy_budget_j = budget_array(energy_budget_j, n)
        self.V = real_arg("V", V, nonnegative=True)
        self.max_enumeration = int_arg("max_enumeration", max_enumeration, minimum=1)
        if initial_queues is None:
            self._queues = np.zeros(n)
        else:
            q = sequence_arg("initial_queues", initial_queues)
            if len(q) != n:
                raise ValueError(f"initial_queues has {len(q)} entries for {n} clients")
            self._queues = np.array([real_arg(f"initial_queues[{i}]", v, nonnegative=True) for i, v in enumerate(q)])
        self.problem = problem
        self.profile = problem.profile
        self.scenario = problem.scenario
        self.client_ids = list(problem.client_ids)
        self.samples = list(problem.samples)
        self.bytes_per_element = problem.bytes_per_element
        self.candidate_cuts = list(problem.candidate_cuts)
        # Per-sample, per-cut quantities (rows: candidate cuts).
        self._client_flops = problem.client_flops
        self._server_flops = problem.server_flops
        self._smashed = problem.smashed_elements

    @property
    def num_clients(self) -> int:
        """Number of clients planned for."""
        return len(self.samples)

    @property
    def queues(self) -> np.ndarray:
        """Current energy-deficit queues ``Q_i`` (a copy)."""
        return self._queues.copy()

    def round_terms(self, server_round: int) -> dict[str, np.ndarray]:
        """Per-client, per-candidate-cut cost terms of a round (arrays of shape ``(N, K)``).

        Returns
        -------
        dict
            ``compute_s``, ``uplink_s``, ``ready_s`` (``a = compute + uplink``),
            ``server_s`` (``w``: server time with the whole server), ``energy_j``.
        """
        problem = self.problem.at_round(server_round)
        n = self.num_clients
        bandwidth = self.scenario.channel.client_bandwidths_hz(n)
        samples = problem.samples_array[:, None]
        flops = samples * self._client_flops[None, :]
        rate = kern.rate_bps(bandwidth, kern.snr_per_hz(problem.tx_power_w, problem.gains, problem.noise_psd_w_per_hz))
        if np.any(~(rate > 0)):
            cid = self.client_ids[int(np.argmax(~(rate > 0)))]
            raise ValueError(f"client {cid} has no uplink rate in round {server_round}")
        bits = (samples * self._smashed[None, :] * self.bytes_per_element + problem.weight_bytes[None, :]) * 8.0
        compute_s = flops / problem.device_flops_per_s[:, None]
        uplink_s = bits / rate[:, None]
        energy = (
            kern.compute_energy_j(flops, problem.cpu_hz[:, None], problem.flops_per_cycle[:, None], problem.kappa[:, None])
            + problem.tx_power_w[:, None] * uplink_s
        )
        server_s = samples * self._server_flops[None, :] / problem.server_flops_per_s
        return {
            "compute_s": compute_s,
            "uplink_s": uplink_s,
            "ready_s": compute_s + uplink_s,
            "server_s": server_s,
            "energy_j": energy,
        }

    def _objective(self, a: np.ndarray, w: np.ndarray, e: np.ndarray, choice: np.ndarray) -> np.ndarray:
        """Objective of cut-index combinations ``choice`` (shape ``(C, N)``)."""
        rows = np.arange(self.num_clients)[None, :]
        t = _min_makespan(a[rows, choice], w[rows, choice])
        return self.V * t + (self._queues[None, :] * e[rows, choice]).sum(axis=-1)

    def _descent(self, a: np.ndarray, w: np.ndarray, e: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-client coordinate descent: each client in turn takes its best cut, until none moves.

        Only trials that might improve are solved exactly. With every server load ``w > 0`` the
        makespan ``T`` of a trial (client ``i`` at cut ``j``) is the root of the convex,
        decreasing ``f(T) = sum_{l != i} w_l / (T - a_l) + w_ij / (T - a_ij) - 1``; the current
        root ``T0`` and ``F'(T0)`` give, in O(1) per trial, a lower bound on it (``T0`` if
        ``f(T0) >= 0``; else the Newton step from ``T0``, which lands left of the root; ``a_ij``
        if ``T0 <= a_ij``). A trial whose objective bound ``V T_lb + sum Q E`` cannot beat the
        incumbent by the acceptance margin is skipped: the accepted moves are those of the
        exhaustive sweep (which solved all ``K`` trials of every client).
        """
        n, k_ = a.shape
        rows = np.arange(n)
        q = self._queues
        best = float(self._objective(a, w, e, choice[None, :])[0])
        all_work = bool(np.all(w > 0))
        sweeps = 0
        improved = True

        def state(choice: np.ndarray) -> tuple:
            a_c, w_c, e_c = a[rows, choice], w[rows, choice], e[rows, choice]
            t0 = float(_min_makespan(a_c, w_c))
            slope = float((w_c / (t0 - a_c) ** 2).sum())
            return a_c, w_c, e_c, t0, slope, float(q @ e_c)

        current = state(choice) if all_work else None
        while improved and sweeps < 100:
            improved = False
            sweeps += 1
            for i in range(n):
                threshold = best * (1 - 1e-12) - 1e-300
                cand = np.arange(k_)
                if current is not None:
                    a_c, w_c, e_c, t0, slope, qe = current
                    ai, wi = a[i], w[i]
                    gap_cur = t0 - a_c[i]
                    with np.errstate(divide="ignore", invalid="ignore"):
                        gap = t0 - ai
                        f0 = wi / gap - w_c[i] / gap_cur
                        df = -slope + w_c[i] / gap_cur**2 - wi / gap**2
                        t_lb = np.where(gap <= 0, ai, np.where(f0 >= 0, t0, t0 - f0 / df))
                    bound = qe + q[i] * (e[i] - e_c[i])
                    if self.V > 0:
                        bound = bound + self.V * t_lb
                    cand = np.flatnonzero(~(bound * (1 - 1e-13) >= threshold))  # NaN bounds are kept
                    if cand.size == 0:
                        continue
                trial = np.repeat(choice[None, :], cand.size, axis=0)
                trial[:, i] = cand
                values = self._objective(a, w, e, trial)
                jj = int(np.argmin(values))
                j = int(cand[jj])
                if values[jj] < threshold and j != choice[i]:
                    choice, best, improved = trial[jj], float(values[jj]), True
                    if current is not None:
                        current = state(choice)
        return choice, sweeps

    def plan(self, server_round: int) -> Plan:
        """Plan one round and update the energy-deficit queues.

        Parameters
        ----------
        server_round : int
            Round number (keys the fading).

        Returns
        -------
        Plan
            ``method="asl"``, the cuts, the server CPU shares, the predicted round latency and
            total device energy; ``details`` holds the queues before and after, per-client
            energy, finishing times, the objective and the search used.
        """
        terms = self.round_terms(server_round)
        a, w, e = terms["ready_s"], terms["server_s"], terms["energy_j"]
        n, k = a.shape
        if k**n <= self.max_enumeration:
            search = "enumeration"
            combos = np.array(list(itertools.product(range(k), repeat=n)), dtype=int)
            values = self._objective(a, w, e, combos)
            choice = combos[int(np.argmin(values))]
            sweeps = 0
        else:
            search = "coordinate-descent"
            choice = np.argmin(e, axis=1) if self.V == 0 else np.argmin(a + w, axis=1)
            choice, sweeps = self._descent(a, w, e, choice)

        rows = np.arange(n)
        a_c, w_c, e_c = a[rows, choice], w[rows, choice], e[rows, choice]
        latency, shares = min_makespan_shares(a_c, w_c)
        with np.errstate(divide="ignore"):
            finish = a_c + np.where(w_c > 0, w_c / shares, 0.0)
        objective = self.V * latency + float(self._queues @ e_c)
        before = self._queues.copy()
        self._queues = np.maximum(before + e_c - self.energy_budget_j, 0.0)
        plan = Plan(
            method="asl",
            cuts=[self.candidate_cuts[j] for j in choice],
            latency_s=float(latency),
            energy_j=float(e_c.sum()),
            server_cpu_share=[float(s) for s in shares],
            details={
                "server_round": int(server_round),
                "client_ids": list(self.client_ids),
                "V": self.V,
                "objective": objective,
                "queues_before": before.tolist(),
                "queues_after": self._queues.tolist(),
                "energy_per_client_j": e_c.tolist(),
                "energy_budget_j": self.energy_budget_j.tolist(),
                "compute_s": terms["compute_s"][rows, choice].tolist(),
                "uplink_s": terms["uplink_s"][rows, choice].tolist(),
                "server_full_s": w_c.tolist(),
                "finish_s": finish.tolist(),
                "search": search,
                "sweeps": sweeps,
            },
        )
        # The one price of the plan (PSL traffic, each client's server work at its CPU share):
        # it adds the gradients' downlink, which OPEN's own model leaves out. The plan keeps
        # OPEN's own latency (its objective and the tests of it are written in it); the price
        # is in details["priced_latency_s"] / ["priced_energy_j"] (the energies agree).
        return self.problem.at_round(int(server_round)).with_price(
            plan, scheme="psl", server_timing=ServerTiming.PER_CLIENT, report=False
        )


def open_rounds(inputs: PlanInputs):
    """``flsplit plan --method asl``: OPEN over the rounds, online, under long-term budgets
    (``--energy-budget``; by default the fixed baseline's mean energy per device) and ``--V``."""
    budgets = inputs.energy_budget_j
    if budgets is None:
        n = len(inputs.samples)
        budgets = [sum(p.details["energy_per_client_j"][i] for p in inputs.baseline) / len(inputs.baseline)
                   for i in range(n)]
    return OpenPlanner(inputs.problem(), energy_budget_j=budgets, V=inputs.V).plan
