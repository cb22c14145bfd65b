"""Checkpoints of a run: what a ServerApp needs to continue after its last finished round.

A checkpoint lives in the run directory, next to ``history.json``::

    checkpoint.json       format and version, the round it was taken after, the run's
                          fingerprint (``config``: the settings a resumed run must share),
                          the strategy's state (tensors replaced by references), the history
                          so far, the name, size and SHA-256 of the tensor file, and
                          ``digests``: the SHA-256 of every part of the rest and one over them
    checkpoint-<r>.pt     the tensors: one flat ``{name: tensor}`` dict written by
                          ``torch.save`` and read back with ``weights_only=True`` (no
                          unpickling of arbitrary objects)

The state a strategy hands over is a tree of dicts (string keys), lists and plain values
(``None``, bool, int, float, str) whose leaves may also be tensors or Flower ``ArrayRecord``
objects; a record is stored as the bytes of Flower's own protobuf serialization (a uint8
tensor), so an encoded payload (FP8 smashed data, say) comes back bit for bit.

Every byte of ``checkpoint.json`` is covered: a digest per top-level section, finer ones (each
key of a section, each history round, each entry of the state's tensor map) that name what an
edit changed, one digest over all of those, and the file must be exactly the text the writer
makes of its values (so spacing and spelling are covered too); see
``flsplit.runtime.checkpoint_seal``. The digests are plain SHA-256, not an HMAC: they make any
edit or corruption evident, but not a forgery by someone who also recomputes them (a key would
have to be kept apart from the run directory, and a checkpoint could no longer be moved).

Writing is atomic: the tensor file first, then ``checkpoint.json`` (each a temporary file
moved into place with ``os.replace``), then the tensor files of older rounds are removed. A
crash at any point leaves the previous complete checkpoint. Reading refuses, with a
``CheckpointError`` that names the problem, a missing, truncated or altered file (for
``checkpoint.json``, the parts that changed), another format or version (version 1, from before
the digests, included: whether it was edited cannot be told), and a state that refers to
tensors the file does not hold.

Example::

    save_checkpoint(run_dir, 3, config={"strategy": "PSL"}, state={"model": sd}, history={...})
    ckpt = load_checkpoint(run_dir)
    check_config(ckpt, {"strategy": "PSL"})      # CheckpointMismatch names what differs
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_from_proto, array_record_to_proto
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord

from flsplit.runtime.checkpoint_seal import DIGESTS, find_tampering, seal

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatch",
    "check_config",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "flsplit-checkpoint"
VERSION = 2  # 2: checkpoint.json carries digests; version 1 had none
CHECKPOINT_FILE = "checkpoint.json"
_TENSOR_FILE = re.compile(r"checkpoint-(\d+)\.pt")
_TENSOR, _RECORD = "$tensor", "$record"  # a leaf's reference into the tensor file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, or of another format."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written by a run with other settings than this one."""


@dataclass
class Checkpoint:
    """A checkpoint as read back.

    Attributes
    ----------
    path : Path
        Its ``checkpoint.json``.
    round : int
        The last round it holds; a resumed run goes on with ``round + 1``.
    config : dict
        The fingerprint of the run that wrote it (see ``check_config``).
    state : dict
        The strategy's state, tensors and records in place.
    history : dict
        The run's history (``flsplit.runtime.history.RunHistory.data``) after ``round``.
    """

    path: Path
    round: int
    config: dict
    state: dict
    history: dict

    @property
    def directory(self) -> Path:
        """The run directory it belongs to."""
        return self.path.parent


# ------------------------------------------------------------------ the state tree
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """``value`` as JSON, its tensors and records moved to ``tensors``."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu()
        return {_TENSOR: name}
    if isinstance(value, ArrayRecord):
        name = f"t{len(tensors)}"
        data = bytearray(array_record_to_proto(value).SerializeToString())
        tensors[name] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return {_RECORD: name}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint state at {where}: key {key!r} is not a string")
            out[key] = _encode(item, tensors, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic):  # numpy scalars from planners and the cost model
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state at {where}: cannot store a {type(value).__name__}")


def _is_reference(value: Any) -> bool:
    """Whether ``value`` (read from JSON) is a leaf's reference into the tensor file."""
    return isinstance(value, dict) and len(value) == 1 and (_TENSOR in value or _RECORD in value)


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of ``_encode``; a reference to a missing tensor is a ``CheckpointError``."""
    if isinstance(value, dict):
        if _is_reference(value):
            (kind, name), = value.items()
            if not isinstance(name, str) or name not in tensors:
                raise CheckpointError(f"state at {where} refers to tensor {name!r}, which the tensor file does not hold")
            tensor = tensors[name]
            if kind == _TENSOR:
                return tensor
            try:
                return array_record_from_proto(ProtoArrayRecord.FromString(tensor.numpy().tobytes()))
            except Exception as err:  # protobuf's DecodeError, or an array Flower refuses
                raise CheckpointError(f"state at {where} is not a serialized ArrayRecord ({type(err).__name__})") from None
        return {k: _decode(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return float(value)  # as flsplit.runtime.history writes the history


def _check_digests(meta: dict, text: bytes, path: Path) -> None:
    """Refuse ``checkpoint.json`` (``meta``, read from ``text``) if any byte of it changed after
    it was written, naming the parts that changed, or if it has no digests to tell."""
    if DIGESTS not in meta:
        if meta.get("version") == 1:
            raise CheckpointError(
                f"{path} was written by an older flsplit (checkpoint version 1) without digests: whether it "
                "was edited cannot be told, so it is refused (resume with the flsplit that wrote it, or start again)"
            )
        if meta.get("version") == VERSION:  # every version-2 checkpoint is written with them
            raise CheckpointError(f"altered checkpoint {path}: its digests were removed")
        return  # another version: refused as one next
    problem = find_tampering(meta, text, _is_reference)
    if problem is not None:
        raise CheckpointError(f"altered checkpoint {path}: {problem}")


# ------------------------------------------------------------------ saving and loading
def save_checkpoint(directory: Union[str, Path], server_round: int, config: dict, state: dict, history: dict) -> Path:
    """Write the checkpoint after ``server_round`` into ``directory``; returns its ``checkpoint.json``.

    Parameters
    ----------
    directory : str or Path
        The run directory (created if missing).
    server_round : int
        The round just finished.
    config : dict
        The run's fingerprint: plain JSON values only.
    state : dict
        The strategy's state (see the module docstring for what leaves it may hold).
    history : dict
        The history so far (JSON values; numbers numpy may have made are converted).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "state")
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    blob = buffer.getvalue()
    name = f"checkpoint-{int(server_round)}.pt"
    _write_atomic(directory / name, blob)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(server_round),
        "config": config,
        "state": encoded,
        "tensors": {"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
        "history": history,
    }
    meta = json.loads(json.dumps(meta, default=_json_default))  # plain JSON values, as a reader sees them
    path = directory / CHECKPOINT_FILE
    _write_atomic(path, json.dumps(seal(meta, _is_reference)).encode())
    for old in directory.iterdir():  # only now is the previous round's tensor file unreferenced
        if _TENSOR_FILE.fullmatch(old.name) and old.name != name:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(source: Union[str, Path]) -> Checkpoint:
    """Read the checkpoint of a run directory (or its ``checkpoint.json``), checked whole.

    Raises
    ------
    CheckpointError
        No checkpoint there, or one that is truncated, altered (any byte of ``checkpoint.json``:
        the error names the parts changed) or of another format or version.
    """
    source = Path(source).expanduser()
    path = source / CHECKPOINT_FILE if source.is_dir() else source
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {source}: expected {path} (a run directory writes one after every round)")
    text = path.read_bytes()
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint {path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or (meta.get("format") != FORMAT and DIGESTS not in meta):
        raise CheckpointError(f"{path} is not an flsplit checkpoint (format {FORMAT!r} expected)")
    _check_digests(meta, text, path)  # before the structure: an edit is named as one
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an flsplit checkpoint (format {FORMAT!r} expected)")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this flsplit reads version {VERSION}")
    rnd, info, history = meta.get("round"), meta.get("tensors"), meta.get("history")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 1:
        raise CheckpointError(f"corrupt checkpoint {path}: round {rnd!r} is not a round number")
    for key, kind in (("config", dict), ("state", dict), ("history", dict), ("tensors", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"corrupt checkpoint {path}: '{key}' missing or not an object")
    rounds = history.get("rounds")
    if not isinstance(rounds, list) or [r.get("round") if isinstance(r, dict) else None for r in rounds] != list(range(1, rnd + 1)):
        raise CheckpointError(f"corrupt checkpoint {path}: its history does not hold rounds 1..{rnd}")
    name = info.get("file")
    if not isinstance(name, str) or not _TENSOR_FILE.fullmatch(name):  # a plain name in this directory
        raise CheckpointError(f"corrupt checkpoint {path}: tensor file {name!r} is not a checkpoint-<round>.pt name")
    tensor_path = path.parent / name
    if not tensor_path.is_file():
        raise CheckpointError(f"incomplete checkpoint {path}: its tensor file {tensor_path} is missing")
    blob = tensor_path.read_bytes()
    if len(blob) != info.get("bytes") or hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise CheckpointError(
            f"corrupt checkpoint {path}: {name} has {len(blob)} bytes that do not match the "
            f"{info.get('bytes')} bytes and checksum recorded (truncated or modified)"
        )
    try:
        tensors = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler refuses is a bad file
        raise CheckpointError(f"corrupt checkpoint {path}: {name} does not load ({type(err).__name__})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise CheckpointError(f"corrupt checkpoint {path}: {name} does not hold a dict of tensors")
    state = _decode(meta["state"], tensors, "state")
    return Checkpoint(path=path.resolve(), round=rnd, config=meta["config"], state=state, history=history)


# ------------------------------------------------------------------ matching a run
_NOT_SET = object()


def _shown(value: Any) -> str:
    if value is _NOT_SET:
        return "(not set)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(saved: Any, current: Any, key: str) -> list[str]:
    """``key: checkpoint X, this run Y`` for every differing leaf; a subtree only one side has
    is one difference."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _differences(saved.get(k, _NOT_SET), current.get(k, _NOT_SET), f"{key}.{k}" if key else str(k))
        return out
    if saved is _NOT_SET or current is _NOT_SET or saved != current:
        return [f"{key}: checkpoint {_shown(saved)}, this run {_shown(current)}"]
    return []


def check_config(checkpoint: Checkpoint, config: dict) -> None:
    """Refuse a checkpoint whose run had other settings than ``config`` (this run's fingerprint).

    Raises
    ------
    CheckpointMismatch
        Naming every differing setting (dotted, e.g. ``train.seed``) with its value in the
        checkpoint and in this run.
    """
    current = json.loads(json.dumps(config, default=_json_default))  # tuples as lists, as saved
    diffs = _differences(checkpoint.config, current, "")
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {checkpoint.path} was written by a run that does not match this one: " + "; ".join(diffs)
        )
