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
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from flsplit.sim.scenario import Scenario
from flsplit.planners.checks import budget_array, int_arg, real_arg
from flsplit.planners.plan import Plan
from flsplit.planners.problem import PlanningProblem
from flsplit.planners.sflga_allocation import (  # the allocation for a cut and its argument checks
    allocate_sflga,
    BudgetArg,
    _Infeasible,
    _cut_arg,
    _cut_terms,
    _evaluate,
    _ids_arg,
    _plan_from,
    _samples_arg,
    _sequence,
    _solve,
    _total_band,
)

if TYPE_CHECKING:
    from flsplit.profile import ModelProfile

__all__ = [
    "allocate_sflga",
    "CCCEnvironment",
    "CCCAgent",
    "CCCPlanner",
    "train_ccc_agent",
]

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


def _candidates(profile: "ModelProfile", candidate_cuts, min_client_depth) -> tuple[list[int], np.ndarray, int]:
    num_blocks = len(profile.blocks)
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s): no cut is possible")
    depth = int_arg("min_client_depth", min_client_depth, minimum=1)
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
        self.num_rounds = int_arg("num_rounds", num_rounds, minimum=1)
        self.bytes_per_element = real_arg("bytes_per_element", bytes_per_element, positive=True)
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

        self.num_clients = int_arg("num_clients", num_clients, minimum=1)
        cuts = _sequence("candidate_cuts", candidate_cuts)
        if not cuts:
            raise ValueError("candidate_cuts is empty")
        self.candidate_cuts = [int_arg(f"candidate_cuts[{i}]", k, minimum=1) for i, k in enumerate(cuts)]
        if len(set(self.candidate_cuts)) != len(self.candidate_cuts):
            raise ValueError(f"candidate_cuts must be distinct, got {self.candidate_cuts}")
        self.min_client_depth = int_arg("min_client_depth", min_client_depth, minimum=1)
        self.allowed = np.array([k >= self.min_client_depth for k in self.candidate_cuts], dtype=bool)
        if not self.allowed.any():
            raise ValueError(
                f"no candidate cut keeps min_client_depth={self.min_client_depth} blocks: {self.candidate_cuts}"
            )
        self.num_rounds = int_arg("num_rounds", num_rounds, minimum=1)
        self.hidden = [int_arg(f"hidden[{i}]", h, minimum=1) for i, h in enumerate(_sequence("hidden", hidden))]
        self.gamma = real_arg("gamma", gamma, nonnegative=True)
        if self.gamma >= 1:
            raise ValueError(f"gamma must be < 1, got {self.gamma}")
        self.lr = real_arg("lr", lr, positive=True)
        self.batch_size = int_arg("batch_size", batch_size, minimum=1)
        self.buffer_size = int_arg("buffer_size", buffer_size, minimum=1)
        self.target_sync = int_arg("target_sync", target_sync, minimum=1)
        self.seed = int_arg("seed", seed, minimum=0)
        self.log_gain_mean = real_arg("log_gain_mean", log_gain_mean)
        self.log_gain_scale = real_arg("log_gain_scale", log_gain_scale, positive=True)
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
        if num_clients is not None and int_arg("num_clients", num_clients, minimum=1) != cfg["num_clients"]:
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
    n = int_arg("num_clients", num_clients, minimum=1)
    episodes = int_arg("episodes", episodes, minimum=1)
    rounds = int_arg("rounds_per_episode", rounds_per_episode, minimum=1)
    seed = int_arg("seed", seed, minimum=0)
    eps_start = real_arg("eps_start", eps_start, nonnegative=True)
    eps_end = real_arg("eps_end", eps_end, nonnegative=True)
    decay = real_arg("eps_decay_fraction", eps_decay_fraction, positive=True)
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
        self.bytes_per_element = real_arg("bytes_per_element", bytes_per_element, positive=True)
        self.budgets = budget_array(energy_budget_j, n, allow_unlimited=True)
        self.loss_scale = None if loss_scale is None else real_arg("loss_scale", loss_scale, positive=True)
        _total_band(scenario)
        # The round's constants, checked once (the agent's cuts are the candidates).
        self.problem = PlanningProblem.build(
            profile, scenario, samples=self.samples, client_ids=self.client_ids,
            bytes_per_element=self.bytes_per_element, candidate_cuts=agent.candidate_cuts,
        )
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
                    problem=problem,
                )
            except _Infeasible as err:
                error = err
                continue
            eta, rho = a.reward.get("eta", 0.1), a.reward.get("rho", 0.5)
            self._proxy_loss = fraction * (1.0 - eta * (1.0 - rho * self._fraction[j]))
            return plan
        raise ValueError(f"round {server_round}: no allowed cut is feasible: {error}")
