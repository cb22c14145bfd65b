"""CCC: SFL-GA's cut chosen every round by a Double-DQN agent, resources by a convex program.

SFL-GA (DESIGN.md 2, item 4) is split federated learning in which the server averages the
clients' cut-layer gradients (weighted by batch share) and *broadcasts* the single aggregate
(``flsplit.strategies.sflga``). All clients share one cut per round. The CCC strategy re-chooses that
cut every round with a Double-DQN agent that sees the channel; for the chosen cut, bandwidth,
device CPU frequency (DVFS) and uplink power are allocated by convex optimisation. Smaller
client parts converge better under gradient aggregation but leak more about the raw data, so
a minimum client depth (``min_client_depth`` blocks on the device) is a privacy bound that the
agent can never violate.

The allocation for a chosen cut is ``flsplit.planners.sflga_allocation.allocate_sflga``
(its module docstring gives the round model and the exact solution).

CCC in three modules, one job each: the simulator ``CCCEnvironment``
(``flsplit.planners.ccc_env``), the agent ``CCCAgent`` and ``train_ccc_agent``
(``flsplit.planners.ccc_agent``), and here the per-round planner ``CCCPlanner``; all of them
are importable from here and from ``flsplit.planners``.

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

from typing import Optional

import numpy as np

from flsplit.planners.ccc_agent import CCCAgent, train_ccc_agent
from flsplit.planners.ccc_env import CCCEnvironment, _client_fraction, _state_vector
from flsplit.planners.plan import Plan
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.registry import PlanInputs
from flsplit.planners.sflga_allocation import _plan_from, allocate_sflga
from flsplit.planners.sflga_terms import _cut_terms, _Infeasible, sflga_problem
from flsplit.sim.checks import BudgetArg, budget_array, cut_arg, int_arg, real_arg

__all__ = [
    "allocate_sflga",
    "CCCEnvironment",
    "CCCAgent",
    "CCCPlanner",
    "train_ccc_agent",
    "ccc_rounds",
]


# --- the planner -----------------------------------------------------------------------------


class CCCPlanner:
    """Per-round SFL-GA plans: the agent's greedy cut, then ``allocate_sflga``'s allocation.

    Parameters
    ----------
    agent : CCCAgent
        A trained agent for ``problem.num_clients`` clients.
    problem : PlanningProblem
        The clients to plan, checked once, with the agent's cuts as its candidates
        (``PlanningProblem.build(profile, scenario, samples=..., client_ids=...,
        bytes_per_element=..., candidate_cuts=agent.candidate_cuts)``); its ``server_round``
        is ignored: ``plan`` takes the round.
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
        problem: PlanningProblem,
        *,
        energy_budget_j: BudgetArg = None,
        loss_scale: Optional[float] = None,
    ) -> None:
        if not isinstance(agent, CCCAgent):
            raise ValueError(f"agent must be a CCCAgent, got {type(agent).__name__}")
        sflga_problem(problem, [])
        n = problem.num_clients
        if n != agent.num_clients:
            raise ValueError(f"the agent was trained for {agent.num_clients} clients, got samples for {n}")
        num_blocks = len(problem.profile.blocks)
        for k in agent.candidate_cuts:
            cut_arg("the agent's candidate cut", k, num_blocks)
        if list(problem.candidate_cuts) != sorted(agent.candidate_cuts):
            raise ValueError(f"the problem's candidate cuts {list(problem.candidate_cuts)} are not the agent's "
                             f"{sorted(agent.candidate_cuts)}: build it with candidate_cuts=agent.candidate_cuts")
        self.budgets = budget_array(energy_budget_j, n, allow_unlimited=True)
        self.loss_scale = None if loss_scale is None else real_arg("loss_scale", loss_scale, positive=True)
        self.problem = problem
        self.agent = agent
        self.samples, self.client_ids = list(problem.samples), list(problem.client_ids)
        self._terms = {j: _cut_terms(problem, k, self.budgets)
                       for j, k in enumerate(agent.candidate_cuts) if agent.allowed[j]}
        self._fraction = [_client_fraction(problem.profile, k) for k in agent.candidate_cuts]
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
        server_round = int_arg("server_round", server_round, minimum=0)
        if recent_loss is not None:
            loss = real_arg("recent_loss", recent_loss, nonnegative=True)
            if self.loss_scale is None:
                self.loss_scale = loss if loss > 0 else 1.0
            fraction = loss / self.loss_scale
        else:
            fraction = self._proxy_loss
        problem = self.problem.at_round(server_round)
        gains = np.array(problem.gains)
        a = self.agent
        state = _state_vector(gains, server_round, fraction, a.log_gain_mean, a.log_gain_scale, a.num_rounds)
        q = a.q_values(state)
        order = [j for j in np.argsort(-q, kind="stable") if a.allowed[j]]
        error: Optional[ValueError] = None
        for rank, j in enumerate(order):
            try:
                plan = _plan_from(
                    self._terms[j], gains, "exact",
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
                    problem=problem,
                )
            except _Infeasible as err:
                error = err
                continue
            eta, rho = a.reward.get("eta", 0.1), a.reward.get("rho", 0.5)
            self._proxy_loss = fraction * (1.0 - eta * (1.0 - rho * self._fraction[j]))
            return plan
        raise ValueError(f"round {server_round}: no allowed cut is feasible: {error}")


def ccc_rounds(inputs: PlanInputs):
    """``flsplit plan --method ccc``: the trained agent at ``--agent`` picks each round's cut
    (``--energy-budget``)."""
    if inputs.agent_path is None:
        raise ValueError("--method ccc needs a trained agent: --agent PATH (train one with --train-agent)")
    agent = CCCAgent.load(inputs.agent_path)
    problem = inputs.problem(candidate_cuts=agent.candidate_cuts)
    return CCCPlanner(agent, problem, energy_budget_j=inputs.energy_budget_j).plan
