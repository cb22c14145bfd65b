"""The scenario types of the wireless edge simulator: devices, server, channel (checked once).

The model (DESIGN.md 3.6):

* **Compute.** A device with CPU frequency ``f`` (Hz) executing ``F`` FLOPs at ``c`` FLOPs per
  cycle needs ``F / c`` cycles, takes ``F / (c * f)`` seconds and spends
  ``kappa * f**2 * F / c`` joules (``kappa``: effective switched capacitance, J/(Hz^2 cycle)).
  The server's time is computed the same way; its energy is not counted.
* **Channel.** Path loss ``PL(dB) = 128.1 + 37.6 log10(d / 1 km)``, small-scale Rayleigh fading
  ``|h|^2 ~ Exp(1)`` drawn per round and client from a generator keyed by
  ``(seed, round, client id)`` (reproducible, independent of call order), gain
  ``g = 10**(-PL/10) * |h|^2``. Uplink and downlink see the same gain (reciprocity).
* **Band.** A client's share ``B`` of the band: the total bandwidth split equally among the
  round's clients, or explicit shares, or ``n_i`` OFDMA subchannels of width ``W``
  (``B = n_i W``: with the power spread evenly over the subchannels, ``n_i`` subchannels carry
  ``n_i W log2(1 + (p/n_i) g / (W N0))``, the Shannon rate over ``B``). Fading is flat across
  the band.

Rates, transfers, energy and the round latency are priced by ``flsplit.sim.pricing.price``
with the kernels of ``flsplit.sim.kernels`` (the only place the Shannon rate is written).
Scenarios are loaded from TOML or run-config keys by ``flsplit.sim.scenario_files``. Pure: numpy only,
no torch.
"""

from __future__ import annotations

from functools import lru_cache
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Optional, Union

import numpy as np

from flsplit.sim.checks import int_arg as _integer
from flsplit.sim.checks import real_arg as _number

__all__ = [
    "DeviceProfile",
    "ServerProfile",
    "Channel",
    "Scenario",
    "dbm_to_w",
    "path_loss_db",
    "rayleigh_power",
    "FADING_MODELS",
]

FADING_MODELS = ("rayleigh", "none")

ArrayLike = Union[float, Sequence[float], np.ndarray]


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
