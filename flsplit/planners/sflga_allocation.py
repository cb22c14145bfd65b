"""SFL-GA resource allocation for one cut: bandwidth, uplink power and device CPU frequency.

The convex sub-problem of the CCC strategy (``flsplit.planners.ccc``): for the cut chosen in
a round, allocate the band, the transmit powers and the device clocks (DVFS) so that the
round ends as early as possible, under optional per-round device energy budgets.

Round model (``flsplit.sim``, DESIGN.md 3.6; exactly ``flsplit.sim.price`` with
``bandwidth_shares=B/W``, ``tx_power_w=p``, ``broadcast_bytes`` and the devices' ``cpu_hz``
replaced by the chosen ``f``).
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

The arguments shared with the other planners (samples, client ids, round, bytes per element,
band) are checked by ``flsplit.planners.problem.PlanningProblem``; the plan's ``latency_s`` and
``energy_j`` are the one price (``flsplit.sim.price`` of ``predict_workload("sflga")`` with the
plan's bandwidths, powers and clocks, ``ServerTiming.AFTER_CLIENTS``), equal to the model above.

The allocation in three modules: the argument checks and per-cut constants
(``flsplit.planners.sflga_terms``), the solvers (``flsplit.planners.sflga_solvers``), and here
the front ``allocate_sflga`` and its plan.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from flsplit.planners.plan import Plan
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.sflga_solvers import _evaluate, _solve
from flsplit.planners.sflga_terms import _cut_terms, _CutTerms, sflga_problem
from flsplit.sim.checks import BudgetArg, budget_array
from flsplit.sim.pricing import ServerTiming

__all__ = ["allocate_sflga"]


def allocate_sflga(
    problem: PlanningProblem,
    *,
    cut: int,
    energy_budget_j: BudgetArg = None,
    solver: str = "exact",
) -> Plan:
    """Bandwidth, CPU frequency and uplink power minimising an SFL-GA round's latency at a cut.

    Parameters
    ----------
    problem : PlanningProblem
        The round, checked once (``PlanningProblem.build(profile, scenario, samples=...,
        client_ids=..., server_round=..., bytes_per_element=...)``; every client trains on at
        least one sample). The band ``channel.total_bandwidth_hz`` is shared (an OFDMA band is
        treated as continuous). The allocation's model has no weight traffic; the reported
        price counts it where the problem does (``include_weights``).
    cut : int
        The round's cut, the same for every client: one of ``problem.candidate_cuts``.
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
        A cut that is not a candidate of the problem, a client without samples, malformed
        budgets, or a budget no allocation can meet (the message names the client).

    Example::

        problem = PlanningProblem.build(profile, scenario, samples=[32] * 4, server_round=2)
        plan = allocate_sflga(problem, cut=3, energy_budget_j=0.5)
    """
    if solver not in ("exact", "cvxpy"):
        raise ValueError(f"solver must be 'exact' or 'cvxpy', got {solver!r}")
    cut = sflga_problem(problem, [cut])[0]
    budgets = budget_array(energy_budget_j, problem.num_clients, allow_unlimited=True)
    terms = _cut_terms(problem, cut, budgets)
    return _plan_from(terms, np.array(problem.gains), solver, problem=problem)


def _plan_from(terms: _CutTerms, gains: np.ndarray, solver: str, extra: Optional[dict] = None, *,
               problem: PlanningProblem) -> Plan:
    """The allocation at ``terms.cut``, as a plan priced by the one price (``problem``'s round)."""
    scenario, ids = problem.scenario, list(problem.client_ids)
    total = problem.total_bandwidth_hz
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
    plan = Plan(
        method="ccc",
        cuts=[terms.cut] * len(ids),
        latency_s=values[0],
        energy_j=values[1],
        bandwidth_hz=alloc.bandwidth.tolist(),
        tx_power_w=alloc.power.tolist(),
        details=details,
    )
    # The reported numbers: the one price (SFL-GA traffic, server after the clients; the
    # device clocks from details["cpu_hz"]), equal to the model above to rounding.
    return problem.with_price(plan, scheme="sflga", server_timing=ServerTiming.AFTER_CLIENTS)
