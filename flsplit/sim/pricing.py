"""The one price of a round: a ``RoundWorkload`` plus an allocation -> latency and energy.

Every number flsplit reports for a round goes through ``price``: the training runtime's
``sim`` record (a measured workload, priced with the round's plan), every planner's reported
``latency_s`` / ``energy_j`` (a predicted workload), ``flsplit plan`` and the reports.
Planners may search with private objectives; what they report and what is compared is this.

The model (DESIGN.md 3.6), per client ``i``:

* compute ``F_i / (f_i c_i)`` seconds and ``kappa_i f_i^2 F_i / c_i`` joules, at the device's
  clock ``f_i`` or the allocation's ``cpu_hz`` (DVFS, at most the device's clock);
* uplink ``8 U_i / r_up`` with ``r_up = B_i log2(1 + p_i g_i / (B_i N0))`` at the device's power
  ``p_i`` (or the allocation's), downlink ``8 D_i / r_down`` at the
  server's power over the same ``B_i``; ``B_i``: the allocation's bandwidth or subchannels,
  else an equal split (the whole band per turn for sequential timing);
* a broadcast of ``X`` bytes: ``8 X / min_i r_i`` over the whole band (the weakest receiver);
* energy: compute energy plus ``p_i x uplink time`` (receiving is not counted).

The clients' chains (compute + uplink + downlink + broadcast) combine by the workload's
timing rule (``parallel``: the slowest; ``sequential``: the sum, the broadcast counted once),
and the server's time is placed by the **server timing** option:

``ServerTiming.AFTER_CLIENTS`` (default, "the common model")
    the server computes all its FLOPs at full speed after the clients' chains.
``ServerTiming.PER_CLIENT`` (the model of EdgeSplit and ASL/OPEN)
    each client's share of the server work (``ClientWork.server_flops``) runs as soon as its
    data arrive, at its share ``s_i`` of the server CPU (``server_cpu_share``; default 1, i.e.
    a server worker at full speed per client, EdgeSplit's assumption), inside that client's
    chain; work not attributed to a client comes after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Optional

import numpy as np

from flsplit.sim import kernels as k
from flsplit.sim.checks import column_arg
from flsplit.sim.scenario import Scenario
from flsplit.sim.workload import RoundWorkload, Timing

__all__ = ["ServerTiming", "Allocation", "ClientCost", "RoundCost", "price", "price_totals"]


class ServerTiming(str, Enum):
    """Where the server's compute time goes in the round (see the module docstring)."""

    AFTER_CLIENTS = "after-clients"
    PER_CLIENT = "per-client"


@dataclass(frozen=True)
class Allocation:
    """Radio and compute resources of a round, per client (client order of the workload).

    All fields are optional; a missing one takes the default (an equal split of the band,
    each device at its maximum power and clock, the server's whole CPU per client).

    Attributes
    ----------
    bandwidth_hz : sequence of float, optional
        Bandwidth per client in Hz (summing to at most the band).
    subchannels : sequence of int, optional
        OFDMA subchannels per client (instead of ``bandwidth_hz``).
    tx_power_w : sequence of float, optional
        Uplink power per client (default the device's ``tx_power_w``).
    cpu_hz : sequence of float, optional
        Device clock per client (DVFS; at most the device's ``cpu_hz``).
    server_cpu_share : sequence of float, optional
        Share of the server CPU per client (summing to at most 1), for
        ``ServerTiming.PER_CLIENT``.
    """

    bandwidth_hz: Optional[tuple[float, ...]] = None
    subchannels: Optional[tuple[int, ...]] = None
    tx_power_w: Optional[tuple[float, ...]] = None
    cpu_hz: Optional[tuple[float, ...]] = None
    server_cpu_share: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.bandwidth_hz is not None and self.subchannels is not None:
            raise ValueError("give bandwidth_hz or subchannels, not both")
        for name in ("bandwidth_hz", "subchannels", "tx_power_w", "cpu_hz", "server_cpu_share"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) if name != "subchannels" else v for v in value))

    @classmethod
    def from_plan(cls, plan: Any) -> "Allocation":
        """The allocation a ``flsplit.planners.Plan`` carries (its CPU clocks from ``details``)."""
        cpu = (plan.details or {}).get("cpu_hz")
        return cls(
            bandwidth_hz=plan.bandwidth_hz,
            subchannels=plan.subchannels,
            tx_power_w=plan.tx_power_w,
            cpu_hz=cpu,
            server_cpu_share=plan.server_cpu_share,
        )

    def as_dict(self) -> dict:
        return {k_: (list(v) if v is not None else None) for k_, v in asdict(self).items()}


# --- the price's result types ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCost:
    """Simulated cost of one client in one round (seconds, joules, bytes, bit/s, Hz).

    ``downlink_latency_s`` covers the unicast downlink plus the broadcast if the client
    receives one; ``latency_s`` is the client's chain: compute + uplink + downlink.
    """

    client_id: int
    flops: float
    uplink_bytes: float
    downlink_bytes: float
    bandwidth_hz: float
    channel_gain: float
    uplink_rate_bps: float
    downlink_rate_bps: float
    compute_latency_s: float
    uplink_latency_s: float
    downlink_latency_s: float
    latency_s: float
    compute_energy_j: float
    transmit_energy_j: float
    energy_j: float
    server_latency_s: float = 0.0
    cpu_hz: float = 0.0
    tx_power_w: float = 0.0

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class RoundCost:
    """Simulated cost of one round.

    ``round_latency_s`` follows the timing rule: ``"parallel"``: the largest client
    ``latency_s`` plus ``server_latency_s``; ``"sequential"``: the sum of the clients' chains
    (the broadcast, if any, counted once) plus ``server_latency_s``. ``total_energy_j`` is the
    devices' energy (the server's is not counted).
    """

    server_round: int
    timing: str
    clients: tuple[ClientCost, ...]
    server_flops: float
    server_latency_s: float
    broadcast_bytes: float
    broadcast_latency_s: float
    round_latency_s: float
    total_energy_j: float
    server_timing: str = "after-clients"

    def as_dict(self) -> dict:
        """Plain dict for JSON (clients as a list of dicts)."""
        d = asdict(self)
        d["clients"] = [c.as_dict() for c in self.clients]
        return d


def price(
    workload: RoundWorkload,
    scenario: Scenario,
    allocation: Optional[Allocation] = None,
    *,
    server_round: int = 0,
    server_timing: ServerTiming = ServerTiming.AFTER_CLIENTS,
) -> RoundCost:
    """Latency and energy of ``workload`` on ``scenario`` with ``allocation``.

    Parameters
    ----------
    workload : RoundWorkload
        The round's work (predicted or measured).
    scenario : Scenario
        Devices, server and channel.
    allocation : Allocation, optional
        Per-client resources; default an equal split at maximum power and clock.
    server_round : int
        Round number (keys the fading).
    server_timing : ServerTiming
        Where the server's time goes (module docstring).

    Returns
    -------
    RoundCost
        Per-client costs, the server's time, the round latency and the devices' energy.

    Raises
    ------
    ValueError
        An allocation of the wrong length, over the band, above a device's clock,
        a client with bytes to send and no bandwidth, or a bad server timing.

    Examples
    --------
    >>> work = predict_workload("psl", profile, cuts=[2, 2], samples=[64, 64])  # doctest: +SKIP
    >>> price(work, scenario, Allocation(bandwidth_hz=[5e6, 15e6])).round_latency_s  # doctest: +SKIP
    """
    cols = _price_columns(workload, scenario, allocation, server_round=server_round, server_timing=server_timing)
    ids, n = cols["client_ids"], len(cols["client_ids"])
    costs = tuple(
        ClientCost(
            client_id=int(ids[i]),
            flops=float(cols["flops"][i]),
            uplink_bytes=float(cols["up_bytes"][i]),
            downlink_bytes=float(cols["down_bytes"][i]),
            bandwidth_hz=float(cols["bandwidth"][i]),
            channel_gain=float(cols["gains"][i]),
            uplink_rate_bps=float(cols["up_rate"][i]),
            downlink_rate_bps=float(cols["down_rate"][i]),
            compute_latency_s=float(cols["compute"][i]),
            uplink_latency_s=float(cols["up_time"][i]),
            downlink_latency_s=float(cols["down_total"][i]),
            latency_s=float(cols["chains"][i]),
            compute_energy_j=float(cols["compute_energy"][i]),
            transmit_energy_j=float(cols["transmit_energy"][i]),
            energy_j=float(cols["energy"][i]),
            server_latency_s=float(cols["own_server"][i]),
            cpu_hz=float(cols["cpu"][i]),
            tx_power_w=float(cols["power"][i]),
        )
        for i in range(n)
    )
    return RoundCost(
        server_round=int(server_round),
        timing=workload.timing.value,
        clients=costs,
        server_flops=float(workload.server_flops),
        server_latency_s=cols["server_time"],
        broadcast_bytes=float(workload.broadcast_bytes),
        broadcast_latency_s=cols["broadcast"],
        round_latency_s=cols["round_latency_s"],
        total_energy_j=cols["total_energy_j"],
        server_timing=ServerTiming(server_timing).value,
    )


def price_totals(workload: RoundWorkload, scenario: Scenario, allocation: Optional[Allocation] = None,
                 **options) -> tuple[float, float]:
    """``price``'s round latency and total device energy alone (no per-client records):
    the same arithmetic, for searches that price many candidates. ``options`` are
    ``price``'s keywords (``server_round``, ``server_timing``)."""
    cols = _price_columns(workload, scenario, allocation, **options)
    return cols["round_latency_s"], cols["total_energy_j"]


def _price_columns(workload: RoundWorkload, scenario: Scenario, allocation: Optional[Allocation], *,
                   server_round: int = 0, server_timing: ServerTiming = ServerTiming.AFTER_CLIENTS) -> dict:
    """The price's arithmetic on columns: arguments checked once, then the kernels."""
    try:
        server_timing = ServerTiming(server_timing)
    except ValueError:
        raise ValueError(f"server_timing must be one of {[t.value for t in ServerTiming]}, got {server_timing!r}") from None
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"server_round must be a non-negative integer, got {server_round!r}")
    ids = workload.client_ids
    n = len(ids)
    dev = scenario.device_columns(ids)
    channel = scenario.channel
    sequential = workload.timing == Timing.SEQUENTIAL
    power, cpu, bandwidth, shares = _allocation_columns(allocation or Allocation(), scenario, ids, dev, sequential)

    # -- the kernels, vectorised --
    flops, up_bytes, down_bytes = workload.flops, workload.uplink_bytes, workload.downlink_bytes
    starved = (bandwidth == 0) & ((up_bytes > 0) | (down_bytes > 0))
    if starved.any():
        raise ValueError(f"client {ids[int(np.argmax(starved))]} has bytes to transfer but no bandwidth")
    gains = scenario.channel_gains(ids.tolist(), int(server_round))
    n0 = channel.noise_psd_w_per_hz
    p_server = scenario.server.tx_power_w
    up_rate = k.rate_bps(bandwidth, k.snr_per_hz(power, gains, n0))
    down_rate = k.rate_bps(bandwidth, k.snr_per_hz(p_server, gains, n0))
    up_time = k.transfer_s(up_bytes, up_rate)
    down_time = k.transfer_s(down_bytes, down_rate)
    if not (np.all(np.isfinite(up_time)) and np.all(np.isfinite(down_time))):
        raise ValueError("a payload cannot be sent at rate 0 (no bandwidth or no power on the link)")
    compute = k.compute_s(flops, cpu, dev["flops_per_cycle"])
    compute_energy = k.compute_energy_j(flops, cpu, dev["flops_per_cycle"], dev["kappa"])
    transmit_energy = power * up_time

    receivers = workload.receives_broadcast
    broadcast = 0.0
    if workload.broadcast_bytes > 0:
        weakest = float(k.rate_bps(channel.total_bandwidth_hz, k.snr_per_hz(p_server, gains[receivers], n0)).min())
        broadcast = float(k.transfer_s(workload.broadcast_bytes, weakest))
        if not math.isfinite(broadcast):
            raise ValueError("the broadcast cannot be sent at rate 0")
    down_total = down_time + np.where(receivers, broadcast, 0.0)

    own_server, server_time = _server_times(workload, scenario.server.flops_per_s, shares, server_timing)
    chains = compute + up_time + own_server + down_total
    if sequential:
        clients_time = float(chains.sum()) - broadcast * max(int(receivers.sum()) - 1, 0)
    else:
        clients_time = float(chains.max()) if n else 0.0
    energy = compute_energy + transmit_energy
    return {
        "client_ids": ids, "flops": flops, "up_bytes": up_bytes, "down_bytes": down_bytes, "bandwidth": bandwidth,
        "gains": gains, "up_rate": up_rate, "down_rate": down_rate, "compute": compute, "up_time": up_time,
        "down_total": down_total, "chains": chains, "compute_energy": compute_energy,
        "transmit_energy": transmit_energy, "energy": energy, "own_server": own_server, "cpu": cpu, "power": power,
        "server_time": server_time, "broadcast": broadcast, "round_latency_s": clients_time + server_time,
        "total_energy_j": float(sum(energy.tolist())),
    }


def _allocation_columns(alloc: Allocation, scenario: Scenario, ids: np.ndarray, dev: dict,
                        sequential: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The allocation as per-client columns, checked once: ``(power, cpu, bandwidth, shares)``
    (defaults: each device's maximum power and clock, the channel's split, the whole server)."""
    n = len(ids)
    channel = scenario.channel
    pmax, fmax = dev["tx_power_w"], dev["cpu_hz"]
    power = pmax if alloc.tx_power_w is None else column_arg("tx_power_w", alloc.tx_power_w, n, positive=True)
    cpu = fmax if alloc.cpu_hz is None else column_arg("cpu_hz", alloc.cpu_hz, n, positive=True)
    over = cpu > fmax * (1.0 + 1e-9)  # DVFS lowers a clock; no device runs above its own
    if over.any():
        i = int(np.argmax(over))
        raise ValueError(f"cpu_hz[{i}] = {cpu[i]} is above client {ids[i]}'s clock {fmax[i]}")
    if alloc.bandwidth_hz is not None:
        bandwidth = column_arg("bandwidth_hz", alloc.bandwidth_hz, n)
        # Clients in parallel share the band; clients taking turns may each use all of it.
        used = bandwidth.max(initial=0.0) if sequential else bandwidth.sum()
        if used > channel.total_bandwidth_hz * (1.0 + 1e-9):
            raise ValueError(f"bandwidth_hz uses {used} Hz, more than the band ({channel.total_bandwidth_hz} Hz)")
    else:
        bandwidth = channel.client_bandwidths_hz(n, subchannels=alloc.subchannels, exclusive=sequential)
    shares = np.ones(n) if alloc.server_cpu_share is None else column_arg("server_cpu_share", alloc.server_cpu_share, n)
    if alloc.server_cpu_share is not None and shares.sum() > 1.0 + 1e-9:
        raise ValueError(f"server_cpu_share sums to {shares.sum()}, more than 1")
    return power, cpu, bandwidth, shares


def _server_times(workload: RoundWorkload, speed: float, shares: np.ndarray,
                  server_timing: ServerTiming) -> tuple[np.ndarray, float]:
    """Per-client server seconds inside the chains (``per-client``: each client's work at its
    CPU share; else none) and the server seconds after the clients (the rest of its work)."""
    own_server = np.zeros(len(workload.client_ids))
    rest_flops = workload.server_flops
    if server_timing == ServerTiming.PER_CLIENT:
        work = workload.client_server_flops
        idle = (work > 0) & (shares <= 0)
        if idle.any():
            raise ValueError(f"client {workload.client_ids[int(np.argmax(idle))]} has server work but a server "
                             "CPU share of 0")
        with np.errstate(divide="ignore", invalid="ignore"):
            own_server = np.where(work > 0, work / speed / shares, 0.0)
        rest_flops = max(workload.server_flops - float(work.sum()), 0.0)
    return own_server, rest_flops / speed
