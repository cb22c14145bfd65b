"""``PlanningProblem``: the checked-once description of one round that every planner solves.

A planner's arguments (profile, scenario, samples per client, client ids, round, bytes per
element, candidate cuts) are checked here, once, with a ``ValueError`` that names the
argument; the per-cut and per-client constants the planners' inner loops need are then
precomputed as read-only numpy arrays (candidate cuts along one axis, clients along the
other), so that no planner loops over clients in Python to read device profiles, and the
inner loops call the unchecked kernels of ``flsplit.sim.kernels`` on these arrays.

``price_plan`` prices a planner's plan with the one price of a round
(``flsplit.sim.price(predict_workload(...))``): what every planner reports as
``Plan.latency_s`` / ``Plan.energy_j`` (``with_price``).

Example::

    problem = PlanningProblem.build(profile, scenario, samples=[32] * 8, server_round=3)
    plan = plan_edgesplit(problem)
    cost = problem.price_plan(plan, scheme="psl", server_timing="per-client")
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from flsplit.sim.scenario import Scenario
from flsplit.sim.checks import candidate_cut_list, int_arg, real_arg, sequence_arg
from flsplit.planners.plan import Plan
from flsplit.sim.pricing import Allocation, ServerTiming, price
from flsplit.sim.traffic import ElementWire, predict_workload

if TYPE_CHECKING:  # pure: the profile is only read, torch is never imported here
    from flsplit.sim.pricing import RoundCost
    from flsplit.model.profile import ModelProfile

__all__ = ["PlanningProblem", "client_id_list", "sample_list"]


def _readonly(values, dtype=float) -> np.ndarray:
    arr = np.array(values, dtype=dtype)
    arr.setflags(write=False)
    return arr


def sample_list(samples, *, minimum: int = 1) -> list[int]:
    """Samples per client: a non-empty sequence of integers >= ``minimum`` (``samples[i]`` named)."""
    values = sequence_arg("samples", samples)
    if not values:
        raise ValueError("samples: at least one client is needed")
    return [int_arg(f"samples[{i}]", s, minimum=minimum) for i, s in enumerate(values)]


def client_id_list(client_ids, n: int) -> list[int]:
    """Client ids (default ``0 .. n-1``): ``n`` distinct integers >= 0."""
    if client_ids is None:
        return list(range(n))
    ids = sequence_arg("client_ids", client_ids)
    if len(ids) != n:
        raise ValueError(f"samples has {n} entries but client_ids has {len(ids)}")
    ids = [int_arg(f"client_ids[{i}]", c, minimum=0) for i, c in enumerate(ids)]
    if len(set(ids)) != n:
        raise ValueError(f"client_ids must be distinct, got {ids}")
    return ids


@dataclass(frozen=True, eq=False)
class PlanningProblem:
    """One round to plan, checked once, with its constants as read-only arrays.

    Build it with ``PlanningProblem.build`` (which checks); the constructor itself trusts its
    arguments. ``K`` = number of candidate cuts, ``N`` = number of clients.

    Attributes
    ----------
    profile : ModelProfile
    scenario : Scenario
    samples : tuple of int
        Samples per client this round.
    client_ids : tuple of int
        Scenario client ids (device profile and fading key), distinct.
    server_round : int
        Round number (keys the fading).
    bytes_per_element : float
        Wire bytes per smashed element.
    candidate_cuts : tuple of int
        The cuts to choose from, sorted, without repeats.
    client_fwd_flops, client_bwd_flops, server_fwd_flops, server_bwd_flops, smashed_elements : (K,) arrays
        Per sample, at each candidate cut.
    cpu_hz, flops_per_cycle, kappa, tx_power_w, gains : (N,) arrays
        Per client: device clock, FLOPs per cycle, energy coefficient, maximum uplink power,
        this round's channel gain.
    noise_psd_w_per_hz, server_flops_per_s, server_tx_power_w, total_bandwidth_hz : float
    """

    profile: "ModelProfile"
    scenario: Scenario
    samples: tuple
    client_ids: tuple
    server_round: int
    bytes_per_element: float
    candidate_cuts: tuple
    client_fwd_flops: np.ndarray
    client_bwd_flops: np.ndarray
    server_fwd_flops: np.ndarray
    server_bwd_flops: np.ndarray
    smashed_elements: np.ndarray
    cpu_hz: np.ndarray
    flops_per_cycle: np.ndarray
    kappa: np.ndarray
    tx_power_w: np.ndarray
    gains: np.ndarray
    noise_psd_w_per_hz: float
    server_flops_per_s: float
    server_tx_power_w: float
    total_bandwidth_hz: float
    weight_bytes: np.ndarray = None  # (K,) client-part bytes each way per round (0 unless include_weights)
    include_weights: bool = False

    @classmethod
    def build(
        cls,
        profile: "ModelProfile",
        scenario: Scenario,
        *,
        samples: Sequence[int],
        client_ids: Optional[Sequence[int]] = None,
        server_round: int = 0,
        bytes_per_element: float = 4.0,
        candidate_cuts: Optional[Sequence[int]] = None,
        min_samples: int = 1,
        include_weights: bool = False,
    ) -> "PlanningProblem":
        """Check the arguments (``ValueError`` naming the argument) and precompute the arrays.

        ``min_samples`` is the least sample count of a client (EdgeSplit accepts 0).
        ``include_weights``: the client part's weights travel down at round start and back
        at round end (as in a training run); the planners then count them in every client's
        traffic (``weight_bytes``), and the plan is priced with them.
        """
        if not isinstance(scenario, Scenario):
            raise ValueError(f"scenario must be a Scenario, got {type(scenario).__name__}")
        if not hasattr(profile, "blocks") or not hasattr(profile, "cut"):
            raise ValueError(f"profile must be a ModelProfile, got {type(profile).__name__}")
        samples_ = sample_list(samples, minimum=min_samples)
        ids = client_id_list(client_ids, len(samples_))
        server_round = int_arg("server_round", server_round, minimum=0)
        bpe = real_arg("bytes_per_element", bytes_per_element, positive=True)
        cands = candidate_cut_list(len(profile.blocks), candidate_cuts)
        total = scenario.channel.total_bandwidth_hz
        if total is None or not isinstance(total, numbers.Real) or not math.isfinite(total) or total <= 0:
            raise ValueError(f"bandwidth: the channel's total bandwidth must be > 0 Hz, got {total}")
        cps = [profile.cut(k) for k in cands]
        devices = scenario.devices
        devs = [devices[c % len(devices)] for c in ids]
        return cls(
            profile=profile,
            scenario=scenario,
            samples=tuple(samples_),
            client_ids=tuple(ids),
            server_round=server_round,
            bytes_per_element=bpe,
            candidate_cuts=tuple(cands),
            client_fwd_flops=_readonly([c.client_forward_flops for c in cps]),
            client_bwd_flops=_readonly([c.client_backward_flops for c in cps]),
            server_fwd_flops=_readonly([c.server_forward_flops for c in cps]),
            server_bwd_flops=_readonly([c.server_backward_flops for c in cps]),
            smashed_elements=_readonly([float(c.smashed_elements) for c in cps]),
            cpu_hz=_readonly([d.cpu_hz for d in devs]),
            flops_per_cycle=_readonly([d.flops_per_cycle for d in devs]),
            kappa=_readonly([d.kappa for d in devs]),
            tx_power_w=_readonly([d.tx_power_w for d in devs]),
            gains=_readonly(scenario.channel_gains(ids, server_round)),
            noise_psd_w_per_hz=float(scenario.channel.noise_psd_w_per_hz),
            server_flops_per_s=float(scenario.server.flops_per_s),
            server_tx_power_w=float(scenario.server.tx_power_w),
            total_bandwidth_hz=float(total),
            weight_bytes=_readonly([float(c.client_param_bytes) if include_weights else 0.0 for c in cps]),
            include_weights=bool(include_weights),
        )

    # -- derived views --

    @property
    def num_clients(self) -> int:
        return len(self.samples)

    @property
    def num_cuts(self) -> int:
        return len(self.candidate_cuts)

    @property
    def samples_array(self) -> np.ndarray:
        """Samples per client as floats, shape ``(N,)``."""
        return np.asarray(self.samples, dtype=float)

    @property
    def client_flops(self) -> np.ndarray:
        """Client forward + backward FLOPs per sample at each candidate cut, ``(K,)``."""
        return self.client_fwd_flops + self.client_bwd_flops

    @property
    def server_flops(self) -> np.ndarray:
        """Server forward + backward FLOPs per sample at each candidate cut, ``(K,)``."""
        return self.server_fwd_flops + self.server_bwd_flops

    @property
    def device_flops_per_s(self) -> np.ndarray:
        """Device speed in FLOP/s per client, ``(N,)``."""
        return self.cpu_hz * self.flops_per_cycle

    @property
    def smashed_bytes(self) -> np.ndarray:
        """Bytes of one sample's smashed data at each candidate cut, ``(K,)``."""
        return self.smashed_elements * self.bytes_per_element

    def cut_index(self, cut: int) -> int:
        """Position of ``cut`` in ``candidate_cuts``."""
        return self.candidate_cuts.index(int(cut))

    def at_round(self, server_round: int) -> "PlanningProblem":
        """The same problem in another round (new channel gains; nothing else re-checked)."""
        server_round = int_arg("server_round", server_round, minimum=0)
        if server_round == self.server_round:
            return self
        gains = _readonly(self.scenario.channel_gains(list(self.client_ids), server_round))
        return dataclasses.replace(self, server_round=server_round, gains=gains)

    def with_candidate_cuts(self, candidate_cuts: Sequence[int]) -> "PlanningProblem":
        """The same problem with other candidate cuts (checked)."""
        return PlanningProblem.build(
            self.profile, self.scenario, samples=self.samples, client_ids=self.client_ids,
            server_round=self.server_round, bytes_per_element=self.bytes_per_element,
            candidate_cuts=candidate_cuts, min_samples=0,
        )

    # -- the one price --

    def price_plan(
        self,
        plan: Plan,
        *,
        scheme: str,
        phi: float = 0.0,
        server_timing: ServerTiming = ServerTiming.AFTER_CLIENTS,
    ) -> "RoundCost":
        """``price(predict_workload(scheme, ...), scenario, Allocation.from_plan(plan), ...)``."""
        work = predict_workload(
            scheme, self.profile, cuts=plan.cuts, samples=list(self.samples), client_ids=list(self.client_ids),
            phi=phi, wire=ElementWire(self.profile, self.bytes_per_element, self.include_weights),
        )
        return price(work, self.scenario, Allocation.from_plan(plan), server_round=self.server_round,
                     server_timing=server_timing)

    def with_price(self, plan: Plan, *, report: bool = True, **pricing) -> Plan:
        """``plan`` with the one price's latency and energy, its scheme and server timing.

        ``pricing`` are ``price_plan``'s keywords (``scheme``, ``phi``, ``server_timing``).
        The planner's own (search) latency goes to ``details["objective_latency_s"]`` when it
        differs from the price by more than rounding. With ``report=False`` the plan keeps its
        own numbers and the price goes to ``details["priced_latency_s"]`` and
        ``details["priced_energy_j"]`` instead (OPEN: see ``flsplit.planners.open``).
        """
        cost = self.price_plan(plan, **pricing)
        scheme, timing = pricing["scheme"], ServerTiming(cost.server_timing)
        details = dict(plan.details)
        if report:
            if not math.isclose(plan.latency_s, cost.round_latency_s, rel_tol=1e-9):
                details["objective_latency_s"] = plan.latency_s
            latency, energy = cost.round_latency_s, cost.total_energy_j
        else:
            details["priced_latency_s"] = cost.round_latency_s
            details["priced_energy_j"] = cost.total_energy_j
            latency, energy = plan.latency_s, plan.energy_j
        return dataclasses.replace(
            plan, latency_s=float(latency), energy_j=float(energy), scheme=scheme,
            server_timing=timing.value, details=details,
        )
