"""CCC's agent: ``CCCAgent`` (the Double-DQN networks, save/load) and ``train_ccc_agent`` (one job of CCC).

The algorithm is described in ``flsplit.planners.ccc``'s module docstring; the simulator it
trains on is ``flsplit.planners.ccc_env``. torch is imported only when an agent is built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np

from flsplit.planners.ccc_env import _FORMAT, _VERSION, CCCEnvironment, _FADING_STD
from flsplit.sim.checks import int_arg, real_arg, sequence_arg

__all__ = ["CCCAgent", "train_ccc_agent"]


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
        cuts = sequence_arg("candidate_cuts", candidate_cuts)
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
        self.hidden = [int_arg(f"hidden[{i}]", h, minimum=1) for i, h in enumerate(sequence_arg("hidden", hidden))]
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


_AGENT_OPTIONS = ("hidden", "gamma", "lr", "batch_size", "buffer_size", "target_sync")


def train_ccc_agent(
    env: CCCEnvironment,
    *,
    episodes: int,
    seed: int,
    eps_start: float = 1.0,
    eps_end: float = 0.05,
    eps_decay_fraction: float = 0.6,
    **agent_options: Any,
) -> CCCAgent:
    """Train a CCC agent offline on the simulator ``env``.

    Parameters
    ----------
    env : CCCEnvironment
        The simulated rounds (``CCCEnvironment(PlanningProblem.build(profile, scenario,
        samples=[n] * N, client_ids=...), min_client_depth=..., num_rounds=R,
        energy_budget_j=...)``): the clients, the candidate cuts and their mask, the reward.
    episodes : int
        Training length: episode ``e`` plays fading rounds ``e * R .. e * R + R - 1``.
    seed : int
        Seeds the weights, exploration and replay sampling (training is deterministic on the
        CPU for a seed; torch's and numpy's global random states are not used).
    eps_start, eps_end, eps_decay_fraction : float
        Epsilon decays linearly from ``eps_start`` to ``eps_end`` over that fraction of the steps.
    **agent_options
        ``hidden``, ``gamma``, ``lr``, ``batch_size``, ``buffer_size``, ``target_sync``: as in
        ``CCCAgent``.

    Returns
    -------
    CCCAgent
        With ``history["episode_return"]`` (sum of rewards per episode) and ``history["loss"]``
        (mean Huber loss per episode).

    Example::

        problem = PlanningProblem.build(profile, scenario, samples=[32] * 4)
        agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=10), episodes=200, seed=0)
    """
    if not isinstance(env, CCCEnvironment):
        raise ValueError(f"env must be a CCCEnvironment, got {type(env).__name__}")
    unknown = sorted(set(agent_options) - set(_AGENT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown agent option(s) {unknown}: choose among {list(_AGENT_OPTIONS)}")
    episodes = int_arg("episodes", episodes, minimum=1)
    seed = int_arg("seed", seed, minimum=0)
    eps_start = real_arg("eps_start", eps_start, nonnegative=True)
    eps_end = real_arg("eps_end", eps_end, nonnegative=True)
    decay = real_arg("eps_decay_fraction", eps_decay_fraction, positive=True)
    if eps_start > 1 or eps_end > 1:
        raise ValueError("eps_start and eps_end must be in [0, 1]")
    agent = CCCAgent(
        num_clients=env.num_clients, candidate_cuts=env.candidate_cuts, min_client_depth=env.min_client_depth,
        num_rounds=env.num_rounds, seed=seed, log_gain_mean=env.log_gain_mean, log_gain_scale=env.log_gain_scale,
        reward={"w_lat": env.w_lat, "w_conv": env.w_conv, "eta": env.eta, "rho": env.rho,
                "infeasible_penalty": env.infeasible_penalty},
        **agent_options,
    )
    rng = np.random.default_rng([seed, 1])
    decay_steps = max(1.0, decay * (episodes * env.num_rounds))
    step = 0
    for episode in range(episodes):
        ret, losses, step = _play_episode(env, agent, episode, rng, step,
                                          lambda t: eps_end + (eps_start - eps_end) * max(0.0, 1.0 - t / decay_steps))
        agent.history["episode_return"].append(ret)
        agent.history["loss"].append(float(np.mean(losses)) if losses else math.nan)
    return agent


def _play_episode(env: CCCEnvironment, agent: CCCAgent, episode: int, rng: np.random.Generator, step: int,
                  epsilon) -> tuple[float, list[float], int]:
    """One training episode: act epsilon-greedily (``epsilon(step)``), remember, learn.

    Returns the episode's return, its Huber losses and the global step count after it.
    """
    state = env.reset(episode)
    ret, losses = 0.0, []
    done = False
    while not done:
        action = agent.act(state, epsilon(step), rng)
        next_state, reward, done, _ = env.step(action)
        agent.remember(state, action, reward, next_state, done)
        loss = agent.learn(rng)
        if loss is not None:
            losses.append(loss)
        ret += reward
        state = next_state
        step += 1
    return ret, losses, step
