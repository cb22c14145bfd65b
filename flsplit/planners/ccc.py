"""CCC: SFL-GA's cut chosen every round by a Double-DQN agent, resources by a convex program.

SFL-GA (DESIGN.md 2, item 4) is split federated learning in which the server averages the
clients' cut-layer gradients (weighted by batch share) and *broadcasts* the single aggregate
(``strategies.sflga``). All clients share one cut per round. The CCC strategy re-chooses that
cut every round with a Double-DQN agent that sees the channel; for the chosen cut, bandwidth,
device CPU frequency (DVFS) and uplink power are allocated by convex optimisation. Smaller
client parts converge better under gradient aggregation but leak more about the raw data, so
a minimum client depth (``min_client_depth`` blocks on the device) is a privacy bound that the
agent can never violate.

Round model (``flsplit.costmodel``, DESIGN.md 3.6; exactly ``round_cost`` with
``bandwidth_shares=B/W``, ``tx_power_w=p``, ``broadcast_bytes`` and the devices' ``cpu_hz``
replaced by the chosen ``f``, i.e. ``planners.fixed.scheme_round_cost(scheme="sflga")``).
Client ``i`` with ``n_i`` samples at cut ``k``, bandwidth ``B_i``, CPU frequency ``f_i`` and
power ``p_i``, channel gain ``g_i`` (``Scenario.channel_gain``), noise PSD ``N0``::

    C_i     = n_i (F^c_fwd(k) + F^c_bwd(k)) / flops_per_cycle_i      (cycles)
    D_i     = 8 n_i s(k) bpe                                          (uplink bits, smashed data)
    chain_i = C_i / f_i  +  D_i / r_i  +  T_bc,    r_i = B_i log2(1 + p_i g_i / (B_i N0))
    T_bc    = 8 max_i(n_i) s(k) bpe / (W log2(1 + P_s min_i g_i / (W N0)))   (one broadcast)
    T_srv   = sum_i n_i (F^s_fwd(k) + F^s_bwd(k)) / server FLOP/s
    latency = max_i chain_i + T_srv
    E_i     = kappa_i f_i^2 C_i + p_i D_i / r_i                       (device energy)

``T_bc`` (whole band ``W``, server power, weakest receiver) and ``T_srv`` do not depend on the
allocation. The allocation problem for a cut is::

    minimise    T
    subject to  C_i / f_i + D_i / r_i(B_i, p_i) <= T          (epigraph of the max)
                sum_i B_i <= W,   0 < f_i <= cpu_hz_i,   0 < p_i <= tx_power_w_i
                kappa_i f_i^2 C_i + p_i D_i / r_i <= E_i      (optional energy budget)

An OFDMA band is treated as continuous (``W = num_subchannels * subchannel width``; the plan
gives ``bandwidth_hz``, not subchannel counts, and ``details["ofdma_relaxed"]`` says so).

**Solution (``solver="exact"``, the default).** The rate ``r(B, p)`` is jointly concave, but the
transmit energy ``p D / r(B, p)`` is not jointly convex (it depends on ``p / B`` only), so the
problem is not DCP in ``(B, f, p)``. It is solved exactly by decomposition instead:

* Per client the spectral efficiency in nats ``u = ln(1 + p g / (B N0))`` is the natural
  variable: the uplink time is ``D ln2 / (u B)``, the transmit energy
  ``E0 (e^u - 1) / u`` with ``E0 = D N0 ln2 / g`` (the Shannon-limit energy, approached as
  ``u -> 0``), independent of ``B``, and ``p = B (e^u - 1) N0 / g``. For a deadline ``T`` the
  least bandwidth client ``i`` needs is ``B_i(T) = min_u D ln2 / (u (T - t_c(u)))``: the whole
  deadline left after computing is spent transmitting, and
  ``t_c(u) = max(C / cpu_hz, sqrt(kappa C^3 / (E - E0 (e^u-1)/u)))`` is the shortest compute
  time the budget leaves (the fastest clock whose energy fits), subject to the power cap
  ``q(u) = pmax (T - t_c(u)) - E0 (e^u-1)/u >= 0``. With ``s = ln u``, ``(e^u - 1)/u`` is a sum
  of ``e^{ks}`` (convex in ``s``), so ``t_c`` is convex and ``q`` concave and decreasing in
  ``s``: the cap is ``s <= s_p(T)``, and ``log B = -s - log(T - t_c) + const`` is convex in ``s``.
  The minimiser is therefore ``min(s_p, s_0)`` with ``s_0`` the stationary point of ``log B``
  (only in ``[s_f, s_p]``: below the kink ``s_f``, where the budget starts to bind, ``t_c`` is
  constant and ``log B`` decreases; the kink itself is the answer when ``log B`` already rises
  just right of it). ``s_f`` does not depend on ``T``; ``s_p`` and ``s_0`` are found by
  safeguarded Newton steps (bisection where Newton would leave the bracket) to about 1e-14,
  keeping the feasible side, vectorised over clients.
* ``B_i(T)`` decreases in ``T`` and the optimal makespan is the least ``T`` with
  ``sum_i B_i(T) <= W``: any plan meeting ``T`` gives every client at least ``B_i(T)``, and
  ``B_i(T)`` meets it. ``ln B_i(T)`` is convex (``-ln(T - t_c(s)) - s`` is jointly convex in
  ``(T, s)`` and the power cap is jointly concave), so ``ln sum_i B_i(T)`` is convex and
  decreasing: safeguarded Newton steps on it (``dB_i/dT`` by the envelope theorem, plus the
  motion of the power cap where it binds), with bisection where a client cannot meet ``T``,
  find that ``T`` (the upper bracket by doubling from the equal split). At the optimum every
  client finishes exactly at ``T`` (equal finishing times) and the band is full (a leftover
  from the root finder is handed out in proportion, which only speeds clients up and lowers
  their transmit energy).
* **Without budgets** ``f_i = cpu_hz_i`` and ``p_i = tx_power_w_i`` are optimal (each client's
  time falls in both) and ``B_i(T)`` has a closed form: the rate ``D_i / (T - C_i/f_i)`` is
  inverted with the Lambert W function (``ln(1 + y) = c y`` for the SNR ``y``), polished by
  Newton steps; ``sum_i B_i(T)`` is convex and decreasing, so Newton's method on ``T`` from
  the lower bound (every client alone on the whole band) converges monotonically. This path
  is what the agent's simulator uses (about a millisecond per round for a few clients).

A budget ``E_i <= E0_i`` can never be met (even an infinitely slow upload needs more): a
ValueError names the client. Any larger budget is feasible (slowly enough).

**``solver="cvxpy"``** solves the convex program in ``(B, f)`` with the power fixed at the
device maximum (then ``D inv_pos(r(B))`` is convex, with ``r`` in the ``-rel_entr(B, B + a)``
form, and the budget ``kappa C f^2 + pmax D inv_pos(r(B)) <= E`` is convex) with CLARABEL in
normalised units (bandwidth / W, time / a no-budget bound, energy / budget). It is exact
without budgets and a feasible upper bound with them (lowering the power can only help); it
is kept as the DCP cross-check of the exact solver.

**Simulator (``CCCEnvironment``).** An episode is ``num_rounds`` rounds; round ``t``
(0-based) of episode ``e`` draws its fading at round key ``e * num_rounds + t`` (the
scenario's seeded Rayleigh draws, so episodes see different channels, episode 0 sees the
channels of rounds ``0 .. num_rounds - 1``, and everything is reproducible). State
(``N + 2`` numbers)::

    z_i  = (ln g_i - mu) / sigma       normalised log channel gains, mu = mean_i ln(path-loss gain_i)
                                       - euler_gamma (the mean of ln g), sigma = pi / sqrt(6)
                                       (the std of ln |h|^2 under Rayleigh fading)
    tau  = t / num_rounds              round progress in [0, 1)
    l    = loss / initial loss         the recent (proxy) training loss, normalised

Action: an index into the candidate cuts; cuts below ``min_client_depth`` are masked (the
agent never picks them, and the simulator refuses them). Convergence proxy (SFL-GA: the
broadcast aggregate is exact for the server part but a compromise for every client part, so
the more of the model the clients hold, the slower it converges)::

    loss_{t+1} = loss_t * (1 - eta * (1 - rho * q(k))),    q(k) = client param bytes / all param bytes

(``q`` falls back to ``k / L`` for a parameter-free model; defaults ``eta = 0.1``,
``rho = 0.5``). Reward (the negated cost of the round; the return is minus the sum over the
episode, i.e. latency plus the area under the loss curve)::

    reward = -(w_lat * latency(k) / latency_ref + w_conv * loss_{t+1} / loss_0)

with ``latency_ref`` the least round latency over the allowed cuts under the mean channel
(no fading). A cut whose allocation is infeasible in a round (an energy budget below the
Shannon-limit energy) costs ``w_lat * infeasible_penalty`` and trains nothing.

**Agent (``CCCAgent``).** Double DQN (van Hasselt et al. 2016): an MLP Q-network over the
state, a target network copied every ``target_sync`` updates, a replay buffer, epsilon-greedy
exploration with linear decay, the Huber loss and the target
``y = r + gamma (1 - done) Q_target(s', argmax_{a allowed} Q_online(s', a))``. Weights are
initialised from a local ``torch.Generator`` and exploration / replay draw from a local numpy
generator, so training is deterministic on the CPU for a seed and leaves torch's and numpy's
global random states alone. ``save`` / ``load`` keep the weights and the configuration
(candidate cuts, mask, state layout and normalisation, number of clients).

**Planner (``CCCPlanner``).** Builds the state for the round (``tau`` from the round number,
capped at ``(num_rounds - 1) / num_rounds``; ``l`` from the reported loss divided by the first
reported one, or else the simulator's loss model applied to the cuts it chose), takes the
greedy allowed action (falling back to the next best allowed cut if the chosen one is
infeasible in that round) and allocates with ``allocate_sflga``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from scipy.special import lambertw

from flsplit.costmodel import Scenario
from flsplit.planners.plan import Plan

if TYPE_CHECKING:
    from flsplit.profile import ModelProfile

__all__ = [
    "allocate_sflga",
    "CCCEnvironment",
    "CCCAgent",
    "CCCPlanner",
    "train_ccc_agent",
]

_LN2 = math.log(2.0)
_EULER_GAMMA = 0.5772156649015329
_FADING_STD = math.pi / math.sqrt(6.0)  # std of ln X, X ~ Exp(1)
_BISECT = 64  # root finders stop after 4 * _BISECT steps (bisection alone needs < 64 for 1e-14 in ln u)
_NEWTON = 3  # Newton polish steps after the Lambert-W estimate
_U_MAX = 600.0  # largest spectral efficiency tried, in nats (e^u stays finite)
_CAP = 2.0  # a client needing more than this many whole bands counts as this many
_FORMAT = "flsplit.ccc-agent"
_VERSION = 1
BudgetArg = Union[None, float, Sequence[Optional[float]]]


# --- argument checks -------------------------------------------------------------------------


def _int_arg(name: str, value, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers and integral floats accepted)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _float_arg(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float (optionally > 0 or >= 0), or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


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
    values = _sequence("samples", samples)
    if not values:
        raise ValueError("samples: at least one client is needed")
    out = [_int_arg(f"samples[{i}]", s, minimum=1) for i, s in enumerate(values)]
    if num_clients is not None and len(out) != num_clients:
        raise ValueError(f"samples has {len(out)} entries for num_clients={num_clients}")
    return out


def _ids_arg(client_ids, n: int) -> list[int]:
    if client_ids is None:
        return list(range(n))
    ids = _sequence("client_ids", client_ids)
    if len(ids) != n:
        raise ValueError(f"client_ids has {len(ids)} entries for {n} clients (samples)")
    ids = [_int_arg(f"client_ids[{i}]", c, minimum=0) for i, c in enumerate(ids)]
    if len(set(ids)) != n:
        raise ValueError(f"client_ids must be distinct, got {ids}")
    return ids


def _budget_arg(energy_budget_j: BudgetArg, n: int) -> Optional[np.ndarray]:
    """Per-client budgets in J (``inf`` = none), or None when no client has one."""
    if energy_budget_j is None:
        return None
    if isinstance(energy_budget_j, numbers.Real) and not isinstance(energy_budget_j, bool):
        values: list = [energy_budget_j] * n
    else:
        values = _sequence("energy_budget_j", energy_budget_j)
        if len(values) != n:
            raise ValueError(f"energy_budget_j has {len(values)} entries for {n} clients")
    out = np.empty(n)
    for i, v in enumerate(values):
        if v is None:
            out[i] = math.inf
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)) or float(v) <= 0:
            raise ValueError(f"energy_budget_j[{i}] must be a number > 0 J (or None / inf for none), got {v!r}")
        out[i] = float(v)
    return None if np.all(np.isinf(out)) else out


def _cut_arg(name: str, k, num_blocks: int) -> int:
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= num_blocks - 1:
        raise ValueError(f"{name} {k!r} is outside the model: valid cuts are 1..{num_blocks - 1}")
    return int(k)


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
        return terms.tc_min + terms.bits / (bandwidth * np.log2(1.0 + k / bandwidth))

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
    lo = float((terms.tc_min + terms.bits / (total * np.log2(1.0 + k / total))).max())
    hi = float((terms.tc_min + terms.bits / (total / n * np.log2(1.0 + k * n / total))).max())
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
    import cvxpy as cp

    n = len(gains)
    k = terms.pmax * gains / n0  # Hz
    # Normalised units: bandwidth / W, time / a feasible no-budget makespan, energy / budget.
    t0 = float((terms.tc_min + terms.bits / (total / n * np.log2(1.0 + k * n / total))).max())
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
            least = terms.pmax[i] * terms.bits[i] / (total * math.log2(1.0 + k[i] / total))
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
    rate = alloc.bandwidth * np.log2(1.0 + alloc.power * gains / (alloc.bandwidth * n0))
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


def allocate_sflga(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    cut: int,
    samples: Sequence[int],
    client_ids: Optional[Sequence[int]] = None,
    server_round: int = 0,
    bytes_per_element: float = 4.0,
    energy_budget_j: BudgetArg = None,
    solver: str = "exact",
) -> Plan:
    """Bandwidth, CPU frequency and uplink power minimising an SFL-GA round's latency at a cut.

    Parameters
    ----------
    profile : ModelProfile
        Per-block FLOPs and sizes of the model (``flsplit.profile.profile_model``).
    scenario : Scenario
        Devices, server and channel; the band ``channel.total_bandwidth_hz`` is shared (an
        OFDMA band is treated as continuous).
    cut : int
        The round's cut (``1 .. L-1``), the same for every client.
    samples : sequence of int
        Samples each client trains on in the round (each >= 1).
    client_ids : sequence of int, optional
        Client (partition) ids selecting device profiles and keying the fading; default
        ``0 .. len(samples) - 1``.
    server_round : int
        Round number (keys the fading).
    bytes_per_element : float
        Wire size of one smashed element (4 for fp32).
    energy_budget_j : float or sequence of float, optional
        Per-round device energy budget in J: one for all clients or one per client (``None``
        or ``inf`` entries: no budget). Compute plus transmit energy must stay within it.
    solver : {"exact", "cvxpy"}
        ``"exact"``: the decomposition of the module docstring (optimal). ``"cvxpy"``: the convex
        program with the power at the device maximum (optimal without budgets, an upper bound
        with them).

    Returns
    -------
    Plan
        ``method="ccc"``, ``cuts=[cut] * N``, ``bandwidth_hz`` (summing to the band),
        ``tx_power_w``, ``latency_s`` (``max_i chain_i`` + server time) and ``energy_j`` (all
        devices). ``details``: ``cpu_hz`` (chosen frequencies), ``client_ids``, per-client
        ``client_latency_s`` (chains, broadcast included), ``compute_s``, ``uplink_s``,
        ``energy_per_client_j``, ``compute_energy_j``, ``transmit_energy_j``, the scalars
        ``broadcast_s``, ``broadcast_bytes``, ``server_s``, ``server_flops``, ``uplink_bytes``,
        ``client_flops``, ``ofdma_relaxed``, ``solver`` and the model statement.

    Raises
    ------
    ValueError
        A cut outside the model, a non-positive bandwidth, malformed samples / ids / budgets,
        or a budget no allocation can meet (the message names the client).
    """
    if solver not in ("exact", "cvxpy"):
        raise ValueError(f"solver must be 'exact' or 'cvxpy', got {solver!r}")
    cut = _cut_arg("cut", cut, len(profile.blocks))
    samples = _samples_arg(samples)
    n = len(samples)
    ids = _ids_arg(client_ids, n)
    server_round = _int_arg("server_round", server_round, minimum=0)
    bpe = _float_arg("bytes_per_element", bytes_per_element, positive=True)
    budgets = _budget_arg(energy_budget_j, n)
    _total_band(scenario)  # a clear error for a zero or missing band before any work
    terms = _cut_terms(profile, scenario, cut, samples, ids, bpe, budgets)
    gains = scenario.channel_gains(ids, server_round)
    return _plan_from(terms, gains, scenario, ids, solver)


def _plan_from(terms: _CutTerms, gains: np.ndarray, scenario: Scenario, ids: list[int], solver: str,
               extra: Optional[dict] = None) -> Plan:
    total = _total_band(scenario)
    n0 = scenario.channel.noise_psd_w_per_hz
    if not np.all(gains > 0):
        raise ValueError("channel gains must be > 0")
    alloc = _solve(terms, gains, total, n0, ids, solver)
    ev = _evaluate(terms, alloc, gains, total, n0, scenario.server.tx_power_w)
    values = [ev["latency_s"], float(ev["energy_j"].sum())]
    if not all(math.isfinite(v) for v in values) or not np.all(np.isfinite(alloc.bandwidth)):
        raise ValueError(f"cut {terms.cut}: the allocation is not finite (numerical failure)")
    details = {
        "cut": terms.cut,
        "client_ids": list(ids),
        "cpu_hz": alloc.cpu_hz.tolist(),
        "client_latency_s": ev["chain_s"].tolist(),
        "compute_s": ev["compute_s"].tolist(),
        "uplink_s": ev["uplink_s"].tolist(),
        "broadcast_s": ev["broadcast_s"],
        "server_s": terms.server_s,
        "energy_per_client_j": ev["energy_j"].tolist(),
        "compute_energy_j": ev["compute_energy_j"].tolist(),
        "transmit_energy_j": ev["transmit_energy_j"].tolist(),
        "energy_budget_j": None if terms.budgets is None else terms.budgets.tolist(),
        "uplink_bytes": terms.uplink_bytes.tolist(),
        "client_flops": terms.client_flops.tolist(),
        "broadcast_bytes": terms.broadcast_bytes,
        "server_flops": terms.server_flops,
        "ofdma_relaxed": bool(scenario.channel.ofdma),
        "solver": solver if solver == "cvxpy" else ("exact-closed-form" if terms.budgets is None else "exact"),
        "model": "SFL-GA: chain = client compute at f + smashed uplink over B at p + one broadcast of "
        "max_i(samples) smashed gradients (whole band, server power, weakest receiver); latency = max chain "
        "+ server compute of all samples; energy = kappa f^2 cycles + p * uplink time",
    }
    if extra:
        details.update(extra)
    return Plan(
        method="ccc",
        cuts=[terms.cut] * len(ids),
        latency_s=values[0],
        energy_j=values[1],
        bandwidth_hz=alloc.bandwidth.tolist(),
        tx_power_w=alloc.power.tolist(),
        details=details,
    )


# --- the simulator ---------------------------------------------------------------------------


def _path_loss_gains(scenario: Scenario, ids: list[int]) -> np.ndarray:
    """Large-scale gains ``10**(-PL/10)`` (the channel without fading)."""
    d = np.array([scenario.device(c).distance_m for c in ids], dtype=float)
    return 10.0 ** (-np.asarray(scenario.channel.path_loss_db(d), dtype=float) / 10.0)


def _state_vector(gains: np.ndarray, round_index: int, loss_fraction: float, mean: float, scale: float,
                  num_rounds: int) -> np.ndarray:
    """``[z_1..z_N, tau, l]`` (module docstring) as float32."""
    z = (np.log(gains) - mean) / scale
    tau = min(max(round_index, 0), num_rounds - 1) / num_rounds
    return np.concatenate([z, [tau, loss_fraction]]).astype(np.float32)


def _client_fraction(profile: "ModelProfile", cut: int) -> float:
    """Share of the model's parameter bytes on the client at ``cut`` (``k / L`` if it has none)."""
    total = sum(b.param_bytes for b in profile.blocks)
    if total <= 0:
        return cut / len(profile.blocks)
    return sum(b.param_bytes for b in profile.blocks[:cut]) / total


def _candidates(profile: "ModelProfile", candidate_cuts, min_client_depth) -> tuple[list[int], np.ndarray, int]:
    num_blocks = len(profile.blocks)
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    depth = _int_arg("min_client_depth", min_client_depth, minimum=1)
    if depth > num_blocks - 1:
        raise ValueError(
            f"min_client_depth={depth} is beyond the model: the client can keep at most {num_blocks - 1} "
            f"of its {num_blocks} blocks"
        )
    if candidate_cuts is None:
        cands = list(range(1, num_blocks))
    else:
        raw = _sequence("candidate_cuts", candidate_cuts)
        if not raw:
            raise ValueError("candidate_cuts is empty")
        cands = sorted({_cut_arg("candidate_cuts: cut", k, num_blocks) for k in raw})
    allowed = np.array([k >= depth for k in cands], dtype=bool)
    if not allowed.any():
        raise ValueError(f"no candidate cut keeps min_client_depth={depth} blocks on the client: {cands}")
    return cands, allowed, depth


class CCCEnvironment:
    """Simulator of SFL-GA rounds for training the CCC agent (module docstring).

    Parameters
    ----------
    profile : ModelProfile
        Per-block costs of the model.
    scenario : Scenario
        Devices, server and channel; its seed keys the fading of every simulated round.
    samples : sequence of int
        Samples per client per round (one entry per client).
    client_ids : sequence of int, optional
        Scenario client ids (device profile and fading key); default ``0 .. N-1``.
    candidate_cuts : sequence of int, optional
        The actions; default every cut ``1 .. L-1``.
    min_client_depth : int
        Privacy bound: the client keeps at least this many blocks, so cuts below it are masked.
    num_rounds : int
        Rounds per episode.
    bytes_per_element : float
        Wire size of one smashed element.
    energy_budget_j : float or sequence of float, optional
        Per-round device energy budgets passed to the allocation.
    w_lat, w_conv : float
        Weights of the latency and convergence terms of the reward (>= 0, not both 0).
    eta, rho : float
        Loss model: ``loss *= 1 - eta * (1 - rho * q(k))`` per round (``0 < eta < 1``,
        ``0 <= rho <= 1``).
    infeasible_penalty : float
        Latency term (in units of ``latency_ref``) of a cut whose allocation is infeasible in a
        round.
    """

    def __init__(
        self,
        profile: "ModelProfile",
        scenario: Scenario,
        *,
        samples: Sequence[int],
        client_ids: Optional[Sequence[int]] = None,
        candidate_cuts: Optional[Sequence[int]] = None,
        min_client_depth: int = 1,
        num_rounds: int = 20,
        bytes_per_element: float = 4.0,
        energy_budget_j: BudgetArg = None,
        w_lat: float = 1.0,
        w_conv: float = 1.0,
        eta: float = 0.1,
        rho: float = 0.5,
        infeasible_penalty: float = 10.0,
    ) -> None:
        self.samples = _samples_arg(samples)
        n = len(self.samples)
        self.client_ids = _ids_arg(client_ids, n)
        self.candidate_cuts, self.allowed, self.min_client_depth = _candidates(profile, candidate_cuts,
                                                                                min_client_depth)
        self.num_rounds = _int_arg("num_rounds", num_rounds, minimum=1)
        self.bytes_per_element = _float_arg("bytes_per_element", bytes_per_element, positive=True)
        self.budgets = _budget_arg(energy_budget_j, n)
        self.w_lat = _float_arg("w_lat", w_lat, nonnegative=True)
        self.w_conv = _float_arg("w_conv", w_conv, nonnegative=True)
        if self.w_lat == 0 and self.w_conv == 0:
            raise ValueError("w_lat and w_conv are both 0: the reward would be constant")
        self.eta = _float_arg("eta", eta, positive=True)
        if self.eta >= 1:
            raise ValueError(f"eta must be < 1, got {self.eta}")
        self.rho = _float_arg("rho", rho, nonnegative=True)
        if self.rho > 1:
            raise ValueError(f"rho must be <= 1, got {self.rho}")
        self.infeasible_penalty = _float_arg("infeasible_penalty", infeasible_penalty, positive=True)
        self.profile = profile
        self.scenario = scenario
        self.total = _total_band(scenario)
        self.n0 = scenario.channel.noise_psd_w_per_hz
        self.terms = [
            _cut_terms(profile, scenario, k, self.samples, self.client_ids, self.bytes_per_element, self.budgets)
            for k in self.candidate_cuts
        ]
        self.client_fraction = np.array([_client_fraction(profile, k) for k in self.candidate_cuts])
        mean_gains = _path_loss_gains(scenario, self.client_ids)
        self.log_gain_mean = float(np.mean(np.log(mean_gains))) - _EULER_GAMMA
        self.log_gain_scale = _FADING_STD
        ref = [self._latency(j, mean_gains) for j in np.flatnonzero(self.allowed)]
        finite = [r for r in ref if math.isfinite(r)]
        if not finite:
            raise ValueError("no allowed cut is feasible under the mean channel (energy budgets too small)")
        self.latency_ref = min(finite)
        self._cache: dict[tuple[int, int], float] = {}
        self._gains_key: Optional[int] = None
        self._gains: Optional[np.ndarray] = None
        self.reset(0)

    # -- sizes --

    @property
    def num_clients(self) -> int:
        return len(self.samples)

    @property
    def num_actions(self) -> int:
        return len(self.candidate_cuts)

    @property
    def state_dim(self) -> int:
        return self.num_clients + 2

    # -- dynamics --

    def fading_key(self, episode: int, round_index: int) -> int:
        """Fading round of round ``round_index`` (0-based) of ``episode``."""
        return episode * self.num_rounds + round_index

    def gains(self, key: int) -> np.ndarray:
        """Channel gains of the clients at fading round ``key`` (cached for the last key)."""
        if key != self._gains_key:
            self._gains = self.scenario.channel_gains(self.client_ids, key)
            self._gains_key = key
        return self._gains

    def _latency(self, action: int, gains: np.ndarray) -> float:
        try:
            alloc = _solve(self.terms[action], gains, self.total, self.n0, self.client_ids)
        except _Infeasible:
            return math.inf
        ev = _evaluate(self.terms[action], alloc, gains, self.total, self.n0, self.scenario.server.tx_power_w)
        return ev["latency_s"]

    def latency(self, action: int, key: Optional[int] = None) -> float:
        """Optimal round latency of candidate ``action`` at fading round ``key`` (default: now);
        ``inf`` if the energy budgets make it infeasible."""
        key = self.key if key is None else key
        if (key, action) not in self._cache:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key, action] = self._latency(action, self.gains(key))
        return self._cache[key, action]

    def state(self) -> np.ndarray:
        """The current state (module docstring)."""
        return _state_vector(self.gains(self.key), self.round_index, self.loss, self.log_gain_mean,
                             self.log_gain_scale, self.num_rounds)

    def reset(self, episode: int = 0) -> np.ndarray:
        """Start episode ``episode`` (its fading rounds are ``episode * num_rounds + t``)."""
        self.episode = _int_arg("episode", episode, minimum=0)
        self.round_index = 0
        self.loss = 1.0
        self.key = self.fading_key(self.episode, 0)
        return self.state()

    def _check_action(self, action) -> int:
        a = _int_arg("action", action, minimum=0)
        if a >= self.num_actions:
            raise ValueError(f"action {a} is outside 0..{self.num_actions - 1}")
        if not self.allowed[a]:
            raise ValueError(
                f"action {a} (cut {self.candidate_cuts[a]}) is masked: the client must keep at least "
                f"min_client_depth={self.min_client_depth} blocks"
            )
        return a

    def outcome(self, action: int) -> tuple[float, float, float]:
        """(reward, latency, next loss) of ``action`` in the current state, without acting."""
        a = self._check_action(action)
        lat = self.latency(a)
        if math.isinf(lat):
            return -(self.w_lat * self.infeasible_penalty + self.w_conv * self.loss), lat, self.loss
        loss = self.loss * (1.0 - self.eta * (1.0 - self.rho * self.client_fraction[a]))
        return -(self.w_lat * lat / self.latency_ref + self.w_conv * loss), lat, loss

    def reward_of(self, action: int) -> float:
        """Immediate reward of ``action`` in the current state (for oracles; nothing changes)."""
        return self.outcome(action)[0]

    def step(self, action: int) -> tuple[np.ndarray, float, bool, dict]:
        """Play one round with candidate ``action``.

        Returns
        -------
        tuple
            ``(next_state, reward, done, info)``; ``info`` has ``cut``, ``latency_s``, ``loss``
            and ``feasible``.
        """
        reward, lat, loss = self.outcome(action)
        self.loss = loss
        self.round_index += 1
        done = self.round_index >= self.num_rounds
        self.key = self.fading_key(self.episode, self.round_index)
        info = {"cut": self.candidate_cuts[action], "latency_s": lat, "loss": loss, "feasible": math.isfinite(lat)}
        return self.state(), reward, done, info


# --- the agent -------------------------------------------------------------------------------


def _mlp(sizes: list[int], generator):
    """An MLP with ReLUs, initialised from ``generator`` (PyTorch's default ranges)."""
    import torch
    from torch import nn

    layers: list = []
    for i in range(len(sizes) - 1):
        # skip_init: no draw from torch's global generator.
        lin = torch.nn.utils.skip_init(nn.Linear, sizes[i], sizes[i + 1])
        bound = 1.0 / math.sqrt(sizes[i])
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.uniform_(-bound, bound, generator=generator)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CCCAgent:
    """Double-DQN agent choosing SFL-GA's cut from the channel state (module docstring).

    Parameters
    ----------
    num_clients : int
        Clients per round (the state has ``num_clients + 2`` entries).
    candidate_cuts : sequence of int
        The cut of each action.
    min_client_depth : int
        Cuts below it are masked (never chosen, excluded from every argmax).
    num_rounds : int
        Rounds per episode (scales the round-progress feature).
    hidden : sequence of int
        Hidden layer widths of the Q-network.
    gamma : float
        Discount factor in ``[0, 1)``.
    lr : float
        Adam learning rate.
    batch_size, buffer_size : int
        Replay mini-batch and replay capacity.
    target_sync : int
        The target network is copied from the online one every ``target_sync`` updates.
    seed : int
        Seeds the weight initialisation (and, in training, exploration and replay).
    log_gain_mean, log_gain_scale : float
        State normalisation of the log channel gains (from the simulator).
    reward : dict, optional
        The simulator's reward and loss-model settings (kept for the planner's loss proxy).
    """

    def __init__(
        self,
        *,
        num_clients: int,
        candidate_cuts: Sequence[int],
        min_client_depth: int = 1,
        num_rounds: int = 20,
        hidden: Sequence[int] = (64, 64),
        gamma: float = 0.9,
        lr: float = 1e-3,
        batch_size: int = 64,
        buffer_size: int = 10_000,
        target_sync: int = 100,
        seed: int = 0,
        log_gain_mean: float = 0.0,
        log_gain_scale: float = _FADING_STD,
        reward: Optional[dict] = None,
    ) -> None:
        import torch

        self.num_clients = _int_arg("num_clients", num_clients, minimum=1)
        cuts = _sequence("candidate_cuts", candidate_cuts)
        if not cuts:
            raise ValueError("candidate_cuts is empty")
        self.candidate_cuts = [_int_arg(f"candidate_cuts[{i}]", k, minimum=1) for i, k in enumerate(cuts)]
        if len(set(self.candidate_cuts)) != len(self.candidate_cuts):
            raise ValueError(f"candidate_cuts must be distinct, got {self.candidate_cuts}")
        self.min_client_depth = _int_arg("min_client_depth", min_client_depth, minimum=1)
        self.allowed = np.array([k >= self.min_client_depth for k in self.candidate_cuts], dtype=bool)
        if not self.allowed.any():
            raise ValueError(
                f"no candidate cut keeps min_client_depth={self.min_client_depth} blocks: {self.candidate_cuts}"
            )
        self.num_rounds = _int_arg("num_rounds", num_rounds, minimum=1)
        self.hidden = [_int_arg(f"hidden[{i}]", h, minimum=1) for i, h in enumerate(_sequence("hidden", hidden))]
        self.gamma = _float_arg("gamma", gamma, nonnegative=True)
        if self.gamma >= 1:
            raise ValueError(f"gamma must be < 1, got {self.gamma}")
        self.lr = _float_arg("lr", lr, positive=True)
        self.batch_size = _int_arg("batch_size", batch_size, minimum=1)
        self.buffer_size = _int_arg("buffer_size", buffer_size, minimum=1)
        self.target_sync = _int_arg("target_sync", target_sync, minimum=1)
        self.seed = _int_arg("seed", seed, minimum=0)
        self.log_gain_mean = _float_arg("log_gain_mean", log_gain_mean)
        self.log_gain_scale = _float_arg("log_gain_scale", log_gain_scale, positive=True)
        self.reward = dict(reward or {"w_lat": 1.0, "w_conv": 1.0, "eta": 0.1, "rho": 0.5})
        self.updates = 0
        self.history: dict[str, list[float]] = {"episode_return": [], "loss": []}
        generator = torch.Generator().manual_seed(self.seed)
        sizes = [self.state_dim, *self.hidden, self.num_actions]
        self.online = _mlp(sizes, generator)
        self.target = _mlp(sizes, generator)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        try:  # the fused CPU kernel is about a quarter faster for these small networks
            self.optimizer = torch.optim.Adam(self.online.parameters(), lr=self.lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch
            self.optimizer = torch.optim.Adam(self.online.parameters(), lr=self.lr)
        self._mask = torch.as_tensor(self.allowed)
        self._buffer: Optional[dict[str, np.ndarray]] = None
        self._buffer_len = 0
        self._buffer_pos = 0

    # -- sizes and layout --

    @property
    def state_dim(self) -> int:
        return self.num_clients + 2

    @property
    def num_actions(self) -> int:
        return len(self.candidate_cuts)

    @property
    def state_layout(self) -> list[str]:
        """Meaning of each state entry."""
        return [f"log_gain_norm[{i}]" for i in range(self.num_clients)] + ["round_fraction", "loss_fraction"]

    @property
    def config(self) -> dict:
        """Everything needed to rebuild the agent (saved with the weights)."""
        return {
            "num_clients": self.num_clients,
            "candidate_cuts": list(self.candidate_cuts),
            "allowed": [bool(a) for a in self.allowed],
            "min_client_depth": self.min_client_depth,
            "num_rounds": self.num_rounds,
            "hidden": list(self.hidden),
            "gamma": self.gamma,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size,
            "target_sync": self.target_sync,
            "seed": self.seed,
            "log_gain_mean": self.log_gain_mean,
            "log_gain_scale": self.log_gain_scale,
            "state_layout": self.state_layout,
            "reward": dict(self.reward),
            "updates": self.updates,
        }

    # -- acting --

    def _check_states(self, states) -> "Any":
        import torch

        x = torch.as_tensor(np.asarray(states, dtype=np.float32))
        if x.shape[-1] != self.state_dim:
            raise ValueError(f"state has {x.shape[-1]} entries, the agent expects {self.state_dim}")
        if not torch.isfinite(x).all():
            raise ValueError("state has non-finite entries")
        return x

    def q_values(self, state) -> np.ndarray:
        """Q-values of every action (masked ones included) for one state."""
        import torch

        with torch.no_grad():
            return self.online(self._check_states(state)).double().numpy()

    def greedy(self, state) -> int:
        """The allowed action with the largest Q-value (ties: the first)."""
        q = self.q_values(state)
        return int(np.argmax(np.where(self.allowed, q, -np.inf)))

    def act(self, state, epsilon: float, rng: np.random.Generator) -> int:
        """Epsilon-greedy over the allowed actions."""
        if rng.random() < epsilon:
            return int(rng.choice(np.flatnonzero(self.allowed)))
        return self.greedy(state)

    # -- learning --

    def double_dqn_targets(self, rewards, next_states, dones, *, check: bool = True) -> "Any":
        """``r + gamma (1 - done) Q_target(s', argmax_{a allowed} Q_online(s', a))`` per row."""
        import torch

        r = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
        d = torch.as_tensor(np.asarray(dones, dtype=np.float32))
        s2 = self._check_states(next_states) if check else torch.as_tensor(next_states)
        with torch.no_grad():
            q_online = self.online(s2).masked_fill(~self._mask, -math.inf)
            best = q_online.argmax(dim=1, keepdim=True)
            q_next = self.target(s2).gather(1, best).squeeze(1)
        return r + self.gamma * (1.0 - d) * q_next

    def remember(self, state, action: int, reward: float, next_state, done: bool) -> None:
        """Store one transition in the replay buffer (the oldest is overwritten when full)."""
        if self._buffer is None:
            n, d = self.buffer_size, self.state_dim
            self._buffer = {
                "s": np.zeros((n, d), np.float32), "a": np.zeros(n, np.int64), "r": np.zeros(n, np.float32),
                "s2": np.zeros((n, d), np.float32), "done": np.zeros(n, np.float32),
            }
        i = self._buffer_pos
        b = self._buffer
        b["s"][i], b["a"][i], b["r"][i], b["s2"][i], b["done"][i] = state, action, reward, next_state, float(done)
        self._buffer_pos = (i + 1) % self.buffer_size
        self._buffer_len = min(self._buffer_len + 1, self.buffer_size)

    def learn(self, rng: np.random.Generator) -> Optional[float]:
        """One Double-DQN update on a replay mini-batch (None until the buffer holds a batch)."""
        import torch
        import torch.nn.functional as F

        if self._buffer is None or self._buffer_len < self.batch_size:
            return None
        idx = rng.integers(0, self._buffer_len, size=self.batch_size)
        b = self._buffer
        target = self.double_dqn_targets(b["r"][idx], b["s2"][idx], b["done"][idx], check=False)
        q = self.online(torch.as_tensor(b["s"][idx])).gather(1, torch.as_tensor(b["a"][idx]).unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, target)  # Huber
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), 10.0)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.target_sync == 0:
            self.sync_target()
        return loss.item()

    def sync_target(self) -> None:
        """Copy the online network into the target network."""
        self.target.load_state_dict(self.online.state_dict())

    # -- persistence --

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the weights and the configuration with ``torch.save``."""
        import torch

        torch.save(
            {
                "format": _FORMAT,
                "version": _VERSION,
                "config": self.config,
                "online": self.online.state_dict(),
                "target": self.target.state_dict(),
                "history": {k: [float(v) for v in vals] for k, vals in self.history.items()},
            },
            path,
        )

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        *,
        num_clients: Optional[int] = None,
        candidate_cuts: Optional[Sequence[int]] = None,
    ) -> "CCCAgent":
        """Read an agent written by ``save``.

        Parameters
        ----------
        path : str or PathLike
            The file.
        num_clients : int, optional
            If given, the agent must be for this many clients.
        candidate_cuts : sequence of int, optional
            If given, the agent's candidate cuts must be exactly these.

        Raises
        ------
        ValueError
            A file that is not a CCC agent (corrupt, truncated, another format or version), or
            one for a different number of clients or other cuts.
        """
        import torch

        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
            # torch's message explains weights_only at length; the type names the failure.
            raise ValueError(f"{path}: not a readable CCC agent file ({type(err).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a CCC agent file (format {_FORMAT!r} expected)")
        if blob.get("version") != _VERSION:
            raise ValueError(f"{path}: CCC agent file version {blob.get('version')!r}, expected {_VERSION}")
        cfg = blob.get("config")
        keys = ("num_clients", "candidate_cuts", "min_client_depth", "num_rounds", "hidden", "gamma", "lr",
                "batch_size", "buffer_size", "target_sync", "seed", "log_gain_mean", "log_gain_scale")
        if not isinstance(cfg, dict) or any(k not in cfg for k in keys):
            raise ValueError(f"{path}: corrupt CCC agent file (incomplete configuration)")
        if num_clients is not None and _int_arg("num_clients", num_clients, minimum=1) != cfg["num_clients"]:
            raise ValueError(
                f"{path}: the agent was trained for {cfg['num_clients']} clients, not {num_clients}"
            )
        if candidate_cuts is not None and [int(k) for k in candidate_cuts] != list(cfg["candidate_cuts"]):
            raise ValueError(
                f"{path}: the agent chooses among cuts {cfg['candidate_cuts']}, not {list(candidate_cuts)}"
            )
        try:
            agent = cls(**{k: cfg[k] for k in keys}, reward=cfg.get("reward"))
            agent.online.load_state_dict(blob["online"])
            agent.target.load_state_dict(blob["target"])
        except (KeyError, TypeError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: corrupt CCC agent file ({err})") from None
        if cfg.get("allowed") is not None and list(cfg["allowed"]) != [bool(a) for a in agent.allowed]:
            raise ValueError(f"{path}: corrupt CCC agent file (action mask does not match min_client_depth)")
        agent.updates = int(cfg.get("updates", 0))
        hist = blob.get("history")
        if isinstance(hist, dict):
            agent.history = {str(k): [float(v) for v in vals] for k, vals in hist.items()}
        return agent


def train_ccc_agent(
    profile: "ModelProfile",
    scenario: Scenario,
    *,
    num_clients: int,
    samples: Union[int, Sequence[int]],
    episodes: int,
    rounds_per_episode: int,
    seed: int,
    min_client_depth: int = 1,
    client_ids: Optional[Sequence[int]] = None,
    candidate_cuts: Optional[Sequence[int]] = None,
    bytes_per_element: float = 4.0,
    energy_budget_j: BudgetArg = None,
    w_lat: float = 1.0,
    w_conv: float = 1.0,
    eta: float = 0.1,
    rho: float = 0.5,
    hidden: Sequence[int] = (64, 64),
    gamma: float = 0.9,
    lr: float = 1e-3,
    batch_size: int = 64,
    buffer_size: int = 10_000,
    target_sync: int = 100,
    eps_start: float = 1.0,
    eps_end: float = 0.05,
    eps_decay_fraction: float = 0.6,
) -> CCCAgent:
    """Train a CCC agent offline on the simulator (``CCCEnvironment``).

    Parameters
    ----------
    profile, scenario
        The model's profile and the simulated deployment.
    num_clients : int
        Clients per round.
    samples : int or sequence of int
        Samples per client per round (one for all, or one per client).
    episodes, rounds_per_episode : int
        Training length: episode ``e`` plays fading rounds ``e * R .. e * R + R - 1``.
    seed : int
        Seeds the weights, exploration and replay sampling (training is deterministic on the
        CPU for a seed; torch's and numpy's global random states are not used).
    min_client_depth : int
        Privacy bound (cuts below it are never chosen).
    client_ids, candidate_cuts, bytes_per_element, energy_budget_j
        As in ``CCCEnvironment``.
    w_lat, w_conv, eta, rho
        Reward weights and loss model (module docstring).
    hidden, gamma, lr, batch_size, buffer_size, target_sync
        As in ``CCCAgent``.
    eps_start, eps_end, eps_decay_fraction : float
        Epsilon decays linearly from ``eps_start`` to ``eps_end`` over that fraction of the steps.

    Returns
    -------
    CCCAgent
        With ``history["episode_return"]`` (sum of rewards per episode) and ``history["loss"]``
        (mean Huber loss per episode).
    """
    n = _int_arg("num_clients", num_clients, minimum=1)
    episodes = _int_arg("episodes", episodes, minimum=1)
    rounds = _int_arg("rounds_per_episode", rounds_per_episode, minimum=1)
    seed = _int_arg("seed", seed, minimum=0)
    eps_start = _float_arg("eps_start", eps_start, nonnegative=True)
    eps_end = _float_arg("eps_end", eps_end, nonnegative=True)
    decay = _float_arg("eps_decay_fraction", eps_decay_fraction, positive=True)
    if eps_start > 1 or eps_end > 1:
        raise ValueError("eps_start and eps_end must be in [0, 1]")
    env = CCCEnvironment(
        profile, scenario, samples=_samples_arg(samples, n), client_ids=client_ids, candidate_cuts=candidate_cuts,
        min_client_depth=min_client_depth, num_rounds=rounds, bytes_per_element=bytes_per_element,
        energy_budget_j=energy_budget_j, w_lat=w_lat, w_conv=w_conv, eta=eta, rho=rho,
    )
    agent = CCCAgent(
        num_clients=n, candidate_cuts=env.candidate_cuts, min_client_depth=env.min_client_depth,
        num_rounds=rounds, hidden=hidden, gamma=gamma, lr=lr, batch_size=batch_size, buffer_size=buffer_size,
        target_sync=target_sync, seed=seed, log_gain_mean=env.log_gain_mean, log_gain_scale=env.log_gain_scale,
        reward={"w_lat": env.w_lat, "w_conv": env.w_conv, "eta": env.eta, "rho": env.rho,
                "infeasible_penalty": env.infeasible_penalty},
    )
    rng = np.random.default_rng([seed, 1])
    total_steps = episodes * rounds
    decay_steps = max(1.0, decay * total_steps)
    step = 0
    for episode in range(episodes):
        state = env.reset(episode)
        ret, losses = 0.0, []
        done = False
        while not done:
            eps = eps_end + (eps_start - eps_end) * max(0.0, 1.0 - step / decay_steps)
            action = agent.act(state, eps, rng)
            next_state, reward, done, _ = env.step(action)
            agent.remember(state, action, reward, next_state, done)
            loss = agent.learn(rng)
            if loss is not None:
                losses.append(loss)
            ret += reward
            state = next_state
            step += 1
        agent.history["episode_return"].append(ret)
        agent.history["loss"].append(float(np.mean(losses)) if losses else math.nan)
    return agent


# --- the planner -----------------------------------------------------------------------------


class CCCPlanner:
    """Per-round SFL-GA plans: the agent's greedy cut, then ``allocate_sflga``'s allocation.

    Parameters
    ----------
    agent : CCCAgent
        A trained agent for ``len(samples)`` clients.
    profile : ModelProfile
        The model's profile (the agent's candidate cuts must be cuts of it).
    scenario : Scenario
        Devices, server and channel.
    samples : sequence of int
        Samples per client per round.
    client_ids : sequence of int, optional
        Scenario client ids; default ``0 .. N-1``.
    bytes_per_element : float
        Wire size of one smashed element.
    energy_budget_j : float or sequence of float, optional
        Per-round device energy budgets (see ``allocate_sflga``).
    loss_scale : float, optional
        Divides a reported ``recent_loss`` into the state's loss fraction; default: the first
        reported loss (it maps to the simulator's initial loss 1).

    Notes
    -----
    Without a reported loss the planner feeds the agent its own proxy (the simulator's loss
    model applied to the cuts it chose); a reported loss replaces the proxy.
    """

    def __init__(
        self,
        agent: CCCAgent,
        profile: "ModelProfile",
        scenario: Scenario,
        *,
        samples: Sequence[int],
        client_ids: Optional[Sequence[int]] = None,
        bytes_per_element: float = 4.0,
        energy_budget_j: BudgetArg = None,
        loss_scale: Optional[float] = None,
    ) -> None:
        if not isinstance(agent, CCCAgent):
            raise ValueError(f"agent must be a CCCAgent, got {type(agent).__name__}")
        self.samples = _samples_arg(samples)
        n = len(self.samples)
        if n != agent.num_clients:
            raise ValueError(f"the agent was trained for {agent.num_clients} clients, got samples for {n}")
        self.client_ids = _ids_arg(client_ids, n)
        num_blocks = len(profile.blocks)
        for k in agent.candidate_cuts:
            _cut_arg("the agent's candidate cut", k, num_blocks)
        self.bytes_per_element = _float_arg("bytes_per_element", bytes_per_element, positive=True)
        self.budgets = _budget_arg(energy_budget_j, n)
        self.loss_scale = None if loss_scale is None else _float_arg("loss_scale", loss_scale, positive=True)
        _total_band(scenario)
        self.agent = agent
        self.profile = profile
        self.scenario = scenario
        self._terms = {
            j: _cut_terms(profile, scenario, k, self.samples, self.client_ids, self.bytes_per_element, self.budgets)
            for j, k in enumerate(agent.candidate_cuts)
            if agent.allowed[j]
        }
        self._fraction = [_client_fraction(profile, k) for k in agent.candidate_cuts]
        self._proxy_loss = 1.0

    def plan(self, server_round: int, recent_loss: Optional[float] = None) -> Plan:
        """Plan round ``server_round``.

        Parameters
        ----------
        server_round : int
            Round number (keys the fading; the state's round fraction is
            ``min(server_round, num_rounds - 1) / num_rounds``).
        recent_loss : float, optional
            The latest training loss (finite, >= 0); default: the planner's proxy.

        Returns
        -------
        Plan
            ``allocate_sflga``'s plan for the chosen cut; ``details`` adds ``q_values`` (every
            candidate), ``action``, ``candidate_cuts``, ``allowed``, ``state``, ``loss_fraction``
            and ``fallback`` (the greedy cut was infeasible and the next best was used).
        """
        server_round = _int_arg("server_round", server_round, minimum=0)
        if recent_loss is not None:
            loss = _float_arg("recent_loss", recent_loss, nonnegative=True)
            if self.loss_scale is None:
                self.loss_scale = loss if loss > 0 else 1.0
            fraction = loss / self.loss_scale
        else:
            fraction = self._proxy_loss
        gains = self.scenario.channel_gains(self.client_ids, server_round)
        a = self.agent
        state = _state_vector(gains, server_round, fraction, a.log_gain_mean, a.log_gain_scale, a.num_rounds)
        q = a.q_values(state)
        order = [j for j in np.argsort(-q, kind="stable") if a.allowed[j]]
        error: Optional[ValueError] = None
        for rank, j in enumerate(order):
            try:
                plan = _plan_from(
                    self._terms[j], gains, self.scenario, self.client_ids, "exact",
                    extra={
                        "q_values": q.tolist(),
                        "action": int(j),
                        "candidate_cuts": list(a.candidate_cuts),
                        "allowed": [bool(x) for x in a.allowed],
                        "state": state.tolist(),
                        "loss_fraction": fraction,
                        "fallback": rank > 0,
                        "server_round": server_round,
                    },
                )
            except _Infeasible as err:
                error = err
                continue
            eta, rho = a.reward.get("eta", 0.1), a.reward.get("rho", 0.5)
            self._proxy_loss = fraction * (1.0 - eta * (1.0 - rho * self._fraction[j]))
            return plan
        raise ValueError(f"round {server_round}: no allowed cut is feasible: {error}")
