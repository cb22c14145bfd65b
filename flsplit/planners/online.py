"""Planners in the loop of a training run: one plan per round, fed back with what was measured.

An ``OnlinePlanner`` turns a round's state (which devices were sampled, how many samples each
will train on, the round number that keys the channel's fading) into a ``Plan`` (cuts and
allocation) and learns from the round's measured result (``observe``). No Flower types: the
Flower side is ``flsplit.strategies.adaptive.Adaptive``, which wraps a strategy.

=========== ================================ ====================== ===================
name        planner                          scheme it plans for    server timing
=========== ================================ ====================== ===================
edgesplit   ``plan_edgesplit``               psl (per-client cuts)  per-client, full speed
asl         ``OpenPlanner`` (Lyapunov)       psl (per-client cuts)  per-client, CPU shares
epsl        ``plan_epsl``                    epsl (one cut)         after-clients
ccc         ``CCCPlanner`` (Double DQN)      sflga (one cut)        after-clients
=========== ================================ ====================== ===================

Feedback: OPEN's energy-deficit queues advance with the energy the devices actually spent
(priced from the measured workload), not the planned energy; CCC's loss feature is the
measured training loss of the previous round.

Traffic: a training round sends each client part down at its start and back at its end. The
EdgeSplit, OPEN and EPSL planners here count those weights in their models
(``PlanningProblem(include_weights=True)``), as the price of the prediction does; CCC's convex
allocation has no unicast downlink term and plans without them (its prediction is still
priced with them).
"""

from __future__ import annotations

import math
import time
from logging import WARNING
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from flwr.common.logger import log

from flsplit.sim.pricing import RoundCost
from flsplit.sim.scenario import Scenario
from flsplit.sim.checks import candidate_cut_list, cut_arg, fraction_arg, parse_budget, real_arg
from flsplit.planners.plan import Plan
from flsplit.planners.registry import planner_entry
from flsplit.sim import Allocation, ServerTiming, predict_workload, price
from flsplit.sim.traffic import ElementWire

if TYPE_CHECKING:
    from flsplit.model.profile import ModelProfile

__all__ = ["RoundPlan", "OnlinePlanner", "make_online_planner"]


@dataclass
class RoundPlan:
    """A round's plan, keyed by Flower node id, with the one price of its prediction.

    Attributes
    ----------
    server_round : int
    method : str
        The planner's name.
    nodes : list of int
        Node ids in plan order; ``client_ids[i]`` is node ``nodes[i]``'s scenario client id.
    client_ids, samples : list of int
        Per node: scenario client id, and samples it is expected to train on.
    plan : Plan
        The planner's plan (client order of ``nodes``).
    server_timing : ServerTiming
        The planner's server model, an option of the one price.
    predicted : RoundCost
        ``price`` of the predicted workload (the scheme's traffic model) with the plan's
        allocation: what the planner expects.
    planning_s : float
        Wall seconds the planner took.
    """

    server_round: int
    method: str
    nodes: list[int]
    client_ids: list[int]
    samples: list[int]
    plan: Plan
    server_timing: ServerTiming
    predicted: RoundCost
    planning_s: float
    extra: dict = field(default_factory=dict)

    @property
    def cuts(self) -> dict[int, int]:
        return {n: int(c) for n, c in zip(self.nodes, self.plan.cuts)}

    def allocation(self, nodes: Sequence[int]) -> Allocation:
        """The plan's allocation for ``nodes`` (a subset, e.g. without a dropped node), in that order."""
        index = {n: i for i, n in enumerate(self.nodes)}
        full = Allocation.from_plan(self.plan)

        def pick(values):
            return None if values is None else tuple(values[index[n]] for n in nodes)

        return Allocation(
            bandwidth_hz=pick(full.bandwidth_hz),
            subchannels=pick(full.subchannels),
            tx_power_w=pick(full.tx_power_w),
            cpu_hz=pick(full.cpu_hz),
            server_cpu_share=pick(full.server_cpu_share),
        )

    def as_record(self) -> dict:
        """The history's ``plan`` record: per node cut and allocation, prediction, planning time."""
        alloc = Allocation.from_plan(self.plan).as_dict()
        per_node = {}
        for i, n in enumerate(self.nodes):
            per_node[str(n)] = {"client_id": self.client_ids[i], "cut": int(self.plan.cuts[i]), "samples": self.samples[i]}
            for key, values in alloc.items():
                if values is not None:
                    per_node[str(n)][key] = values[i]
        return {
            "method": self.method,
            "server_round": self.server_round,
            "server_timing": self.server_timing.value,
            "nodes": per_node,
            "predicted_latency_s": self.predicted.round_latency_s,
            "predicted_energy_j": self.predicted.total_energy_j,
            "planner_latency_s": self.plan.latency_s,
            "planning_s": self.planning_s,
            **self.extra,
        }


class OnlinePlanner(ABC):
    """Base of the per-round planners (see the module docstring).

    Parameters
    ----------
    profile : ModelProfile
        The model's measured per-cut costs.
    scenario : Scenario
        Devices, server and channel (fading per round).
    bytes_per_element : float
        Wire bytes per smashed element (from the run's uplink codec).
    candidate_cuts : sequence of int, optional
        Cuts the planner may choose (default: all).
    """

    name = ""
    scheme = "psl"
    strategies: tuple[str, ...] = ("psl",)  # strategies whose rounds this planner can drive
    server_timing = ServerTiming.AFTER_CLIENTS

    def __init__(self, profile: "ModelProfile", scenario: Scenario, *, bytes_per_element: float = 4.0,
                 candidate_cuts: Optional[Sequence[int]] = None) -> None:
        self.profile = profile
        self.scenario = scenario
        self.bytes_per_element = real_arg("bytes_per_element", bytes_per_element, positive=True)
        self.candidate_cuts = candidate_cut_list(len(profile.blocks), candidate_cuts)
        self.cuts_given = candidate_cuts is not None

    @abstractmethod
    def _plan(self, scenario: Scenario, server_round: int, client_ids: list[int], samples: list[int]) -> Plan:
        """The planner's plan for this round's clients."""

    def phi(self) -> float:
        return 0.0

    def problem(self, scenario: Scenario, server_round: int, client_ids: list[int], samples: list[int]):
        """This round's checked ``PlanningProblem``, counting the client parts' weights, which
        a training round sends down and back (the planners' classic models leave them out)."""
        from flsplit.planners.problem import PlanningProblem

        return PlanningProblem.build(self.profile, scenario, samples=samples, client_ids=client_ids,
                                     server_round=server_round, bytes_per_element=self.bytes_per_element,
                                     candidate_cuts=self.candidate_cuts, include_weights=True)

    def plan(self, server_round: int, client_ids: Sequence[int], samples: Sequence[int], *,
             nodes: Optional[Sequence[int]] = None, scenario: Optional[Scenario] = None) -> RoundPlan:
        """Plan round ``server_round`` for these clients and price the prediction once."""
        scenario = scenario or self.scenario
        ids, samples = [int(c) for c in client_ids], [int(s) for s in samples]
        t0 = time.perf_counter()
        plan = self._plan(scenario, int(server_round), ids, samples)
        planning_s = time.perf_counter() - t0
        work = predict_workload(
            self.scheme, self.profile, cuts=plan.cuts, samples=samples, client_ids=ids, phi=self.phi(),
            wire=ElementWire(self.profile, self.bytes_per_element, include_weights=True),
        )
        predicted = price(work, scenario, Allocation.from_plan(plan), server_round=int(server_round),
                          server_timing=self.server_timing)
        return RoundPlan(int(server_round), self.name, list(nodes if nodes is not None else ids), ids, samples, plan,
                         self.server_timing, predicted, planning_s, extra=self.record_extra(plan))

    def record_extra(self, plan: Plan) -> dict:
        """Planner-specific fields of the history's plan record."""
        return {}

    def checkpoint_config(self) -> dict:
        """The settings a run resumed from a checkpoint of this planner must share (JSON values)."""
        return {"name": self.name, "candidate_cuts": list(self.candidate_cuts), "bytes_per_element": self.bytes_per_element}

    def checkpoint_state(self) -> dict:
        """What the planner carries from one round to the next (JSON values; none here)."""
        return {}

    def restore_state(self, state: dict) -> None:
        """Take back what ``checkpoint_state`` returned."""

    def observe(self, server_round: int, client_ids: Sequence[int], energy_j: Sequence[float],
                train_loss: Optional[float]) -> dict:
        """Feed back a finished round (per client the device energy spent; the training loss).

        Returns fields to add to the history's plan record.
        """
        return {}


class EdgeSplitOnline(OnlinePlanner):
    """EdgeSplit every round: a cut and a bandwidth share per client (PSL, heterogeneous cuts)."""

    name = "edgesplit"
    strategies = ("psl", "sflv1", "sflv2")
    server_timing = ServerTiming.PER_CLIENT  # EdgeSplit's model: a full-speed server worker per client

    def _plan(self, scenario, server_round, client_ids, samples):
        from flsplit.planners.edgesplit import plan_edgesplit

        return plan_edgesplit(self.problem(scenario, server_round, client_ids, samples))


def _per_client_budget(budget: Union[None, float, list[float]], client_ids: Sequence[int]) -> Optional[list[float]]:
    """Budgets of these clients: one for all, or the list indexed by client id (cycled)."""
    if budget is None:
        return None
    if isinstance(budget, float):
        return [budget] * len(client_ids)
    return [budget[c % len(budget)] for c in client_ids]


class OpenOnline(OnlinePlanner):
    """ASL/OPEN every round: cuts and server CPU shares under long-term per-device energy budgets.

    The energy-deficit queue of each device (by scenario client id) advances with the energy
    it actually spent in the round: ``Q <- max(Q + E_measured - budget, 0)``. Default budgets:
    each device's energy at the best fixed cut of its first round (the comparison "under the
    same budgets" of the paper).
    """

    name = "asl"
    strategies = ("psl", "sflv1", "sflv2")
    server_timing = ServerTiming.PER_CLIENT

    def __init__(self, profile, scenario, *, V: float = 0.01, energy_budget_j=None, **kwargs) -> None:
        super().__init__(profile, scenario, **kwargs)
        self.V = real_arg("V", V, nonnegative=True)
        self.energy_budget = parse_budget(energy_budget_j)
        self.budgets: dict[int, float] = {}
        self.queues: dict[int, float] = {}
        self.warned: set[int] = set()

    def _budgets_for(self, scenario, server_round, client_ids, samples) -> list[float]:
        explicit = _per_client_budget(self.energy_budget, client_ids)
        if explicit is not None:
            for c, b in zip(client_ids, explicit):
                self.budgets.setdefault(c, b)
        new = [i for i, c in enumerate(client_ids) if c not in self.budgets]
        if new:
            from flsplit.planners.fixed import best_fixed_cut
            from flsplit.planners.problem import PlanningProblem

            # The baseline's classic model: smashed data only (the weights are priced below).
            base = best_fixed_cut(PlanningProblem.build(self.profile, scenario, samples=samples, client_ids=client_ids,
                                                        server_round=server_round,
                                                        bytes_per_element=self.bytes_per_element,
                                                        candidate_cuts=self.candidate_cuts))
            # The baseline's energy as a training round spends it (client-part weights included).
            work = predict_workload(self.scheme, self.profile, cuts=base.cuts, samples=samples, client_ids=client_ids,
                                    wire=ElementWire(self.profile, self.bytes_per_element, include_weights=True))
            energy = [c.energy_j for c in price(work, scenario, server_round=server_round).clients]
            for i in new:
                self.budgets[client_ids[i]] = float(energy[i])
        return [self.budgets[c] for c in client_ids]

    def _plan(self, scenario, server_round, client_ids, samples):
        from flsplit.planners.open import OpenPlanner

        budgets = self._budgets_for(scenario, server_round, client_ids, samples)
        planner = OpenPlanner(
            self.problem(scenario, server_round, client_ids, samples),
            energy_budget_j=budgets, V=self.V, initial_queues=[self.queues.get(c, 0.0) for c in client_ids],
        )
        # A budget below every cut's energy can only be exceeded: say so (once per device).
        least = planner.round_terms(server_round)["energy_j"].min(axis=1)
        for c, e, b in zip(client_ids, least, budgets):
            if e > b and c not in self.warned:
                self.warned.add(c)
                log(WARNING, "[flsplit] OPEN: client %d's energy budget %.4g J is below its cheapest cut's "
                    "%.4g J in round %d: its queue can only grow", c, b, e, server_round)
        return planner.plan(server_round)

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "V": self.V, "energy_budget": self.energy_budget}

    def checkpoint_state(self) -> dict:
        # budgets are fixed at a device's first round, queues advance every round
        return {"budgets": {str(c): b for c, b in self.budgets.items()},
                "queues": {str(c): q for c, q in self.queues.items()}, "warned": sorted(self.warned)}

    def restore_state(self, state: dict) -> None:
        self.budgets = {int(c): float(b) for c, b in state["budgets"].items()}
        self.queues = {int(c): float(q) for c, q in state["queues"].items()}
        self.warned = {int(c) for c in state["warned"]}

    def record_extra(self, plan: Plan) -> dict:
        ids = plan.details["client_ids"]
        return {"V": self.V, "energy_budget_j": [self.budgets[c] for c in ids],
                "queues_before": [self.queues.get(c, 0.0) for c in ids]}

    def observe(self, server_round, client_ids, energy_j, train_loss):
        after = []
        for c, e in zip(client_ids, energy_j):
            q = max(self.queues.get(c, 0.0) + float(e) - self.budgets[c], 0.0)
            self.queues[c] = q
            after.append(q)
        return {"queues_after": after, "measured_energy_j": [float(e) for e in energy_j]}


class EPSLOnline(OnlinePlanner):
    """EPSL's resource management every round: one cut, OFDMA subchannels, uplink powers."""

    name = "epsl"
    scheme = "epsl"
    strategies = ("epsl",)

    def __init__(self, profile, scenario, *, phi: float = 0.5, energy_budget_j=None, **kwargs) -> None:
        super().__init__(profile, scenario, **kwargs)
        self._phi = fraction_arg("phi", phi)
        if not scenario.channel.ofdma:
            raise ValueError("planner 'epsl' assigns OFDMA subchannels: the scenario needs num-subchannels "
                             "and subchannel-bandwidth-hz (it has a shared band)")
        self.energy_budget = parse_budget(energy_budget_j)

    def phi(self) -> float:
        return self._phi

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "phi": self._phi, "energy_budget": self.energy_budget}

    def _plan(self, scenario, server_round, client_ids, samples):
        from flsplit.planners.epsl import plan_epsl

        # EPSL steps use one batch size: every client is planned at the largest sample count.
        problem = self.problem(scenario, server_round, client_ids, [max(samples)] * len(client_ids))
        return plan_epsl(problem, phi=self._phi, energy_budget_j=_per_client_budget(self.energy_budget, client_ids))


class CCCOnline(OnlinePlanner):
    """SFL-GA's CCC every round: the trained Double-DQN agent's cut, then the convex allocation.

    The agent is trained before the run (``flsplit plan --method ccc --train-agent``) and
    loaded from ``agent_path``; it must fit the run (its candidate cuts are cuts of this model;
    its number of clients equals the clients sampled per round, checked at the first round).
    """

    name = "ccc"
    scheme = "sflga"
    strategies = ("sflga",)

    def __init__(self, profile, scenario, *, agent_path: str = "", energy_budget_j=None, **kwargs) -> None:
        super().__init__(profile, scenario, **kwargs)
        from flsplit.planners.ccc import CCCAgent

        if not agent_path:
            raise ValueError("planner 'ccc' needs a trained agent: train one with "
                             "'flsplit plan --method ccc --train-agent --agent PATH' and set planner-agent")
        self.agent = CCCAgent.load(agent_path)
        for k in self.agent.candidate_cuts:
            cut_arg(f"the CCC agent at {agent_path} was trained for cut", k, len(profile.blocks))
        if self.cuts_given and sorted(self.agent.candidate_cuts) != self.candidate_cuts:
            raise ValueError(f"the CCC agent at {agent_path} chooses among cuts {sorted(self.agent.candidate_cuts)}, "
                             f"not the run's candidate cuts {self.candidate_cuts}: retrain it with those cuts")
        self.energy_budget = parse_budget(energy_budget_j)
        self._planner = None
        self._key: Optional[tuple] = None
        self._loss: Optional[float] = None
        self._resumed: Optional[dict] = None  # a checkpoint's planner state, taken up by the next plan

    def check_clients(self, num_clients: int) -> None:
        if num_clients != self.agent.num_clients:
            raise ValueError(f"the CCC agent was trained for {self.agent.num_clients} clients per round, "
                             f"but this run samples {num_clients}: retrain it with --clients {num_clients}")

    def _plan(self, scenario, server_round, client_ids, samples):
        from flsplit.planners.ccc import CCCPlanner
        from flsplit.planners.problem import PlanningProblem

        self.check_clients(len(client_ids))
        key = (tuple(client_ids), tuple(samples), id(scenario))
        if self._planner is None or key != self._key:
            resumed, self._resumed = self._resumed, None
            scale = self._planner.loss_scale if self._planner is not None else (resumed or {}).get("loss_scale")
            # CCC's allocation has no weight traffic: its problem leaves the weights out.
            problem = PlanningProblem.build(self.profile, scenario, samples=samples, client_ids=client_ids,
                                            server_round=server_round, bytes_per_element=self.bytes_per_element,
                                            candidate_cuts=self.agent.candidate_cuts)
            self._planner = CCCPlanner(self.agent, problem, loss_scale=scale,
                                       energy_budget_j=_per_client_budget(self.energy_budget, client_ids))
            if resumed is not None and resumed["clients"] == [list(client_ids), list(samples)]:
                self._planner._proxy_loss = resumed["proxy_loss"]  # the saved planner would have been kept
            self._key = key
        return self._planner.plan(server_round, recent_loss=self._loss)

    def checkpoint_config(self) -> dict:
        import hashlib

        # the agent itself, not its path: a retrained agent plans differently
        weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in self.agent.online.state_dict().values()))
        return {**super().checkpoint_config(), "energy_budget": self.energy_budget,
                "agent": {**self.agent.config, "weights_sha256": weights.hexdigest()[:16]}}

    def checkpoint_state(self) -> dict:
        planner = self._planner
        return {
            "loss": self._loss,
            "loss_scale": planner.loss_scale if planner is not None else None,
            "proxy_loss": planner._proxy_loss if planner is not None else None,
            "clients": [list(self._key[0]), list(self._key[1])] if self._key is not None else None,
        }

    def restore_state(self, state: dict) -> None:
        self._loss = state["loss"]
        self._resumed = state if state["clients"] is not None else None

    def record_extra(self, plan: Plan) -> dict:
        return {"recent_loss": self._loss, "q_values": plan.details.get("q_values")}

    def observe(self, server_round, client_ids, energy_j, train_loss):
        if train_loss is not None and math.isfinite(train_loss):
            self._loss = float(train_loss)
        return {}


def make_online_planner(name: str, profile: "ModelProfile", scenario: Scenario, **knobs: Any) -> OnlinePlanner:
    """The online planner called ``name`` (its class from the one registry,
    ``flsplit.planners.registry``) with its knobs (a clear error for unknown ones)."""
    return planner_entry(name, online=True).online_class()(profile, scenario, **knobs)
