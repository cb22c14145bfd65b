"""SFL-GA allocation, part 2 of 3: the solvers (exact, budgeted, cvxpy) and their evaluation.

Documented solvers: the model and the exact solution are in
``flsplit.planners.sflga_allocation``'s module docstring; the per-cut constants they take are
``flsplit.planners.sflga_terms._CutTerms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from scipy.special import lambertw

from flsplit.extras import require
from flsplit.sim import kernels as kern

from flsplit.planners.sflga_terms import (
    _BISECT,
    _broadcast_s,
    _CAP,
    _CutTerms,
    _Infeasible,
    _LN2,
    _NEWTON,
    _U_MAX,
)

# --- the exact solver ------------------------------------------------------------------------


def _bandwidth_for_rate(rate: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least ``B`` with ``B log2(1 + k / B) >= rate``, and ``dB/drate``.

    ``inf`` at or above the saturation rate ``k / ln2``; 0 for a zero rate. With the SNR
    ``y = k / B`` the condition is ``ln(1 + y) = c y``, ``c = rate ln2 / k`` in ``(0, 1)``; its
    positive root is ``y = -W_{-1}(-c e^{-c}) / c - 1`` (Lambert W, lower branch), polished by
    Newton steps on ``ln(1 + y) - c y`` (concave, decreasing at the root). The derivative is
    ``1 / r'(B)`` with ``r'(B) = (ln(1 + y) - y / (1 + y)) / ln2``.
    """
    out = np.full(rate.shape, math.inf)
    slope = np.full(rate.shape, math.inf)
    with np.errstate(all="ignore"):
        c = rate * _LN2 / k
        ok = (c < 1.0) & (c > 0.0)
        if ok.any():
            cc = c[ok] if not ok.all() else c
            y = -lambertw(-cc * np.exp(-cc), k=-1).real / cc - 1.0
            near = ~(y > 0) | (cc > 0.999)
            if near.any():  # low SNR: ln(1+y)/y = 1 - y/2 + y^2/3 - ... = c
                d = 1.0 - cc[near]
                y[near] = 2.0 * d + (8.0 / 3.0) * d * d
            for _ in range(_NEWTON):
                df = 1.0 / (1.0 + y) - cc
                y = np.maximum(y - np.where(df < 0, (np.log1p(y) - cc * y) / df, 0.0), 0.5 * y)
            kk = k[ok] if not ok.all() else k
            out[ok] = kk / y
            slope[ok] = _LN2 / (np.log1p(y) - y / (1.0 + y))
    zero = rate <= 0
    out[zero] = 0.0
    slope[zero] = 0.0
    return out, slope


def _phi(u: np.ndarray) -> np.ndarray:
    """``(e^u - 1) / u`` (1 at 0). Callers silence numpy's floating-point warnings."""
    return np.where(u > 1e-9, np.expm1(u) / u, 1.0 + 0.5 * u)


def _dphi(u: np.ndarray) -> np.ndarray:
    """Derivative of ``(e^u - 1) / u``: ``(u e^u - e^u + 1) / u^2`` (series near 0)."""
    exact = (u * np.exp(u) - np.expm1(u)) / (u * u)
    return np.where(u > 1e-3, exact, 0.5 + u / 3.0 + u * u / 8.0 + u**3 / 30.0)


def _ddphi(u: np.ndarray) -> np.ndarray:
    """Second derivative of ``(e^u - 1) / u``: ``(e^u (u^2 - 2u + 2) - 2) / u^3`` (series near 0)."""
    exact = (np.exp(u) * (u * u - 2.0 * u + 2.0) - 2.0) / u**3
    return np.where(u > 1e-2, exact, 1.0 / 3.0 + u / 4.0 + u * u / 10.0 + u**3 / 36.0 + u**4 / 168.0)


def _falling_root(fdf, a: np.ndarray, b: np.ndarray, x0: Optional[np.ndarray] = None) -> np.ndarray:
    """Per element, the root of a decreasing function on ``[a, b]`` (``f(a) > 0 >= f(b)``).

    Safeguarded Newton (``fdf`` returns the values and the derivatives, vectorised): a Newton
    step from the current point when it stays strictly inside the bracket, else bisection; a
    Newton step below the tolerance is stretched to twice the tolerance so that the root gets
    bracketed from both sides. An element stops when its bracket is below about 1e-14
    (relative). Returns the bracket's left end, where ``f > 0`` (the feasible side for the
    constraints solved here), or an exact root. ``x0`` is an optional first guess.
    """
    x = b.copy() if x0 is None else np.where((x0 > a) & (x0 < b), x0, b)
    fx, dfx = fdf(x)
    bad = ~np.isfinite(fx)
    if bad.any():
        x = np.where(bad, 0.5 * (a + b), x)
        fx, dfx = fdf(x)
    exact = np.zeros(x.shape, dtype=bool)
    for _ in range(4 * _BISECT):
        pos = fx > 0
        exact |= fx == 0
        a = np.where(pos | exact, x, a)
        b = np.where(pos, b, x)
        tol = 1e-14 * np.maximum(1.0, np.abs(a))
        done = exact | ((b - a) <= tol)
        if np.all(done):
            break
        newton = x - fx / np.where(dfx < 0, dfx, -1.0)
        has_step = np.isfinite(newton) & (dfx < 0)
        tiny = has_step & (np.abs(newton - x) <= tol)
        newton = np.where(tiny, x + np.where(pos, 2.0, -2.0) * tol, newton)
        step_ok = has_step & (newton > a) & (newton < b)
        x = np.where(done, x, np.where(step_ok, newton, 0.5 * (a + b)))
        fx, dfx = fdf(x)
    return a


class _Budgeted:
    """Per-client least bandwidth for a deadline under energy budgets (module docstring).

    All arrays are per client; ``subset`` gives the same problem for some of the clients (the
    root finders iterate only over the clients that still need it).
    """

    def __init__(self, terms: Optional[_CutTerms], gains: Optional[np.ndarray], total: float, n0: float):
        self.total = total
        self.last_s_p: Optional[np.ndarray] = None
        self.last_s_0: Optional[np.ndarray] = None
        if terms is None:  # filled by subset()
            return
        self.cut = terms.cut
        self.a = gains / n0  # SNR per W per Hz
        self.e0 = terms.bits * _LN2 / self.a  # Shannon-limit transmit energy
        self.budget = terms.budgets if terms.budgets is not None else np.full(len(gains), math.inf)
        self.s = np.sqrt(terms.kappa * terms.cycles**3)  # compute energy = s^2 / t_c^2
        self.free = self.s == 0  # no compute energy
        self.tc_min = terms.tc_min
        self.pmax = terms.pmax
        self.bits = terms.bits
        # s_f = ln u_f: below u_f the budget leaves room for the full clock (t_c = C / cpu_hz);
        # it solves E0 (e^u - 1)/u = E - kappa C cpu_hz^2 and does not depend on the deadline.
        with np.errstate(all="ignore"):
            x_f = (self.budget - terms.kappa * terms.cycles * terms.fmax**2) / self.e0
            self.s_f = np.full(len(gains), math.inf)
            self.s_f[x_f <= 1.0] = -math.inf
            mid = np.isfinite(x_f) & (x_f > 1.0)
            if mid.any():
                xf = x_f[mid]

                def excess(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                    u = np.exp(s)
                    return xf - _phi(u), -u * _dphi(u)

                # Bracket: phi(u) <= 1 + (e - 2) u < X on [0, 1] (convexity) below u = (X - 1) / 2,
                # and phi(u) > X at u = 2 ln(1 + X) + 5.
                lo = np.log(np.minimum(0.5 * (xf - 1.0), 0.5))
                hi = np.log(np.minimum(2.0 * np.log1p(xf) + 5.0, _U_MAX))
                self.s_f[mid] = _falling_root(excess, lo, hi)

    _FIELDS = ("a", "e0", "budget", "s", "free", "tc_min", "pmax", "bits", "s_f")

    def subset(self, mask: np.ndarray) -> "_Budgeted":
        sub = _Budgeted(None, None, self.total, 0.0)
        for name in self._FIELDS:
            setattr(sub, name, getattr(self, name)[mask])
        return sub

    def tc2(self, u: np.ndarray, force_binding=False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shortest compute time the budget leaves at efficiency ``u``, and its first and second
        derivatives in ``u`` (call with numpy's floating-point warnings silenced).

        The compute time is ``max(C / cpu_hz, s / sqrt(E - E0 phi(u)))``; ``force_binding`` (per
        element) takes the budget's branch of the derivatives where the full clock still fits
        (the right derivative at the kink ``u_f``).
        """
        room = self.budget - self.e0 * _phi(u)
        ok = room > 0
        safe_room = np.where(ok, room, 1.0)
        t_budget = np.where(ok, self.s / np.sqrt(safe_room), math.inf)
        t_budget = np.where(self.free & (room >= 0), 0.0, t_budget)
        tc = np.maximum(self.tc_min, t_budget)
        binding = ok & ((t_budget > self.tc_min) | force_binding)
        d1 = _dphi(u)
        c = 0.5 * self.s * self.e0
        dt = np.where(binding, c * d1 / safe_room**1.5, 0.0)
        ddt = np.where(binding, c * (_ddphi(u) / safe_room**1.5 + 1.5 * self.e0 * d1 * d1 / safe_room**2.5), 0.0)
        return tc, dt, ddt

    def need(self, deadline: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(least bandwidth, its derivative in the deadline, its efficiency u, its compute time)
        per client for ``deadline``."""
        with np.errstate(all="ignore"):
            return self._need(deadline)

    def _need(self, deadline: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # Below u_lo a client would need more than _CAP bands; above u_hi the power cap (or the
        # budget) fails: (e^u - 1) / u > X at u = 2 ln(1 + X) + 5.
        u_lo = 0.5 * self.bits * _LN2 / (_CAP * self.total * deadline)
        x_max = np.minimum(self.pmax * deadline, self.budget) / self.e0
        u_hi = np.minimum(_U_MAX, 2.0 * np.log1p(x_max) + 5.0)
        lo, hi = np.log(u_lo), np.log(np.maximum(u_hi, u_lo))

        def q_of(p: "_Budgeted"):
            def q(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                # Power slack pmax (T - t_c) - E_tx and its s-derivative (concave, decreasing).
                u = np.exp(s)
                tc, dt, _ = p.tc2(u)
                return p.pmax * (deadline - tc) - p.e0 * _phi(u), -u * (p.pmax * dt + p.e0 * _dphi(u))

            return q

        room_lo = q_of(self)(lo)[0] > 0
        s_p = _falling_root(q_of(self), lo, hi, self.last_s_p)  # largest log u with the power cap met
        self.last_s_p = s_p  # warm start for the next deadline (the outer search moves slowly)

        def psi_of(p: "_Budgeted"):
            def psi(s: np.ndarray, force_binding=False) -> tuple[np.ndarray, np.ndarray]:
                # -d log B / d s = 1 - u t_c' / (T - t_c) (decreasing) and its s-derivative.
                u = np.exp(s)
                tc, dt, ddt = p.tc2(u, force_binding)
                slack = deadline - tc
                value = 1.0 - u * dt / slack
                slope = -u * ((dt + u * ddt) * slack + u * dt * dt) / (slack * slack)
                return value, slope

            return psi

        # The optimum is the stationary point of log B if it lies below s_p, else s_p. Below the
        # kink s_f the compute time is constant (psi = 1 > 0): search only in [s_f, s_p].
        s_opt = s_p.copy()
        rising = (self.s_f < s_p) & (psi_of(self)(s_p)[0] < 0)
        if rising.any():
            sub = self.subset(rising)
            left = np.maximum(lo[rising], sub.s_f)
            psi = psi_of(sub)
            at_kink = psi(left, force_binding=sub.s_f >= left)[0] <= 0  # psi just right of s_f
            best = np.where(at_kink, left, s_p[rising])
            if (~at_kink).any():
                inner = ~at_kink
                guess = None if self.last_s_0 is None else self.last_s_0[rising][inner]
                best[inner] = _falling_root(psi_of(sub.subset(inner)), left[inner], s_p[rising][inner], guess)
            s_opt[rising] = best
        self.last_s_0 = s_opt  # warm start for the stationary points of the next deadline
        u = np.exp(s_opt)
        tc, dt, _ = self.tc2(u)
        slack = deadline - tc
        band = self.bits * _LN2 / (u * slack)
        band = np.where(room_lo & (slack > 0) & np.isfinite(band), band, math.inf)
        # dB/dT: at a stationary point or the kink only the explicit T in (T - t_c) moves
        # (envelope theorem); on the power cap u_p(T) moves too, by pmax / (pmax t_c' + E0 phi').
        d_log = -1.0 / slack
        capped = s_opt == s_p
        du = self.pmax / (self.pmax * dt + self.e0 * _dphi(u))
        d_log = np.where(capped, d_log + (-1.0 / u + dt / slack) * du, d_log)
        return band, band * d_log, u, tc


def _root_deadline(need, lo: float, hi: float, total: float, start: Optional[float] = None) -> float:
    """Least deadline in ``[lo, hi]`` whose needs fit the band (``need(hi)`` must fit).

    ``need(T)`` returns the per-client least bandwidths and their derivatives in ``T`` (``inf``
    where a client cannot meet ``T``). ``g(T) = ln(sum_i B_i(T) / W)`` is convex and decreasing
    where finite (a sum of log-convex functions is log-convex), so safeguarded Newton steps on
    it (bisection where a step would leave the bracket or ``g`` is infinite) converge fast; a
    step below the tolerance is stretched to close the bracket. Returns the bracket's right
    end (the needs fit there). ``start`` is the first point tried (default ``lo``; with another
    start, ``lo`` itself is taken not to fit).
    """

    def g(deadline: float) -> tuple[float, float]:
        band, slope = need(deadline)
        used = float(band.sum())
        if not (math.isfinite(used) and used > 0.0):
            return math.inf, math.nan
        return math.log(used / total), float(slope.sum()) / used

    if start is None:  # start at lo, which may already fit
        start = lo
        v, d = g(lo)
        if v <= 0.0 or hi <= lo:
            return lo if v <= 0.0 else hi
    else:
        v, d = g(start)
    t = start
    for _ in range(300):
        if v <= 0.0:
            hi = t
        else:
            lo = t
        tol = 1e-14 * hi
        if hi - lo <= tol:
            break
        step = -v / d if (d < 0.0 and math.isfinite(d) and math.isfinite(v)) else math.nan
        if math.isfinite(step) and abs(step) <= tol:
            step = 2.0 * tol if v > 0.0 else -2.0 * tol
        nxt = t + step if math.isfinite(step) else math.nan
        t = nxt if lo < nxt < hi else 0.5 * (lo + hi)
        v, d = g(t)
    return hi


@dataclass
class _Allocation:
    bandwidth: np.ndarray
    cpu_hz: np.ndarray
    power: np.ndarray
    deadline: float  # chain deadline without the broadcast


def _solve_fast(terms: _CutTerms, gains: np.ndarray, total: float, n0: float) -> _Allocation:
    """No budgets: f = cpu_hz, p = pmax, equal-finish bandwidth split (closed-form inner step).

    ``sum_i B_i(T)`` is convex and decreasing in ``T`` (``B_i`` is the convex increasing inverse of
    the concave rate, applied to the convex rate ``D_i / (T - t_i)``), so Newton's method from
    the lower bound (where the sum is >= W) rises monotonically to the root.
    """
    n = len(gains)
    k = terms.pmax * gains / n0

    def need(deadline: float) -> tuple[np.ndarray, np.ndarray]:
        slack = deadline - terms.tc_min
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(slack > 0, terms.bits / slack, math.inf)
        band, d_band = _bandwidth_for_rate(rate, k)
        with np.errstate(invalid="ignore"):
            return band, -d_band * rate / slack  # dB/dT = dB/drate * (-rate / slack)

    def chain(bandwidth: float) -> np.ndarray:
        return terms.tc_min + terms.bits / kern.rate_log2_bps(bandwidth, k / bandwidth)

    lo = float(chain(total).max())
    hi = max(lo, float(chain(total / n).max()))
    deadline = _root_deadline(need, lo, hi, total)
    band = _fill_band(need(deadline)[0], total)
    return _Allocation(band, terms.fmax.copy(), terms.pmax.copy(), deadline)


def _fill_band(band: np.ndarray, total: float) -> np.ndarray:
    used = float(band.sum())
    if not math.isfinite(used) or used <= 0:
        raise ValueError("no bandwidth split meets the deadline (numerical failure)")
    return band * (total / used)  # hands out the root finder's (tiny) leftover in proportion


def _solve_budgeted(terms: _CutTerms, gains: np.ndarray, total: float, n0: float,
                    ids: list[int]) -> _Allocation:
    """Energy budgets: exact decomposition (module docstring)."""
    n = len(gains)
    prob = _Budgeted(terms, gains, total, n0)
    short = ~(prob.budget > prob.e0)
    if short.any():
        i = int(np.flatnonzero(short)[0])
        raise _Infeasible(
            f"energy_budget_j[{i}] = {prob.budget[i]:.6g} J of client {ids[i]} is infeasible at cut {terms.cut}: "
            f"uploading its {terms.uplink_bytes[i]:.6g} bytes needs more than D*N0*ln2/g = {prob.e0[i]:.6g} J "
            "however slowly it transmits"
        )
    k = terms.pmax * gains / n0
    lo = float((terms.tc_min + terms.bits / kern.rate_log2_bps(total, k / total)).max())
    hi = float((terms.tc_min + terms.bits / kern.rate_log2_bps(total / n, k * n / total)).max())
    hi = max(hi, lo)

    memo: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def need(deadline: float) -> tuple[np.ndarray, np.ndarray]:
        if deadline not in memo:
            memo[deadline] = prob.need(deadline)[:2]
        return memo[deadline]

    for _ in range(400):
        if float(np.minimum(need(hi)[0], _CAP * total).sum()) <= total:
            break
        hi *= 2.0
    else:
        b = need(hi)[0]
        i = int(np.argmax(b))
        raise _Infeasible(
            f"energy_budget_j[{i}] = {prob.budget[i]:.6g} J of client {ids[i]} cannot be met at cut {terms.cut} "
            f"with any round latency up to {hi:.3g} s"
        )
    # The search starts at the (fitting) upper bracket: below lo no client fits anyway, and a
    # budget-bound client may not fit at lo either (infinite need: bisection steps).
    deadline = _root_deadline(need, lo, hi, total, start=hi)
    band, _, u, tc = prob.need(deadline)
    band = _fill_band(band, total)
    power = np.minimum(terms.pmax, band * np.expm1(u) / prob.a)
    with np.errstate(divide="ignore", invalid="ignore"):
        cpu = np.where(terms.cycles > 0, terms.cycles / tc, terms.fmax)
    cpu = np.minimum(terms.fmax, cpu)
    return _Allocation(band, cpu, power, deadline)


def _solve_cvxpy(terms: _CutTerms, gains: np.ndarray, total: float, n0: float, ids: list[int]) -> _Allocation:
    """Power at the device maximum; convex program in (B, f) with cvxpy (module docstring)."""
    cp = require("cvxpy", "planners", "allocate_sflga(solver='cvxpy')")

    n = len(gains)
    k = terms.pmax * gains / n0  # Hz
    # Normalised units: bandwidth / W, time / a feasible no-budget makespan, energy / budget.
    t0 = float((terms.tc_min + terms.bits / kern.rate_log2_bps(total / n, k * n / total)).max())
    b = cp.Variable(n, pos=True)
    f = cp.Variable(n, pos=True)  # f / cpu_hz
    t = cp.Variable()
    nats = -cp.rel_entr(b, b + k / total)  # = b ln(1 + (k/W) / b): rate * ln2 / W
    up = cp.multiply(terms.bits * _LN2 / (total * t0), cp.inv_pos(nats))
    comp = cp.multiply(terms.tc_min / t0, cp.inv_pos(f))
    cons = [comp + up <= t, cp.sum(b) <= 1.0, f <= 1.0]
    if terms.budgets is not None:
        for i in range(n):
            e = terms.budgets[i]
            if not math.isfinite(e):
                continue
            # The least transmit energy at full power needs the whole band.
            least = terms.pmax[i] * terms.bits[i] / kern.rate_log2_bps(total, k[i] / total)
            if least >= e:
                raise _Infeasible(
                    f"energy_budget_j[{i}] = {e:.6g} J of client {ids[i]} is infeasible at cut {terms.cut} "
                    f"with the power at its maximum (solver='cvxpy'): even the whole band needs {least:.6g} J"
                )
            ec = terms.kappa[i] * terms.cycles[i] * terms.fmax[i] ** 2 / e
            et = terms.pmax[i] * terms.bits[i] * _LN2 / (total * e)
            cons.append(ec * cp.square(f[i]) + et * cp.inv_pos(nats[i]) <= 1.0)
    problem = cp.Problem(cp.Minimize(t), cons)
    solver = "CLARABEL" if "CLARABEL" in cp.installed_solvers() else None
    try:
        problem.solve(solver=solver)
    except cp.error.SolverError as err:  # pragma: no cover - solver failure
        raise ValueError(f"solver='cvxpy': the solver failed: {err}") from err
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or b.value is None:
        raise _Infeasible(f"solver='cvxpy': the energy budgets are infeasible at cut {terms.cut} "
                          f"with the power at the device maximum (status {problem.status})")
    band = np.maximum(np.asarray(b.value, dtype=float), 1e-12)
    band = band / max(1.0, float(band.sum())) * total
    cpu = np.clip(np.asarray(f.value, dtype=float), 1e-9, 1.0) * terms.fmax
    return _Allocation(band, cpu, terms.pmax.copy(), float(t.value) * t0)


def _evaluate(terms: _CutTerms, alloc: _Allocation, gains: np.ndarray, total: float, n0: float,
              server_power: float) -> dict[str, Any]:
    """Per-client times and energies of an allocation (the cost model's arithmetic)."""
    rate = kern.rate_log2_bps(alloc.bandwidth, alloc.power * gains / (alloc.bandwidth * n0))
    up = terms.bits / rate
    compute = terms.cycles / alloc.cpu_hz
    bc = _broadcast_s(terms, gains, total, n0, server_power)
    chain = compute + up + bc
    e_comp = terms.kappa * alloc.cpu_hz**2 * terms.cycles
    e_tx = alloc.power * up
    return {
        "compute_s": compute,
        "uplink_s": up,
        "broadcast_s": bc,
        "chain_s": chain,
        "latency_s": float(chain.max()) + terms.server_s,
        "compute_energy_j": e_comp,
        "transmit_energy_j": e_tx,
        "energy_j": e_comp + e_tx,
        "uplink_rate_bps": rate,
    }


def _solve(terms: _CutTerms, gains: np.ndarray, total: float, n0: float, ids: list[int],
           solver: str = "exact") -> _Allocation:
    if solver == "cvxpy":
        return _solve_cvxpy(terms, gains, total, n0, ids)
    if terms.budgets is None:
        return _solve_fast(terms, gains, total, n0)
    return _solve_budgeted(terms, gains, total, n0, ids)
