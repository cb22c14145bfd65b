"""Loading cost-model scenarios: shipped examples, TOML files, run configs, node configs.

A scenario file (TOML, kebab-case keys; ``_`` is accepted for ``-``)::

    name = "my-testbed"          # optional, defaults to the file name
    seed = 0                     # optional, seeds the fading draws

    [server]
    cpu-hz = 20e9
    flops-per-cycle = 4
    tx-power-w = 1.0

    [channel]
    bandwidth-hz = 20e6          # or: num-subchannels = 16 and subchannel-bandwidth-hz = 1.25e6
    noise-psd-dbm-hz = -174      # optional
    fading = "rayleigh"          # optional: "rayleigh" or "none"
    # path-loss-db-at-1km = 128.1, path-loss-slope-db = 37.6   (optional)

    [[devices]]                  # one table per device, in client-id order (cycled)
    cpu-hz = 1e9
    flops-per-cycle = 4
    kappa = 1e-28
    tx-power-w = 0.2
    distance-m = 100
    count = 8                    # optional: this device repeated

Flat keys (Flower run config, see ``scenario_from_run_config``)::

    scenario                      shipped name or path of a base scenario (optional)
    seed                          fading seed
    device-cpu-hz  device-flops-per-cycle  device-kappa  device-tx-power-w  device-distance-m
                                  one number for every device, or a comma-separated list
                                  (one per device, cycled; lists of length 1 or N)
    server-cpu-hz  server-flops-per-cycle  server-tx-power-w
    bandwidth-hz | num-subchannels + subchannel-bandwidth-hz
    noise-psd-dbm-hz  fading  path-loss-db-at-1km  path-loss-slope-db

In a Flower run config they carry a prefix (``cost-`` by default: ``cost-scenario``,
``cost-device-cpu-hz``, ``cost-bandwidth-hz``, ...), so that a typo in a cost-model key is
an error while the other keys of the run config are left alone.

A device can also describe itself through its node config (``--node-config "cpu-hz=1e9
flops-per-cycle=4 kappa=1e-28 tx-power-w=0.2 distance-m=120"``), see
``device_from_node_config``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import MISSING, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from flsplit.sim.scenario import Channel, DeviceProfile, Scenario, ServerProfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli, which flwr already depends on
    import tomli as tomllib

__all__ = [
    "shipped_scenarios",
    "load_scenario",
    "scenario_from_toml",
    "scenario_from_dict",
    "scenario_from_flat",
    "scenario_from_run_config",
    "device_from_node_config",
    "DEVICE_KEYS",
    "SERVER_KEYS",
    "CHANNEL_KEYS",
    "FLAT_KEYS",
]

_SHIPPED_PACKAGE = "flsplit.sim.scenarios"


def _fields_of(obj) -> dict[str, Any]:
    """A dataclass's field values by field name."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _kebab_fields(cls) -> dict[str, str]:
    """Kebab-case key -> dataclass field name."""
    return {f.name.replace("_", "-"): f.name for f in fields(cls)}


DEVICE_KEYS = _kebab_fields(DeviceProfile)
SERVER_KEYS = _kebab_fields(ServerProfile)
CHANNEL_KEYS = _kebab_fields(Channel)
FLAT_KEYS = (
    ("scenario", "seed")
    + tuple(f"device-{k}" for k in DEVICE_KEYS)
    + tuple(f"server-{k}" for k in SERVER_KEYS)
    + tuple(CHANNEL_KEYS)
)
_INT_FIELDS = {"num_subchannels"}
_STR_FIELDS = {"fading"}


# --- building profiles from mappings ---------------------------------------------------------


def _normalise(mapping: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Keys lower-cased with ``_`` -> ``-`` (so snake_case works too); duplicates are errors."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where} must be a table, got {type(mapping).__name__}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        k = str(key).strip().lower().replace("_", "-")
        if k in out:
            raise ValueError(f"{where}: key {key!r} given twice")
        out[k] = value
    return out


def _coerce(field: str, value: Any, where: str) -> Any:
    """Strings from node configs / run configs to numbers; everything else is validated later."""
    if field in _STR_FIELDS or not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {field.replace('_', '-')} must be a number, got {value!r}") from None
    if field in _INT_FIELDS and number.is_integer():
        return int(number)
    return number


def _build(
    cls, mapping: Mapping[str, Any], where: str, *, base: Optional[Mapping[str, Any]] = None, key_prefix: str = ""
):
    """A profile dataclass from a kebab-case mapping, missing fields taken from ``base``.

    ``base`` maps field names (snake_case) to values, e.g. ``_fields_of(profile)``;
    ``key_prefix`` is how the keys are spelled where the user wrote them (``"device-"``).

    Unknown keys and missing required fields are ValueErrors naming the key; so are invalid
    values (the dataclass's own checks, prefixed with ``where``).
    """
    keys = _kebab_fields(cls)
    given = _normalise(mapping, where)
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected some of {sorted(keys)}")
    kwargs = {keys[k]: _coerce(keys[k], v, where) for k, v in given.items()}
    if base is not None:
        kwargs = {**base, **kwargs}
    for f in fields(cls):
        if f.name not in kwargs and f.default is MISSING:
            raise ValueError(f"{where}: missing {key_prefix + f.name.replace('_', '-')!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# --- scenario files --------------------------------------------------------------------------


def shipped_scenarios() -> list[str]:
    """Names of the scenarios that ship with flsplit (``flsplit/sim/scenarios/*.toml``)."""
    return sorted(
        p.name[: -len(".toml")] for p in resources.files(_SHIPPED_PACKAGE).iterdir() if p.name.endswith(".toml")
    )


def scenario_from_dict(data: Mapping[str, Any], where: str = "scenario", *, name: str = "") -> Scenario:
    """A scenario from a mapping shaped like a scenario file (see the module docstring).

    Parameters
    ----------
    data : mapping
        Keys ``name``, ``seed``, ``server``, ``channel``, ``devices``.
    where : str
        Prefix of error messages (e.g. the file name).
    name : str
        Name used when ``data`` has none.
    """
    top = _normalise(data, where)
    unknown = sorted(set(top) - {"name", "seed", "server", "channel", "devices"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected name, seed, server, channel, devices")
    for key in ("server", "channel", "devices"):
        if key not in top:
            raise ValueError(f"{where}: missing {key!r}")
    server = _build(ServerProfile, top["server"], f"{where}: server")
    channel = _build(Channel, top["channel"], f"{where}: channel")
    devices = _devices(top["devices"], where)
    try:
        return Scenario(devices, server, channel, seed=top.get("seed", 0), name=str(top.get("name", name)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _devices(entries: Any, where: str) -> tuple[DeviceProfile, ...]:
    """Device tables in order, each repeated ``count`` times."""
    if isinstance(entries, Mapping) or not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"{where}: devices must be a non-empty list of tables ([[devices]])")
    devices: list[DeviceProfile] = []
    for i, entry in enumerate(entries):
        here = f"{where}: devices[{i}]"
        entry = _normalise(entry, here)
        count = entry.pop("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{here}: count must be an integer >= 1, got {count!r}")
        devices.extend([_build(DeviceProfile, entry, here)] * count)
    return tuple(devices)


def scenario_from_toml(path: Union[str, os.PathLike]) -> Scenario:
    """Load a scenario file; its name defaults to the file's stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read scenario file {str(path)!r}: {e.strerror or e}") from None
    return _from_toml_text(text, path.name, path.stem)


def _from_toml_text(text: str, where: str, name: str) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML: {e}") from None
    return scenario_from_dict(data, where, name=name)


def load_scenario(name_or_path: Union[str, os.PathLike]) -> Scenario:
    """A shipped scenario by name (``"homogeneous"``, ``"heterogeneous"``) or a TOML file by path.

    A bare name (no ``.toml``, no directory) is looked up among the shipped scenarios first.
    """
    text = os.fspath(name_or_path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    shipped = shipped_scenarios()
    if text in shipped:
        resource = resources.files(_SHIPPED_PACKAGE).joinpath(f"{text}.toml")
        return _from_toml_text(resource.read_text(encoding="utf-8"), f"{text}.toml", text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"scenario {text!r} is neither a shipped scenario ({', '.join(shipped)}) nor a file")
    return scenario_from_toml(path)


# --- flat keys (run config) ------------------------------------------------------------------


def _split_list(key: str, value: Any) -> list[Any]:
    """A per-device value: a scalar, a list, or a comma-separated string."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str) and "," in value:
        items = [v.strip() for v in value.split(",")]
    else:
        items = [value]
    if not items or any(v == "" for v in items):
        raise ValueError(f"{key}: empty entry in {value!r}")
    return items


def scenario_from_flat(config: Mapping[str, Any], *, where: str = "config") -> Scenario:
    """A scenario from flat kebab-case keys (``FLAT_KEYS``, listed in the module docstring).

    Without ``scenario`` every device, server and channel field must be given; with it the
    keys override the base scenario. Setting ``bandwidth-hz`` on an OFDMA base (or subchannel
    keys on a shared-band base) switches the channel's kind. Unknown keys are errors.
    """
    flat = _normalise(config, where)
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected some of {list(FLAT_KEYS)}")
    base = load_scenario(flat["scenario"]) if flat.get("scenario") not in (None, "") else None

    server = _build(
        ServerProfile,
        {k: flat[f"server-{k}"] for k in SERVER_KEYS if f"server-{k}" in flat},
        f"{where}: server",
        base=_fields_of(base.server) if base else None,
        key_prefix="server-",
    )
    channel = _build(
        Channel,
        {k: flat[k] for k in CHANNEL_KEYS if k in flat},
        f"{where}: channel",
        base=_channel_base(base.channel, flat) if base else None,
    )
    devices = _flat_devices(flat, where, base)
    seed = flat.get("seed", base.seed if base else 0)
    if isinstance(seed, str):
        seed = _coerce("seed", seed, where)
    try:
        return Scenario(devices, server, channel, seed=seed, name=base.name if base else "")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _channel_base(channel: Channel, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The base channel's fields, with the other kind's cleared when the config picks a kind."""
    base = _fields_of(channel)
    if "bandwidth-hz" in flat:
        base.update(num_subchannels=None, subchannel_bandwidth_hz=None)
    elif "num-subchannels" in flat or "subchannel-bandwidth-hz" in flat:
        base.update(bandwidth_hz=None)
    return base


def _flat_devices(flat: Mapping[str, Any], where: str, base: Optional[Scenario]) -> tuple[DeviceProfile, ...]:
    """Devices from ``device-*`` keys, each a scalar or a per-device list, over the base's.

    A list sets the number of devices; scalars apply to every device (of the base, or one).
    """
    lists = {k: _split_list(f"device-{k}", flat[f"device-{k}"]) for k in DEVICE_KEYS if f"device-{k}" in flat}
    if not lists and base is not None:
        return base.devices
    lengths = {len(v) for v in lists.values()} - {1}
    if len(lengths) > 1:
        detail = ", ".join(f"device-{k}: {len(v)}" for k, v in lists.items())
        raise ValueError(f"{where}: per-device lists must have one length (or length 1), got {detail}")
    n = lengths.pop() if lengths else (len(base.devices) if base else 1)
    devices = []
    for i in range(n):
        values = {k: v[i % len(v)] for k, v in lists.items()}
        defaults = _fields_of(base.devices[i % len(base.devices)]) if base else None
        devices.append(_build(DeviceProfile, values, f"{where}: device {i}", base=defaults, key_prefix="device-"))
    return tuple(devices)


def scenario_from_run_config(run_config: Mapping[str, Any], prefix: str = "cost-") -> Optional[Scenario]:
    """The scenario described by a Flower run config's ``prefix``-ed keys, or None.

    Keys starting with ``prefix`` are stripped of it and read by ``scenario_from_flat``
    (so ``cost-device-cpu-hz`` is ``device-cpu-hz``); all other keys are ignored. Returns None
    when there is no such key, or when ``<prefix>scenario`` is ``"none"`` (cost model off).
    """
    picked = {str(k)[len(prefix) :]: v for k, v in run_config.items() if str(k).startswith(prefix)}
    if not picked:
        return None
    if str(picked.get("scenario", "")).strip().lower() == "none":
        if len(picked) > 1:
            others = sorted(prefix + k for k in picked if k != "scenario")
            raise ValueError(f"run config: {prefix}scenario is 'none' (cost model off) but {others} are set")
        return None
    return scenario_from_flat(picked, where=f"run config (keys prefixed {prefix!r})")


# --- node config -----------------------------------------------------------------------------


def device_from_node_config(
    node_config: Mapping[str, Any], default: Optional[DeviceProfile] = None
) -> Optional[DeviceProfile]:
    """A device's own profile from its Flower node config.

    Reads ``cpu-hz``, ``flops-per-cycle``, ``kappa``, ``tx-power-w``, ``distance-m`` (numbers
    or numeric strings); the node config's other keys (``partition-id``, ...) are ignored.
    Missing fields come from ``default``; with no default they are an error. Returns
    ``default`` when the node config has none of these keys.
    """
    given = {k: v for k, v in _normalise(node_config, "node config").items() if k in DEVICE_KEYS}
    if not given:
        return default
    return _build(DeviceProfile, given, "node config", base=_fields_of(default) if default else None)
