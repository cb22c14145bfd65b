"""The plan every planner returns, and the per-client numbers its ``details`` carry (one name each)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from flsplit.sim.pricing import RoundCost


@dataclass(frozen=True)
class Plan:
    """Cuts and allocations for one round, with the cost model's prediction.

    Attributes
    ----------
    method : str
        The planner that made it (``edgesplit``, ``asl``, ``epsl``, ``ccc``, ``fixed``).
    cuts : list of int
        Cut layer per client (client order of the problem).
    bandwidth_hz : list of float, optional
        Bandwidth per client, if the planner allocates a shared band.
    subchannels : list of int, optional
        OFDMA subchannels per client, if the planner assigns them.
    tx_power_w : list of float, optional
        Transmit power per client, if the planner controls it.
    server_cpu_share : list of float, optional
        Share of the server CPU per client, if the planner allocates it.
    latency_s : float
        Predicted round latency.
    energy_j : float
        Predicted device energy of the round (all clients).
    details : dict
        Planner-specific diagnostics (iterations, per-client latency, queues, ...); where a
        planner's private search objective differs from the price, its value is
        ``details["objective_latency_s"]``.
    server_timing : str
        Where the server's time goes when the plan is priced (``flsplit.sim.ServerTiming``
        value: ``"after-clients"`` or ``"per-client"``).
    scheme : str
        The scheme whose traffic model priced the plan (``psl``, ``epsl``, ``sflga``, ...;
        empty if not priced by ``flsplit.sim.price``).
    """

    method: str
    cuts: list[int]
    latency_s: float
    energy_j: float
    bandwidth_hz: Optional[list[float]] = None
    subchannels: Optional[list[int]] = None
    tx_power_w: Optional[list[float]] = None
    server_cpu_share: Optional[list[float]] = None
    details: dict = field(default_factory=dict)
    server_timing: str = "after-clients"
    scheme: str = ""

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def client_costs(cost: RoundCost) -> dict[str, list[float]]:
    """A price's per-client numbers as a plan's ``details`` name them (the same names in every planner)."""
    clients = cost.clients
    return {
        "client_latency_s": [c.latency_s for c in clients],
        "compute_s": [c.compute_latency_s for c in clients],
        "uplink_s": [c.uplink_latency_s for c in clients],
        "downlink_s": [c.downlink_latency_s for c in clients],
        "energy_per_client_j": [c.energy_j for c in clients],
    }
