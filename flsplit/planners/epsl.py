"""EPSL planner: OFDMA subchannels, uplink powers and one cut layer minimising the round latency.

EPSL (Lin et al., "Efficient Parallel Split Learning over Resource-constrained Wireless Edge
Networks"; DESIGN.md 2, item 1) is PSL with last-layer gradient aggregation: for a fraction
``phi`` of a step's sample positions the server sums the clients' logit gradients and
back-propagates them once, and the resulting cut-layer gradient is broadcast. All clients
share one cut. The planner chooses that cut, each client's number of OFDMA subchannels and
each client's uplink transmit power so that the round finishes as early as possible
(``phi = 0`` is PSL).

Traffic and work of one round (``N`` clients, ``n`` samples each, ``s`` smashed elements per
sample at cut ``k``, ``bpe`` bytes per element), exactly as ``flsplit.sim.price`` prices it
for the returned plan (``timing="parallel"``, ``subchannels=``, ``tx_power_w=``)::

    uplink_bytes_i    = n * s * bpe                 (smashed data)
    downlink_bytes_i  = (1 - phi) * n * s * bpe     (unicast part of the cut-layer gradient)
    broadcast_bytes   = phi * n * s * bpe           (aggregated part: one broadcast to all)
    client_flops_i    = client_flops(cut, n)        (forward + backward)
    server_flops      = server_flops(cut, N * n, backward_samples=(1 - phi) * N * n + phi * n)

Latency model (``flsplit.sim``, DESIGN.md 3.6). Client ``i`` with ``m_i`` subchannels of
width ``W`` (``B_i = m_i W``), power ``p_i``, gain ``g_i`` (``Scenario.channel_gain``)::

    chain_i = n F^c(k) / f_i                                    (compute)
            + D / (B_i log2(1 + p_i g_i / (B_i N0)))            (uplink, D = 8 n s bpe bits)
            + (1 - phi) D / (B_i log2(1 + P_s g_i / (B_i N0)))  (unicast downlink, server power)
            + phi D / (W_tot log2(1 + P_s g_min / (W_tot N0)))  (broadcast: whole band, weakest)
    T = max_i chain_i + server_flops / server_flops_per_s

and minimises ``T`` over the cut (from the candidate cuts), integer subchannel counts
``m_i >= 1`` with ``sum_i m_i <= K`` and powers ``0 < p_i <= pmax_i`` (the device's
``tx_power_w``). With ``energy_budget_j`` client ``i``'s round energy must stay within its
budget ``E_i``::

    kappa_i f_i^2 n F^c(k) / c_i  +  p_i * D / r_i(p_i)  <=  E_i

The transmit energy ``p D / r(p)`` equals ``E0 x / ln(1 + x)`` with the SNR
``x = p g / (B N0)`` and ``E0 = D N0 ln2 / g``: it increases in ``p`` from ``E0`` (its limit as
``p -> 0``, whatever the bandwidth) to infinity. So a budget leaves room to transmit iff
``E_i - compute energy > E0`` (required with a relative margin of ``1e-6``, below which the
SNR would be under ``2e-6``; a cut where some client has no room is skipped, and no feasible
cut is a ValueError naming the clients and budgets), and it then caps the SNR at the root
``x*_i`` of ``x / ln(1 + x) = (E_i - compute energy) / E0``, i.e. the power at
``p*_i(B) = min(pmax_i, x*_i B N0 / g_i)``. Because ``x*_i`` does not depend on ``B``, a
budget-bound client keeps its SNR and its power grows with its bandwidth.

Algorithm (block-coordinate descent, DESIGN.md 3.7):

* **Power step** (subchannels and cut fixed): one convex program in cvxpy with an epigraph
  variable ``T`` for the max. In normalised units (times divided by a scale ``tau``, the
  variable ``z_i = ln(1 + x_i)`` = the uplink's spectral efficiency in nats, which lies in
  ``[0, ln(1 + pmax g / (B N0))]``, about ``[0, 15]``)::

      minimise    t + mean_i l_i
      subject to  c_i + u_i * inv_pos(z_i) <= l_i <= t          (chain of client i)
                  exp(z_i + ln w_i) - w_i - z_i <= 0             (energy budget)
                  0 <= z_i <= ln(1 + pmax_i g_i / (B_i N0))

  with ``c_i`` the chain's power-independent part, ``u_i = D ln2 / B_i`` (uplink time
  ``= u_i / z_i``) and ``w_i = E0_i / (E_i - compute energy)``. The budget constraint is
  ``D p_i - Etx_i B_i log2(1 + a_i p_i) <= 0`` (linear minus concave) written in ``z``:
  ``w (e^z - 1) - z <= 0`` (convex). Every client's own latency falls as its power rises, so
  all the ``l_i`` are minimised at one point: the tie-breaker ``mean_i l_i`` leaves the optimal
  ``t`` unchanged and makes the optimum unique, namely ``p*_i`` above for every client. The
  solver's answer is polished to that closed form (``x*_i`` by bisection): each returned
  power either meets its budget with equality or is the device's maximum, and the budget is
  re-checked with ``price``'s own arithmetic (never exceeded). The solver's deviation
  from the closed form is reported in ``details``. **Without budgets the maximum power is
  optimal** (latency decreases in ``p``) and no convex program is solved.
* **Subchannel step** (cut fixed): start with one subchannel per client, then give each of
  the remaining subchannels to the current bottleneck (largest chain), its power re-capped by
  its budget (``p*_i(B)``). Every chain decreases in its own bandwidth, so this greedy is
  optimal for ``min max_i chain_i``: while the bottleneck is above the optimum ``T*`` it only
  gives subchannels to clients below their need at ``T*``, whose needs fit in ``K``.
* **Cut step**: every candidate cut is evaluated with its subchannel and power steps; the
  best is kept (ties: the smaller cut).

The blocks are iterated until the latency stops improving (relative ``1e-9``) or
``max_iter``. Since each block is solved exactly (greedy subchannels and closed-form powers
are jointly optimal for a fixed cut, and the cut search is exhaustive), the first pass
already reaches the global optimum of this model and the second pass confirms it (the greedy
and the closed-form powers are memoised per cut, so the confirming pass costs next to nothing).

**Where the convex program runs.** Its answer is the closed form (above), so the search uses
the closed form directly, and the program is solved **once per call**, for the chosen cut and
subchannels, built with its data as constants (a DPP-parametrised program's first compilation
costs about 7x more at 1000 clients and is never reused); its status, its own powers and
latency and its largest relative deviation from the closed form are ``details["power_step"]``.
The reported ``latency_s`` / ``energy_j`` are the one price (``flsplit.sim.price`` of
``predict_workload("epsl", phi=phi)``, ``ServerTiming.AFTER_CLIENTS``), which is this model.
The arguments are checked once by ``flsplit.planners.problem.PlanningProblem`` (plus EPSL's own:
one batch size, an OFDMA band with a subchannel per client, ``phi``, the budgets).

Pure apart from cvxpy (energy budgets only: the ``planners`` extra): numpy and plain floats, no
torch import (the profile is only read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from flsplit.sim.checks import budget_array, fraction_arg, int_arg
from flsplit.planners.plan import Plan, client_costs
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PlanInputs
from flsplit.sim.pricing import ServerTiming
from flsplit.planners.epsl_steps import (
    _REL_IMPROVE,
    _CutData,
    _Problem,
    _PowerProgram,
    _power_step,
    _respect_budgets,
)


__all__ = ["plan_epsl", "epsl_rounds"]


# --- the planner -----------------------------------------------------------------------------


def plan_epsl(
    problem: PlanningProblem,
    *,
    phi: float = 0.0,
    energy_budget_j: Union[None, float, Sequence[float]] = None,
    max_iter: int = 20,
) -> Plan:
    """Subchannels, uplink powers and one cut minimising EPSL's round latency.

    A solver (block-coordinate descent, module docstring): arguments, then the per-cut
    constants, then alternating subchannel and power steps per candidate cut.

    Parameters
    ----------
    problem : PlanningProblem
        The round, checked once (``PlanningProblem.build(profile, scenario, samples=[n] * N,
        client_ids=..., server_round=..., bytes_per_element=..., candidate_cuts=...,
        include_weights=...)``): every client trains on the same number of samples (EPSL steps
        use one batch size), and the scenario's channel is OFDMA (``num_subchannels``
        subchannels of ``subchannel_bandwidth_hz``, at least one per client).
    phi : float
        Fraction of sample positions whose last-layer gradients are aggregated, in
        ``[0, 1]`` (0: PSL).
    energy_budget_j : float or sequence of float, optional
        Per-client energy budget of the round in J (compute plus transmit energy): one number
        for every client or one per client. Default: no budget (maximum power).
    max_iter : int
        Maximum number of block-coordinate passes.

    Returns
    -------
    Plan
        ``method="epsl"``, ``cuts`` (the same cut for every client), ``subchannels``,
        ``tx_power_w``, ``latency_s`` and ``energy_j`` (``price``'s round latency and
        total device energy for this plan) and ``details``: ``iterations``, ``converged``,
        ``latency_history``, ``client_ids``, ``phi``, ``candidate_cuts``, ``cut_latency_s``
        (best latency per candidate cut, ``None`` where a budget cannot be met),
        ``client_latency_s``, ``energy_per_client_j``, ``compute_s``, ``uplink_s``,
        ``downlink_s`` (unicast plus broadcast), ``broadcast_s``, ``server_s``,
        ``energy_budget_j``, ``budget_binding``, ``solver`` and ``power_step``
        (the convex program's status, its own powers and latency, and its largest relative
        deviation from the polished closed form).

    Raises
    ------
    ValueError
        On a non-OFDMA channel, fewer subchannels than clients, ``phi`` outside ``[0, 1]``,
        ``samples <= 0``, empty or out-of-range candidate cuts, malformed or infeasible energy
        budgets, or other malformed arguments.
    RuntimeError
        With energy budgets, if cvxpy has none of the exponential-cone solvers CLARABEL, ECOS, SCS.
    """
    phi, max_iter = _check(problem, phi, max_iter)
    ids, n = list(problem.client_ids), problem.num_clients
    budgets = budget_array(energy_budget_j, n)

    prob = _Problem(problem, budgets)
    cuts = [_CutData(problem.profile.cut(k), samples=problem.samples[0], n_clients=n, phi=phi,
                     bpe=problem.bytes_per_element, devices=prob.devices, server=prob.server, gains=prob.gains,
                     n0=prob.n0, total_bandwidth=prob.total_bandwidth, budgets=budgets)
            for k in problem.candidate_cuts]
    if not any(cd.feasible for cd in cuts):
        raise ValueError(_infeasible_message(cuts, ids, budgets))
    x_caps = {cd.k: prob.snr_caps(cd) for cd in cuts if cd.feasible}
    search = _descend(prob, cuts, x_caps, max_iter)
    return _plan(problem, prob, search, x_caps[search.best[1].k], phi, budgets)


def _plan(problem: PlanningProblem, prob: _Problem, search: "_Search", x_cap: np.ndarray, phi: float,
          budgets: Optional[np.ndarray]) -> Plan:
    """The search's cut and subchannels with the power step's powers (within the budgets),
    priced by the one price (EPSL traffic with ``phi``, the server after the clients)."""
    objective, cd, m, _ = search.best
    n, ids = problem.num_clients, list(problem.client_ids)
    program = _PowerProgram(n) if budgets is not None else None
    p, info = _power_step(prob, cd, m, x_cap, program)

    def cost_fn(powers: np.ndarray):
        draft = Plan(method="epsl", cuts=[cd.k] * n, latency_s=0.0, energy_j=0.0,
                     subchannels=[int(v) for v in m], tx_power_w=[float(v) for v in powers])
        return problem.price_plan(draft, scheme="epsl", phi=phi, server_timing=ServerTiming.AFTER_CLIENTS)

    cost, p = _respect_budgets(cost_fn, p, budgets)
    power_step = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in info.items()}
    extra = {} if math.isclose(objective, cost.round_latency_s, rel_tol=1e-9) else {"objective_latency_s": objective}
    cands = list(problem.candidate_cuts)
    return Plan(
        method="epsl",
        cuts=[cd.k] * n,
        latency_s=float(cost.round_latency_s),
        energy_j=float(cost.total_energy_j),
        subchannels=[int(v) for v in m],
        tx_power_w=[float(v) for v in p],
        server_timing=ServerTiming.AFTER_CLIENTS.value,
        scheme="epsl",
        details={
            **extra,
            "iterations": search.iterations,
            "converged": search.converged,
            "latency_history": search.history,
            "client_ids": ids,
            "phi": phi,
            "samples": problem.samples[0],
            "candidate_cuts": cands,
            "cut_latency_s": {k: search.cut_latency.get(k) for k in cands},
            **client_costs(cost),
            "broadcast_s": cost.broadcast_latency_s,
            "server_s": cost.server_latency_s,
            "energy_budget_j": None if budgets is None else budgets.tolist(),
            "budget_binding": [bool(math.isfinite(x) and pi < pm) for x, pi, pm in zip(x_cap, p, prob.pmax)],
            "solver": program.solver if program is not None else None,
            "power_step": power_step,
            "model": "one cut for all; uplink n*s*bpe bytes per client, unicast downlink (1-phi)*n*s*bpe, "
            "broadcast phi*n*s*bpe over the whole band at the weakest receiver; server backward "
            "(1-phi)*N*n + phi*n samples; parallel timing",
        },
    )


def _check(problem: PlanningProblem, phi, max_iter) -> tuple[float, int]:
    """EPSL's own conditions on the (checked) problem, and its options: ``(phi, max_iter)``."""
    if not isinstance(problem, PlanningProblem):
        raise ValueError(f"problem must be a PlanningProblem, got {type(problem).__name__}")
    if len(set(problem.samples)) != 1:
        raise ValueError(f"EPSL steps use one batch size: every client needs the same samples, got {list(problem.samples)}")
    max_iter = int_arg("max_iter", max_iter, minimum=1)
    phi = fraction_arg("phi", phi)
    channel = problem.scenario.channel
    if not channel.ofdma:
        raise ValueError(
            "EPSL assigns OFDMA subchannels: the scenario's channel needs num_subchannels and "
            "subchannel_bandwidth_hz (it has a shared band, bandwidth_hz)"
        )
    w = channel.subchannel_bandwidth_hz
    if w is None or not math.isfinite(w) or w <= 0:
        raise ValueError(f"subchannel bandwidth must be > 0 Hz, got {w}")
    if channel.num_subchannels < problem.num_clients:
        raise ValueError(
            f"EPSL gives every client at least one subchannel: {channel.num_subchannels} subchannels "
            f"for {problem.num_clients} clients"
        )
    return phi, max_iter


@dataclass
class _Search:
    """The block-coordinate descent's outcome: the best ``(latency, cut data, subchannels,
    powers)``, the best latency per pass and per cut, and how it stopped."""

    best: tuple
    history: list[float]
    cut_latency: dict[int, Optional[float]]
    converged: bool
    iterations: int


def _descend(prob: _Problem, cuts: list[_CutData], x_caps: dict[int, np.ndarray], max_iter: int) -> _Search:
    """Block-coordinate descent over the cuts (module docstring): per pass, every feasible
    candidate cut with its subchannel step and its power step; stops when a pass no longer
    improves the best latency."""
    best: Optional[tuple] = None
    history: list[float] = []
    cut_latency: dict[int, Optional[float]] = {}
    converged = False
    iterations = 0
    # The power step's answer is its closed form (module docstring), a function of (cut,
    # subchannels): the search uses it, and the convex program is solved once, for the chosen
    # cut and subchannels, to report its deviation from the closed form.
    power_memo: dict[tuple[int, bytes], np.ndarray] = {}
    greedy_memo: dict[int, np.ndarray] = {}
    for iterations in range(1, max_iter + 1):
        incumbent = None
        for cd in cuts:  # cut step: every candidate, with its subchannel and power steps
            if not cd.feasible:
                cut_latency[cd.k] = None
                continue
            if cd.k not in greedy_memo:  # a function of the cut alone: later passes reuse it
                greedy_memo[cd.k] = prob.greedy_subchannels(cd, x_caps[cd.k])
            m = greedy_memo[cd.k]
            key = (cd.k, m.tobytes())
            if key not in power_memo:
                power_memo[key] = prob.powers(m, x_caps[cd.k])
            p = power_memo[key]
            latency = float(prob.chains(cd, m, p)[3].max()) + cd.server_s
            cut_latency[cd.k] = latency
            if incumbent is None or latency < incumbent[0]:
                incumbent = (latency, cd, m, p)
        assert incumbent is not None
        history.append(incumbent[0])
        if best is not None and incumbent[0] >= best[0] * (1.0 - _REL_IMPROVE):
            converged = True
            break
        best = incumbent
    assert best is not None
    return _Search(best, history, cut_latency, converged, iterations)


def _infeasible_message(cuts: list[_CutData], ids: list[int], budgets: np.ndarray) -> str:
    """Why no candidate cut meets every budget: the clients that cannot meet theirs."""
    always = [i for i in range(len(ids)) if all(cd.short[i] for cd in cuts)]
    if always:
        parts = []
        for i in always[:5]:
            need = min(cd.compute_j[i] + cd.e0[i] for cd in cuts)
            parts.append(
                f"client {ids[i]}: budget {budgets[i]:.6g} J leaves no room to transmit: it must exceed "
                f"compute energy + least transmit energy (D*N0*ln2/g, as power -> 0) = {need:.6g} J "
                f"at its cheapest cut"
            )
        more = f" (and {len(always) - 5} more)" if len(always) > 5 else ""
        return "energy_budget_j is infeasible at every candidate cut: " + "; ".join(parts) + more
    parts = []
    for cd in cuts:
        i = int(np.argmax(cd.short))
        parts.append(f"cut {cd.k} fails client {ids[i]} (budget {budgets[i]:.6g} J)")
    return "energy_budget_j: no candidate cut meets every client's budget: " + "; ".join(parts)


def epsl_rounds(inputs: PlanInputs):
    """``flsplit plan --method epsl``: each round planned on its own channel (``--phi``,
    ``--energy-budget``)."""
    return lambda server_round: plan_epsl(inputs.problem(server_round), phi=inputs.phi,
                                          energy_budget_j=inputs.energy_budget_j)
