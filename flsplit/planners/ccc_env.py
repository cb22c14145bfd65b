"""CCC's simulator: ``CCCEnvironment``, the SFL-GA rounds the agent is trained on (one job of CCC).

The state, the action, the reward and the episode are described in ``flsplit.planners.ccc``'s
module docstring; the agent is ``flsplit.planners.ccc_agent``, the per-round planner
``flsplit.planners.ccc``. Pure (numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.sim.scenario import Scenario
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.sflga_solvers import _evaluate, _solve
from flsplit.planners.sflga_terms import _cut_terms, _Infeasible, sflga_problem
from flsplit.sim.checks import BudgetArg, budget_array, int_arg, real_arg

if TYPE_CHECKING:
    from flsplit.model.profile import ModelProfile

__all__ = ["CCCEnvironment"]

_EULER_GAMMA = 0.5772156649015329
_FADING_STD = math.pi / math.sqrt(6.0)  # std of ln X, X ~ Exp(1)
_FORMAT = "flsplit.ccc-agent"
_VERSION = 1


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


def _allowed(cands: Sequence[int], num_blocks: int, min_client_depth) -> tuple[np.ndarray, int]:
    """The action mask of the privacy bound: cuts that keep ``min_client_depth`` blocks on the client."""
    depth = int_arg("min_client_depth", min_client_depth, minimum=1)
    if depth > num_blocks - 1:
        raise ValueError(
            f"min_client_depth={depth} is beyond the model: the client can keep at most {num_blocks - 1} "
            f"of its {num_blocks} blocks"
        )
    allowed = np.array([k >= depth for k in cands], dtype=bool)
    if not allowed.any():
        raise ValueError(f"no candidate cut keeps min_client_depth={depth} blocks on the client: {list(cands)}")
    return allowed, depth


class CCCEnvironment:
    """Simulator of SFL-GA rounds for training the CCC agent (module docstring).

    Parameters
    ----------
    problem : PlanningProblem
        The clients (samples per round, scenario client ids: device profile and fading key),
        the bytes per element and the actions (``candidate_cuts``), checked once; its
        ``server_round`` is not used (the scenario's seed keys the fading of every simulated
        round, see ``fading_key``).
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
        problem: PlanningProblem,
        *,
        min_client_depth: int = 1,
        num_rounds: int = 20,
        energy_budget_j: BudgetArg = None,
        w_lat: float = 1.0,
        w_conv: float = 1.0,
        eta: float = 0.1,
        rho: float = 0.5,
        infeasible_penalty: float = 10.0,
    ) -> None:
        self.candidate_cuts = sflga_problem(problem, problem.candidate_cuts)
        profile, scenario = problem.profile, problem.scenario
        self.problem = problem
        self.samples, self.client_ids = list(problem.samples), list(problem.client_ids)
        n = self.num_clients = len(self.samples)
        self.num_actions = len(self.candidate_cuts)
        self.state_dim = n + 2  # the state: N log gains, the round fraction, the loss fraction
        self.allowed, self.min_client_depth = _allowed(self.candidate_cuts, len(profile.blocks), min_client_depth)
        self.num_rounds = int_arg("num_rounds", num_rounds, minimum=1)
        self.bytes_per_element = problem.bytes_per_element
        self.budgets = budget_array(energy_budget_j, n, allow_unlimited=True)
        self.w_lat = real_arg("w_lat", w_lat, nonnegative=True)
        self.w_conv = real_arg("w_conv", w_conv, nonnegative=True)
        if self.w_lat == 0 and self.w_conv == 0:
            raise ValueError("w_lat and w_conv are both 0: the reward would be constant")
        self.eta = real_arg("eta", eta, positive=True)
        if self.eta >= 1:
            raise ValueError(f"eta must be < 1, got {self.eta}")
        self.rho = real_arg("rho", rho, nonnegative=True)
        if self.rho > 1:
            raise ValueError(f"rho must be <= 1, got {self.rho}")
        self.infeasible_penalty = real_arg("infeasible_penalty", infeasible_penalty, positive=True)
        self.profile = profile
        self.scenario = scenario
        self.total = problem.total_bandwidth_hz
        self.n0 = scenario.channel.noise_psd_w_per_hz
        self.terms = [_cut_terms(problem, k, self.budgets) for k in self.candidate_cuts]
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
        self.episode = int_arg("episode", episode, minimum=0)
        self.round_index = 0
        self.loss = 1.0
        self.key = self.fading_key(self.episode, 0)
        return self.state()

    def _check_action(self, action) -> int:
        a = int_arg("action", action, minimum=0)
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
