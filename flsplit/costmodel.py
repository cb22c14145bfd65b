"""Wireless edge cost model: simulated latency and energy of a split-learning round.

The model (DESIGN.md 3.6) is the one used throughout the split-learning-at-the-edge
literature:

* **Compute.** A device with CPU frequency ``f`` (Hz) executing ``F`` FLOPs at ``c`` FLOPs per
  cycle needs ``F / c`` cycles, takes ``F / (c * f)`` seconds and spends
  ``kappa * f**2 * F / c`` joules (``kappa``: effective switched capacitance, J/(Hz^2 cycle)).
  The server's time is computed the same way; its energy is not counted.
* **Channel.** Path loss ``PL(dB) = 128.1 + 37.6 log10(d / 1 km)``, small-scale Rayleigh fading
  ``|h|^2 ~ Exp(1)`` drawn per round and client from a generator keyed by
  ``(seed, round, client id)`` (reproducible, independent of call order), gain
  ``g = 10**(-PL/10) * |h|^2``. Uplink and downlink see the same gain (reciprocity).
* **Rate.** Shannon: ``r = B log2(1 + p g / (B N0))`` with ``N0`` the noise power spectral
  density in W/Hz (converted from dBm/Hz) and ``p`` the transmitter's power: the device's on
  the uplink, the server's on the downlink (each downlink transmission at the server's full
  power). ``B`` is the client's share of the band: the total bandwidth split equally among
  the round's clients, or explicit shares, or ``n_i`` OFDMA subchannels of width ``W``
  (``B = n_i W``: with the power spread evenly over the subchannels, ``n_i`` subchannels carry
  ``n_i W log2(1 + (p/n_i) g / (W N0))``, the same formula). Fading is flat across the band.
* **Transfers.** ``time = bytes * 8 / rate``. A broadcast (one payload heard by several
  clients) is one transmission over the whole band, so it is limited by the weakest receiver:
  ``time = bytes * 8 / min_i r_i``.
* **Energy** of a device per round: compute energy plus transmit energy
  ``tx_power_w * uplink time`` (receiving is not counted).
* **Round latency.** ``"parallel"`` schemes (SFL, PSL, EPSL, ...): the slowest client's chain
  (compute + uplink + downlink) plus the server's compute time. ``"sequential"`` (vanilla SL):
  the clients take turns, so the chains add up (each client owns the whole band while it is
  active unless shares are given), plus the server's compute time.

Everything here is pure (numpy only, no torch): the resource optimizers call it in their
inner loops. Scenarios are loaded from TOML or run-config keys by ``flsplit.scenario``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from flsplit.sim import kernels

if TYPE_CHECKING:  # only for type hints: the cost model must not import torch
    from flsplit.profile import CutProfile

__all__ = [
    "DeviceProfile",
    "ServerProfile",
    "Channel",
    "Scenario",
    "ClientCost",
    "RoundCost",
    "round_cost",
    "client_flops",
    "server_flops",
    "smashed_bytes",
    "dbm_to_w",
    "path_loss_db",
    "rayleigh_power",
    "shannon_rate_bps",
    "transfer_time_s",
    "broadcast_time_s",
    "FADING_MODELS",
    "TIMING_RULES",
]

FADING_MODELS = ("rayleigh", "none")
TIMING_RULES = ("parallel", "sequential")

ArrayLike = Union[float, Sequence[float], np.ndarray]


# --- validation helpers ----------------------------------------------------------------------


def _number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    # bool is an int subclass: ``cpu_hz = true`` in a file is a mistake, not 1 Hz.
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _integer(name: str, value, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (integral floats such as ``16.0`` are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalise fields of a frozen dataclass


def _kebab_dict(obj) -> dict:
    """Fields as a dict with kebab-case keys (the spelling of TOML files and run configs)."""
    return {f.name.replace("_", "-"): getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


# --- physics ---------------------------------------------------------------------------------


def dbm_to_w(dbm: ArrayLike) -> ArrayLike:
    """Convert dBm (or dBm/Hz) to W (or W/Hz): ``10**((dbm - 30) / 10)``."""
    return 10.0 ** ((np.asarray(dbm, dtype=float) - 30.0) / 10.0)


def path_loss_db(distance_m: ArrayLike, at_1km_db: float = 128.1, slope_db: float = 37.6) -> ArrayLike:
    """Large-scale path loss in dB: ``at_1km_db + slope_db * log10(distance_m / 1000)``."""
    d = np.asarray(distance_m, dtype=float)
    if np.any(d <= 0):
        raise ValueError(f"distance_m must be > 0, got {distance_m}")
    return at_1km_db + slope_db * np.log10(d / 1000.0)


def rayleigh_power(seed: int, server_round: int, client_id: int) -> float:
    """Small-scale fading power ``|h|^2 ~ Exp(1)`` of one client in one round.

    The generator is keyed by ``(seed, server_round, client_id)``, so a draw does not depend
    on which other clients are in the round or on the order of calls.
    """
    for name, v in (("seed", seed), ("server_round", server_round), ("client_id", client_id)):
        _integer(name, v, minimum=0)  # SeedSequence entropy must be non-negative integers
    return _rayleigh(int(seed), int(server_round), int(client_id))


@lru_cache(maxsize=1 << 17)
def _rayleigh(seed: int, server_round: int, client_id: int) -> float:
    # A pure function of its key whose generator costs ~0.1 ms to seed: planners price
    # the same round many times, so the draws are memoised (about 10 MB when full).
    return float(np.random.default_rng([seed, server_round, client_id]).exponential(1.0))


def shannon_rate_bps(
    bandwidth_hz: ArrayLike, tx_power_w: ArrayLike, gain: ArrayLike, noise_psd_w_per_hz: float
) -> ArrayLike:
    """Achievable rate ``B log2(1 + p g / (B N0))`` in bit/s (element-wise on arrays).

    A zero bandwidth gives a zero rate (the limit of the formula), so an unused share is
    harmless; negative inputs are errors.
    """
    b, p, g = (np.asarray(x, dtype=float) for x in (bandwidth_hz, tx_power_w, gain))
    if np.any(b < 0) or np.any(p < 0) or np.any(g < 0) or noise_psd_w_per_hz <= 0:
        raise ValueError("bandwidth, power and gain must be >= 0 and the noise PSD > 0")
    return kernels.rate_bps(b, kernels.snr_per_hz(p, g, noise_psd_w_per_hz))  # checked front, one kernel


def transfer_time_s(num_bytes: ArrayLike, rate_bps: ArrayLike) -> ArrayLike:
    """Time to send ``num_bytes`` at ``rate_bps``: ``bytes * 8 / rate`` (0 for 0 bytes).

    Sending a positive payload at rate 0 is infinite time: a ValueError, since it means the
    link has no bandwidth or no power.
    """
    n, r = np.asarray(num_bytes, dtype=float), np.asarray(rate_bps, dtype=float)
    if np.any(n < 0):
        raise ValueError(f"bytes must be >= 0, got {num_bytes}")
    if np.any((n > 0) & (r <= 0)):
        raise ValueError("a payload cannot be sent at rate 0 (no bandwidth or no power on the link)")
    return kernels.transfer_s(n, r)


def broadcast_time_s(num_bytes: float, rates_bps: ArrayLike) -> float:
    """Time to broadcast one payload to receivers with the given rates: limited by the weakest."""
    rates = np.atleast_1d(np.asarray(rates_bps, dtype=float))
    if num_bytes == 0:
        return 0.0
    if rates.size == 0:
        raise ValueError("a broadcast needs at least one receiver")
    return float(transfer_time_s(num_bytes, rates.min()))


# --- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    """A client device.

    Parameters
    ----------
    cpu_hz : float
        CPU frequency in Hz (typically 0.5e9 - 2e9).
    flops_per_cycle : float
        FLOPs executed per CPU cycle.
    kappa : float
        Effective switched capacitance: energy in J = ``kappa * cpu_hz**2 * cycles``
        (typically 1e-28).
    tx_power_w : float
        Uplink transmit power in W (typically 0.1 - 0.2).
    distance_m : float
        Distance to the edge server / access point in m.
    """

    cpu_hz: float
    flops_per_cycle: float
    kappa: float
    tx_power_w: float
    distance_m: float

    def __post_init__(self) -> None:
        for name in ("cpu_hz", "flops_per_cycle", "tx_power_w", "distance_m"):
            _set(self, name, _number(name, getattr(self, name), positive=True))
        _set(self, "kappa", _number("kappa", self.kappa, nonnegative=True))

    @property
    def flops_per_s(self) -> float:
        """Compute speed in FLOP/s."""
        return self.cpu_hz * self.flops_per_cycle

    def compute_time_s(self, flops: float) -> float:
        """Seconds to execute ``flops`` FLOPs."""
        return _number("flops", flops, nonnegative=True) / self.flops_per_s

    def compute_energy_j(self, flops: float) -> float:
        """Joules to execute ``flops`` FLOPs: ``kappa * f**2 * flops / flops_per_cycle``."""
        cycles = _number("flops", flops, nonnegative=True) / self.flops_per_cycle
        return self.kappa * self.cpu_hz**2 * cycles

    def as_dict(self) -> dict:
        """Kebab-case keys, as in a scenario file or a node config."""
        return _kebab_dict(self)


@dataclass(frozen=True)
class ServerProfile:
    """The edge server.

    Parameters
    ----------
    cpu_hz : float
        Compute frequency in Hz (an edge server is typically modelled as 10e9 - 50e9
        "GHz-equivalent" at the devices' FLOPs per cycle).
    flops_per_cycle : float
        FLOPs executed per cycle.
    tx_power_w : float
        Downlink transmit power in W, per transmission.
    """

    cpu_hz: float
    flops_per_cycle: float
    tx_power_w: float

    def __post_init__(self) -> None:
        for name in ("cpu_hz", "flops_per_cycle", "tx_power_w"):
            _set(self, name, _number(name, getattr(self, name), positive=True))

    @property
    def flops_per_s(self) -> float:
        """Compute speed in FLOP/s."""
        return self.cpu_hz * self.flops_per_cycle

    def compute_time_s(self, flops: float) -> float:
        """Seconds to execute ``flops`` FLOPs."""
        return _number("server_flops", flops, nonnegative=True) / self.flops_per_s

    def as_dict(self) -> dict:
        """Kebab-case keys, as in a scenario file."""
        return _kebab_dict(self)


@dataclass(frozen=True)
class Channel:
    """The wireless link between the devices and the server.

    Give either ``bandwidth_hz`` (a band shared among the round's clients) or
    ``num_subchannels`` and ``subchannel_bandwidth_hz`` (OFDMA), not both.

    Parameters
    ----------
    bandwidth_hz : float, optional
        Total bandwidth in Hz, split equally among the round's clients unless shares are given.
    num_subchannels : int, optional
        Number of OFDMA subchannels; by default divided as evenly as possible.
    subchannel_bandwidth_hz : float, optional
        Width of one subchannel in Hz.
    noise_psd_dbm_hz : float
        Noise power spectral density in dBm/Hz (thermal noise: -174).
    fading : {"rayleigh", "none"}
        Per-round Rayleigh fading ``|h|^2 ~ Exp(1)``, or none (``|h|^2 = 1``).
    path_loss_db_at_1km, path_loss_slope_db : float
        Path loss ``PL(dB) = path_loss_db_at_1km + path_loss_slope_db * log10(d_km)``
        (defaults 128.1 and 37.6, the 3GPP macro-cell model).
    """

    bandwidth_hz: Optional[float] = None
    num_subchannels: Optional[int] = None
    subchannel_bandwidth_hz: Optional[float] = None
    noise_psd_dbm_hz: float = -174.0
    fading: str = "rayleigh"
    path_loss_db_at_1km: float = 128.1
    path_loss_slope_db: float = 37.6

    def __post_init__(self) -> None:
        ofdma = self.num_subchannels is not None or self.subchannel_bandwidth_hz is not None
        if self.bandwidth_hz is not None and ofdma:
            raise ValueError("give either bandwidth_hz or num_subchannels + subchannel_bandwidth_hz, not both")
        if self.bandwidth_hz is not None:
            _set(self, "bandwidth_hz", _number("bandwidth_hz", self.bandwidth_hz, positive=True))
        elif ofdma:
            if self.num_subchannels is None or self.subchannel_bandwidth_hz is None:
                missing = "num_subchannels" if self.num_subchannels is None else "subchannel_bandwidth_hz"
                raise ValueError(f"an OFDMA channel needs {missing} (with num_subchannels + subchannel_bandwidth_hz)")
            _set(self, "num_subchannels", _integer("num_subchannels", self.num_subchannels, minimum=1))
            _set(
                self,
                "subchannel_bandwidth_hz",
                _number("subchannel_bandwidth_hz", self.subchannel_bandwidth_hz, positive=True),
            )
        else:
            raise ValueError("the channel needs bandwidth_hz, or num_subchannels + subchannel_bandwidth_hz")
        for name in ("noise_psd_dbm_hz", "path_loss_db_at_1km", "path_loss_slope_db"):
            _set(self, name, _number(name, getattr(self, name)))
        if self.fading not in FADING_MODELS:
            raise ValueError(f"fading must be one of {FADING_MODELS}, got {self.fading!r}")

    @property
    def ofdma(self) -> bool:
        """Whether the band is divided into subchannels."""
        return self.num_subchannels is not None

    @property
    def total_bandwidth_hz(self) -> float:
        """The whole band in Hz (all subchannels for OFDMA)."""
        if self.ofdma:
            return self.num_subchannels * self.subchannel_bandwidth_hz
        return self.bandwidth_hz

    @property
    def noise_psd_w_per_hz(self) -> float:
        """Noise PSD ``N0`` in W/Hz."""
        return float(dbm_to_w(self.noise_psd_dbm_hz))

    def path_loss_db(self, distance_m: ArrayLike) -> ArrayLike:
        """Path loss in dB at ``distance_m`` metres."""
        return path_loss_db(distance_m, self.path_loss_db_at_1km, self.path_loss_slope_db)

    def client_bandwidths_hz(
        self,
        num_clients: int,
        *,
        shares: Optional[Sequence[float]] = None,
        subchannels: Optional[Sequence[int]] = None,
        exclusive: bool = False,
    ) -> np.ndarray:
        """Bandwidth in Hz of each of ``num_clients`` clients.

        Parameters
        ----------
        num_clients : int
            Clients sharing the band in this round.
        shares : sequence of float, optional
            Fractions of the whole band (>= 0, summing to at most 1). With OFDMA this is a
            continuous relaxation of subchannel counts.
        subchannels : sequence of int, optional
            Subchannels per client (OFDMA only; summing to at most ``num_subchannels``).
        exclusive : bool
            Each client owns the whole band (clients that take turns, as in vanilla SL); used
            when neither shares nor subchannels are given.
        """
        n = _integer("num_clients", num_clients, minimum=0)
        if shares is not None and subchannels is not None:
            raise ValueError("give bandwidth shares or subchannels, not both")
        if subchannels is not None:
            if not self.ofdma:
                raise ValueError("subchannels need an OFDMA channel (num_subchannels + subchannel_bandwidth_hz)")
            counts = np.array([_integer("subchannels", s, minimum=0) for s in subchannels], dtype=float)
            _check_length("subchannels", counts, n)
            if counts.sum() > self.num_subchannels:
                raise ValueError(f"subchannels use {int(counts.sum())} of only {self.num_subchannels}")
            return counts * self.subchannel_bandwidth_hz
        if shares is not None:
            frac = np.array([_number("bandwidth_shares", s, nonnegative=True) for s in shares], dtype=float)
            _check_length("bandwidth_shares", frac, n)
            if frac.sum() > 1.0 + 1e-9:
                raise ValueError(f"bandwidth_shares sum to {frac.sum()}, more than 1")
            return frac * self.total_bandwidth_hz
        if exclusive or n == 0:
            return np.full(n, self.total_bandwidth_hz)
        if not self.ofdma:
            return np.full(n, self.bandwidth_hz / n)
        if n > self.num_subchannels:
            raise ValueError(
                f"{n} clients cannot share {self.num_subchannels} subchannels: give subchannels or bandwidth_shares"
            )
        # As even as possible: the first (K mod n) clients get one subchannel more.
        base, extra = divmod(self.num_subchannels, n)
        counts = np.array([base + (i < extra) for i in range(n)], dtype=float)
        return counts * self.subchannel_bandwidth_hz

    def as_dict(self) -> dict:
        """Kebab-case keys, as in a scenario file."""
        return _kebab_dict(self)


def _check_length(name: str, values: np.ndarray, n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} clients")


@dataclass(frozen=True)
class Scenario:
    """Devices, server and channel of a simulated edge deployment.

    Parameters
    ----------
    devices : sequence of DeviceProfile
        One per client id (partition id); client ``i`` uses ``devices[i % len(devices)]``.
    server : ServerProfile
    channel : Channel
    seed : int
        Seed of the fading draws.
    name : str
        A label for reports.
    """

    devices: tuple[DeviceProfile, ...]
    server: ServerProfile
    channel: Channel
    seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        if not devices:
            raise ValueError("devices: a scenario needs at least one device")
        for i, d in enumerate(devices):
            if not isinstance(d, DeviceProfile):
                raise ValueError(f"devices[{i}] must be a DeviceProfile, got {type(d).__name__}")
        if not isinstance(self.server, ServerProfile):
            raise ValueError(f"server must be a ServerProfile, got {type(self.server).__name__}")
        if not isinstance(self.channel, Channel):
            raise ValueError(f"channel must be a Channel, got {type(self.channel).__name__}")
        _set(self, "devices", devices)
        _set(self, "seed", _integer("seed", self.seed, minimum=0))
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")

    def device(self, client_id: int) -> DeviceProfile:
        """Profile of client ``client_id`` (the device list is cycled)."""
        return self.devices[_integer("client_id", client_id, minimum=0) % len(self.devices)]

    def device_columns(self, client_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The devices of these client ids as columns: ``cpu_hz``, ``flops_per_cycle``,
        ``kappa``, ``tx_power_w``, ``distance_m`` (the device list is cycled)."""
        table = self.__dict__.get("_columns")
        if table is None:  # built once per scenario (a frozen value)
            table = {f.name: np.array([getattr(d, f.name) for d in self.devices], dtype=float) for f in fields(DeviceProfile)}
            object.__setattr__(self, "_columns", table)
        idx = np.asarray(client_ids, dtype=np.int64) % len(self.devices)
        return {name: col[idx] for name, col in table.items()}

    def with_devices(self, overrides: Mapping[int, DeviceProfile], num_clients: int = 0) -> "Scenario":
        """A copy in which the given client ids have the given profiles (e.g. from node configs).

        The device list is first repeated to a multiple of its length that covers every
        overridden id and ``num_clients``, so that clients ``0 .. num_clients-1`` that are not
        overridden keep their profiles (ids beyond the new list cycle over it, as always).
        """
        if not overrides:
            return self
        top = max(_integer("client_id", k, minimum=0) for k in overrides)
        top = max(top, _integer("num_clients", num_clients, minimum=0) - 1)
        devices = list(self.devices) * (top // len(self.devices) + 1)
        for k, d in overrides.items():
            if not isinstance(d, DeviceProfile):
                raise ValueError(f"device of client {k} must be a DeviceProfile, got {type(d).__name__}")
            devices[int(k)] = d
        return Scenario(tuple(devices), self.server, self.channel, self.seed, self.name)

    def fading_power(self, client_id: int, server_round: int) -> float:
        """``|h|^2`` of client ``client_id`` in round ``server_round`` (1.0 without fading)."""
        if self.channel.fading == "none":
            return 1.0
        return rayleigh_power(self.seed, server_round, client_id)

    def channel_gain(self, client_id: int, server_round: int) -> float:
        """Linear channel gain ``10**(-PL/10) * |h|^2`` of a client in a round."""
        pl = float(self.channel.path_loss_db(self.device(client_id).distance_m))
        return 10.0 ** (-pl / 10.0) * self.fading_power(client_id, server_round)

    def channel_gains(self, client_ids: Sequence[int], server_round: int) -> np.ndarray:
        """Channel gains of several clients in one round (``channel_gain`` of each)."""
        raw = np.asarray(client_ids)
        if raw.size and (raw.dtype.kind not in "iu" or raw.min() < 0):  # checked as a column
            ids = [_integer("client_id", c, minimum=0) for c in client_ids]
        else:
            ids = raw.astype(np.int64).tolist()
        _integer("server_round", server_round, minimum=0)
        distances = np.array([self.devices[c % len(self.devices)].distance_m for c in ids], dtype=float)
        pl = np.asarray(self.channel.path_loss_db(distances), dtype=float) if ids else np.zeros(0)
        if self.channel.fading == "none":
            fading = np.ones(len(ids))
        else:
            fading = np.array([_rayleigh(self.seed, int(server_round), c) for c in ids], dtype=float)
        return 10.0 ** (-pl / 10.0) * fading

    def as_dict(self) -> dict:
        """The scenario in the shape of a scenario file (``scenario_from_dict`` reads it back)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "server": self.server.as_dict(),
            "channel": self.channel.as_dict(),
            "devices": [d.as_dict() for d in self.devices],
        }


# --- round accounting ------------------------------------------------------------------------


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


def _per_client(name: str, values: Sequence[float], n: int) -> list[float]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} clients")
    return [_number(f"{name}[{i}]", v, nonnegative=True) for i, v in enumerate(values)]


def round_cost(
    scenario: Scenario,
    *,
    client_ids: Sequence[int],
    client_flops: Sequence[float],
    uplink_bytes: Sequence[float],
    downlink_bytes: Sequence[float],
    server_flops: float = 0.0,
    server_round: int = 0,
    timing: str = "parallel",
    broadcast_bytes: float = 0.0,
    broadcast_receivers: Optional[Sequence[int]] = None,
    bandwidth_shares: Optional[Sequence[float]] = None,
    subchannels: Optional[Sequence[int]] = None,
    tx_power_w: Optional[Sequence[float]] = None,
) -> RoundCost:
    """Simulated latency and energy of one round.

    Parameters
    ----------
    scenario : Scenario
        Devices, server and channel.
    client_ids : sequence of int
        The round's clients (partition ids: they select the device profile and key the fading).
    client_flops : sequence of float
        FLOPs each client executed (forward + backward; see ``client_flops``).
    uplink_bytes, downlink_bytes : sequence of float
        Bytes each client sent, and received by unicast.
    server_flops : float
        FLOPs the server executed in the round (see ``server_flops``).
    server_round : int
        Round number (keys the fading).
    timing : {"parallel", "sequential"}
        How the clients' chains combine into the round latency (see module docstring).
    broadcast_bytes : float
        A payload broadcast once to the receivers over the whole band (e.g. EPSL's or
        SFL-GA's aggregated gradient, summed over the round's broadcasts).
    broadcast_receivers : sequence of int, optional
        Positions in ``client_ids`` of the clients that receive the broadcast (default: all).
    bandwidth_shares : sequence of float, optional
        Fraction of the band per client (default: equal split; whole band when sequential).
    subchannels : sequence of int, optional
        OFDMA subchannels per client (instead of ``bandwidth_shares``).
    tx_power_w : sequence of float, optional
        Uplink transmit power per client (default: each device's ``tx_power_w``).

    Returns
    -------
    RoundCost
    """
    if timing not in TIMING_RULES:
        raise ValueError(f"timing must be one of {TIMING_RULES}, got {timing!r}")
    ids = [_integer(f"client_ids[{i}]", c, minimum=0) for i, c in enumerate(client_ids)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"client_ids must be distinct, got {ids}")
    n = len(ids)
    flops = _per_client("client_flops", client_flops, n)
    up_bytes = np.array(_per_client("uplink_bytes", uplink_bytes, n))
    down_bytes = np.array(_per_client("downlink_bytes", downlink_bytes, n))
    server_round = _integer("server_round", server_round, minimum=0)
    broadcast_bytes = _number("broadcast_bytes", broadcast_bytes, nonnegative=True)
    receivers = _broadcast_receivers(broadcast_receivers, n, broadcast_bytes)

    powers = None if tx_power_w is None else [
        _number(f"tx_power_w[{i}]", p, positive=True) for i, p in enumerate(tx_power_w)
    ]
    if powers is not None:
        _check_length("tx_power_w", np.array(powers), n)
    bandwidth = scenario.channel.client_bandwidths_hz(
        n, shares=bandwidth_shares, subchannels=subchannels, exclusive=timing == "sequential"
    )
    gets_broadcast = np.zeros(n, dtype=bool)
    gets_broadcast[receivers] = True
    # One price for every round (flsplit.sim.pricing): this front only checks and translates.
    from flsplit.sim.pricing import Allocation, price
    from flsplit.sim.workload import RoundWorkload

    work = RoundWorkload(
        client_ids=ids,
        cuts=np.ones(n),  # the cost model needs no cut: the FLOPs and bytes are given
        flops=flops,
        uplink_bytes=up_bytes,
        downlink_bytes=down_bytes,
        receives_broadcast=gets_broadcast,
        timing=timing,
        server_flops=_number("server_flops", server_flops, nonnegative=True),
        broadcast_bytes=broadcast_bytes if n else 0.0,
    )
    return price(
        work,
        scenario,
        Allocation(bandwidth_hz=tuple(bandwidth), tx_power_w=powers, cpu_hz=None),
        server_round=server_round,
    )


def _broadcast_receivers(receivers: Optional[Sequence[int]], n: int, broadcast_bytes: float) -> np.ndarray:
    """Positions of the broadcast's receivers as an index array (validated)."""
    if receivers is None:
        idx = list(range(n))
    else:
        idx = [_integer("broadcast_receivers", r, minimum=0) for r in receivers]
        if any(r >= n for r in idx):
            raise ValueError(f"broadcast_receivers are positions in client_ids (0..{n - 1}), got {idx}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"broadcast_receivers must be distinct, got {idx}")
    if broadcast_bytes > 0 and not idx:
        raise ValueError("broadcast_bytes > 0 needs at least one receiver")
    return np.array(idx, dtype=int)


# --- work from a profile ---------------------------------------------------------------------


def client_flops(cut: "CutProfile", samples: float, *, backward: bool = True) -> float:
    """FLOPs a client executes on ``samples`` samples at a cut.

    ``samples * (client_forward_flops + client_backward_flops)``, or the forward alone with
    ``backward=False`` (a frozen client that only sends activations).

    flsplit's client is stateless between messages, so it recomputes the forward pass of a
    batch when that batch's gradient arrives; the simulator counts the forward once, as a
    device that keeps its autograd graph would. ``cut`` is a ``flsplit.profile.CutProfile``
    (``profile_model(model, input_shape).cut(k)``).
    """
    samples = _number("samples", samples, nonnegative=True)
    per_sample = cut.client_forward_flops + (cut.client_backward_flops if backward else 0.0)
    return samples * per_sample


def server_flops(cut: "CutProfile", samples: float, *, backward_samples: Optional[float] = None) -> float:
    """FLOPs the server executes forwarding ``samples`` samples and back-propagating some.

    ``samples * server_forward_flops + backward_samples * server_backward_flops``;
    ``backward_samples`` defaults to ``samples`` (EPSL back-propagates fewer:
    ``(1 - phi) * N * b + phi * b`` per step).
    """
    samples = _number("samples", samples, nonnegative=True)
    back = samples if backward_samples is None else _number("backward_samples", backward_samples, nonnegative=True)
    return samples * cut.server_forward_flops + back * cut.server_backward_flops


def smashed_bytes(cut: "CutProfile", samples: float, *, bytes_per_element: float = 4.0) -> float:
    """Predicted bytes of the smashed data (or its gradient) of ``samples`` samples.

    ``bytes_per_element`` is 4 for fp32, 2 for fp16/bf16, 1 for fp8/int8 (per-tensor scales
    are negligible). For accounting a real round, use the bytes actually serialized.
    """
    samples = _number("samples", samples, nonnegative=True)
    return samples * cut.smashed_elements * _number("bytes_per_element", bytes_per_element, positive=True)
