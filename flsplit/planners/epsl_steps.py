"""The EPSL planner's steps: per-cut constants, the SNR caps of the budgets, the power program.

Documented solvers: the model, the subchannel step and the power step are in
``flsplit.planners.epsl``'s module docstring; ``plan_epsl`` there runs the block-coordinate
descent over these pieces.
"""

from __future__ import annotations

import heapq
import math
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.sim.workload import client_flops, server_flops
from flsplit.extras import require
from flsplit.planners.problem import PlanningProblem
from flsplit.sim import kernels as kern

if TYPE_CHECKING:  # the planner must not import torch
    from flsplit.model.profile import CutProfile

_LN2 = math.log(2.0)
_REL_IMPROVE = 1e-9  # the BCD stops when the latency drops by less than this (relative)
_ROOM_MARGIN = 1e-6  # a budget must exceed compute energy + E0 by this much (relative to E0): below it
# the SNR would be under ~2e-6, the uplink endless and float rounding would decide the budget
_BISECT_STEPS = 300  # bisection steps for the budget's SNR cap (stops when the bracket is tight)
_SOLVER_ORDER = ("CLARABEL", "ECOS", "SCS")  # exponential-cone solvers, best first


# --- argument checks -------------------------------------------------------------------------


# --- per-cut constants -----------------------------------------------------------------------


class _CutData:
    """Everything of one candidate cut that does not depend on subchannels or powers."""

    def __init__(
        self,
        cut: "CutProfile",
        *,
        samples: int,
        n_clients: int,
        phi: float,
        bpe: float,
        devices: PlanningProblem,
        server,
        gains: np.ndarray,
        n0: float,
        total_bandwidth: float,
        budgets: Optional[np.ndarray],
    ):
        self.k = cut.cut
        self.client_flops = client_flops(cut, samples)
        self.server_flops = server_flops(
            cut, n_clients * samples, backward_samples=(1.0 - phi) * n_clients * samples + phi * samples
        )
        smashed = samples * cut.smashed_elements * bpe
        weights = float(cut.client_param_bytes) if devices.include_weights else 0.0  # each way, once a round
        self.up_bytes = smashed + weights
        self.down_bytes = (1.0 - phi) * smashed + weights
        self.broadcast_bytes = phi * smashed
        self.bits = self.up_bytes * 8.0
        self.down_bits = self.down_bytes * 8.0
        self.compute_s = kern.compute_s(self.client_flops, devices.cpu_hz, devices.flops_per_cycle)
        self.compute_j = kern.compute_energy_j(self.client_flops, devices.cpu_hz, devices.flops_per_cycle, devices.kappa)
        self.server_s = server.compute_time_s(self.server_flops)
        if self.broadcast_bytes > 0:
            weakest = kern.rate_log2_bps(total_bandwidth, server.tx_power_w * float(gains.min()) / (total_bandwidth * n0))
            self.broadcast_s = self.broadcast_bytes * 8.0 / weakest
        else:
            self.broadcast_s = 0.0
        # Least transmit energy (p -> 0) and the room the budget leaves for transmitting.
        self.e0 = self.bits * n0 * _LN2 / gains
        self.room = None if budgets is None else budgets - self.compute_j
        if budgets is None:
            self.short = np.zeros(len(gains), dtype=bool)
        elif self.bits == 0:  # nothing to transmit: the compute energy alone must fit
            self.short = ~(self.room >= 0.0)
        else:
            self.short = ~(self.room > self.e0 * (1.0 + _ROOM_MARGIN))

    @property
    def feasible(self) -> bool:
        return not self.short.any()


def _snr_cap(rho: np.ndarray, x_hi: np.ndarray) -> np.ndarray:
    """Largest SNR ``x`` in ``(0, x_hi]`` with ``x / ln(1 + x) <= rho`` (``inf``: never binds).

    ``x / ln(1 + x)`` increases from 1 (at ``x -> 0``) to infinity, and ``rho > 1``. Bisection
    keeps the feasible end, so the returned SNR never overshoots the budget.
    """
    h = lambda x: x / np.log1p(x)  # noqa: E731
    out = np.full(rho.shape, math.inf)
    bind = h(x_hi) > rho
    if not bind.any():
        return out
    r, lo, hi = rho[bind], np.zeros(int(bind.sum())), x_hi[bind].copy()
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if np.all((mid <= lo) | (mid >= hi)):
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = (mid > 0) & (h(mid) <= r)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    out[bind] = lo
    return out


class _Problem:
    """Constants of the planning problem shared by all cuts."""

    def __init__(self, problem: PlanningProblem, budgets: Optional[np.ndarray]):
        channel = problem.scenario.channel
        self.ids = list(problem.client_ids)
        self.n = problem.num_clients
        self.devices = problem  # per-client device arrays
        self.server = problem.scenario.server
        self.gains = np.array(problem.gains)
        self.n0 = problem.noise_psd_w_per_hz
        self.w = float(channel.subchannel_bandwidth_hz)
        self.k_total = int(channel.num_subchannels)
        self.total_bandwidth = problem.total_bandwidth_hz
        self.pmax = np.array(problem.tx_power_w)
        self.budgets = budgets

    def snr_caps(self, cd: _CutData) -> np.ndarray:
        """Per-client SNR cap ``x*`` of the budget at this cut (``inf`` where it never binds)."""
        if self.budgets is None or cd.bits == 0:
            return np.full(self.n, math.inf)
        rho = cd.room / cd.e0
        # The SNR at full power is largest on one subchannel: above it the budget never binds.
        x_hi = self.pmax * self.gains / (self.w * self.n0)
        return _snr_cap(rho, x_hi)

    def powers(self, m: np.ndarray, x_cap: np.ndarray) -> np.ndarray:
        """Closed-form optimal powers ``min(pmax, x* B N0 / g)`` for subchannel counts ``m``."""
        with np.errstate(invalid="ignore"):
            capped = x_cap * (m * self.w) * self.n0 / self.gains
        return np.minimum(self.pmax, np.where(np.isfinite(x_cap), capped, math.inf))

    def chains(self, cd: _CutData, m: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
        """(compute, uplink, downlink incl. broadcast, chain) seconds per client."""
        b = m * self.w
        up = np.zeros(self.n) if cd.bits == 0 else cd.bits / kern.rate_log2_bps(b, p * self.gains / (b * self.n0))
        down = np.full(self.n, cd.broadcast_s)
        if cd.down_bits > 0:
            down = down + cd.down_bits / kern.rate_log2_bps(b, self.server.tx_power_w * self.gains / (b * self.n0))
        return cd.compute_s, up, down, cd.compute_s + up + down

    # -- subchannel step --

    def greedy_subchannels(self, cd: _CutData, x_cap: np.ndarray) -> np.ndarray:
        """One subchannel each, then each remaining one to the current bottleneck."""
        m = np.ones(self.n)
        *_, chain = self.chains(cd, m, self.powers(m, x_cap))
        spare = self.k_total - self.n
        if spare == 0 or (cd.bits == 0 and cd.down_bits == 0):
            return m.astype(int)
        heap = [(-float(t), i) for i, t in enumerate(chain)]
        heapq.heapify(heap)
        w, n0, ps = self.w, self.n0, self.server.tx_power_w
        for _ in range(spare):
            _, i = heapq.heappop(heap)
            m[i] += 1
            b, g = m[i] * w, self.gains[i]
            p = self.pmax[i] if not math.isfinite(x_cap[i]) else min(self.pmax[i], x_cap[i] * b * n0 / g)
            t = cd.compute_s[i] + cd.broadcast_s
            if cd.bits > 0:
                t += cd.bits / kern.rate_log2_bps(b, p * g / (b * n0))
            if cd.down_bits > 0:
                t += cd.down_bits / kern.rate_log2_bps(b, ps * g / (b * n0))
            heapq.heappush(heap, (-t, i))
        return m.astype(int)


# --- power step (convex program) -------------------------------------------------------------


class _PowerProgram:
    """The power step as one cvxpy program, built with its data as constants and solved once.

    It is solved once per plan, for the chosen cut and subchannels (the search itself uses the
    closed form it equals): compiled once with the data as constants, it costs about a tenth of
    a DPP-parametrised program's first compilation (0.15 s against 1.1 s for 1000 clients).
    """

    def __init__(self, n: int):
        cp = require("cvxpy", "planners", "EPSL planning with energy budgets (flsplit plan --method epsl "
                     "--energy-budget, or planner epsl with planner-energy-budget)")

        installed = set(cp.installed_solvers())
        self.solver = next((s for s in _SOLVER_ORDER if s in installed), None)
        if self.solver is None:
            raise RuntimeError(
                f"energy budgets need an exponential-cone solver for cvxpy ({', '.join(_SOLVER_ORDER)}); "
                f"installed: {sorted(installed)}"
            )
        self.cp = cp
        self.n = n
        self.problem = None
        self.z = self.t = None

    def solve(self, c: np.ndarray, u: np.ndarray, zmax: np.ndarray, w: np.ndarray) -> tuple[Optional[np.ndarray], str]:
        """Optimal ``z`` (``None`` if the solver failed) and the solver's status.

        ``c``: power-independent part of the chain / tau; ``u = D ln2 / (B tau)`` (uplink time
        ``u / z``); ``zmax = ln(1 + pmax g / (B N0))``; ``w = E0 / (budget - compute energy)``.
        """
        cp, n = self.cp, self.n
        self.z = cp.Variable(n, nonneg=True)  # ln(1 + SNR): the uplink's spectral efficiency in nats
        l = cp.Variable(n)  # per-client chain (normalised)
        self.t = cp.Variable()  # epigraph of the max
        chain = c + cp.multiply(u, cp.inv_pos(self.z))
        constraints = [chain <= l, l <= self.t, self.z <= zmax, cp.exp(self.z + np.log(w)) - w - self.z <= 0]
        self.problem = cp.Problem(cp.Minimize(self.t + cp.sum(l) / n), constraints)
        try:
            with warnings.catch_warnings():  # "may be inaccurate": the status says it, and we polish
                warnings.simplefilter("ignore", UserWarning)
                self.problem.solve(solver=self.solver, ignore_dpp=True)
        except self.cp.error.SolverError as exc:  # pragma: no cover - depends on the solver build
            return None, f"solver error: {exc}"
        status = str(self.problem.status)
        if status not in ("optimal", "optimal_inaccurate") or self.z.value is None:
            return None, status
        return np.asarray(self.z.value, dtype=float), status


def _power_step(
    prob: _Problem, cd: _CutData, m: np.ndarray, x_cap: np.ndarray, program: Optional[_PowerProgram]
) -> tuple[np.ndarray, dict]:
    """Powers for fixed subchannels and cut: the convex program, polished to its closed form."""
    p_closed = prob.powers(m, x_cap)
    if program is None or cd.bits == 0:
        return p_closed, {"status": "max power (no budget: latency decreases in power)"}
    b = m * prob.w
    _, up, down, chain = prob.chains(cd, m, p_closed)
    tau = float(chain.max())  # time scale: the program's t is about 1
    c = (cd.compute_s + down) / tau
    u = cd.bits * _LN2 / (b * tau)
    zmax = np.log1p(prob.pmax * prob.gains / (b * prob.n0))
    w = cd.e0 / cd.room
    z, status = program.solve(c, u, zmax, w)
    info: dict = {"status": status}
    if z is not None:
        p_solver = np.expm1(z) * b * prob.n0 / prob.gains
        info["solver_tx_power_w"] = p_solver
        info["solver_latency_s"] = float(program.t.value) * tau + cd.server_s
        info["max_rel_gap"] = float(np.max(np.abs(p_solver - p_closed) / p_closed))
    return p_closed, info


def _respect_budgets(cost_fn, powers: np.ndarray, budgets: Optional[np.ndarray]):
    """``price`` of the plan, shrinking powers by ulps if rounding put one over budget."""
    cost = cost_fn(powers)
    if budgets is None:
        return cost, powers
    for attempt in range(60):
        energy = np.array([c.energy_j for c in cost.clients])
        over = energy > budgets
        if not over.any():
            return cost, powers
        powers = np.where(over, powers * (1.0 - min(0.5, 1e-12 * 2.0**attempt)), powers)
        cost = cost_fn(powers)
    raise RuntimeError("could not bring the powers within the energy budgets")  # pragma: no cover
