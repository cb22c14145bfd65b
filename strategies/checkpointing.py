"""What a split strategy carries from one round to the next, saved after each round and restored to resume.

A ``SplitStrategy``'s ``checkpoint_config`` / ``checkpoint_state`` / ``restore_state`` start
from ``strategy_config`` / ``strategy_state`` / ``restore_strategy_state`` here (schemes
extend them). The round loop calls ``save`` after each round when ``checkpoint_dir`` is set
and ``resume`` before anything runs; both add a planner in the loop's part. The file format
is ``flsplit.runtime.checkpoint``'s.

What survives a round, and so what is saved:

- the global model (every block), and the server part's own random stream (its dropout
  masks: ``SplitStrategy.server_stream``'s CPU generator; sampling is seeded per round:
  nothing to save);
- with ``carry_momentum``, the shared server part's SGD momentum;
- which device each node is (``devices``);
- the planner in the loop, if any (``flsplit.strategies.planning.RoundPlanning``: for
  ``Adaptive``, the nodes identified and the planner's own state), under ``planner``;
- scheme state, in the subclasses' overrides: PSL's per-client parts without ``sync_clients``,
  EPSL's position generator, async SL's states, reference losses and cache;
- the history so far.

Server parts and their optimizers are rebuilt every round, so nothing else of theirs is
saved. A client's own cross-round state (its data cursor; with ``carry_momentum`` its
momentum) lives in its node's ``context.state``, on the client: a resumed run on the same
nodes (same grid) continues it, a new ``flwr run`` starts clients afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Optional, Union

import torch
from flwr.common.logger import log

from flsplit.runtime.checkpoint import Checkpoint, CheckpointError, check_config, load_checkpoint, save_checkpoint
from flsplit.runtime.history import RunHistory
from flsplit.runtime.server_stream import ServerStream
from flsplit.sim.scenario import DeviceProfile
from flsplit.model.splitting import SplitModel
from flsplit.strategies.planning import RoundPlanning
from flsplit.strategies.settings import SplitSettings

__all__ = ["strategy_config", "strategy_state", "restore_strategy_state", "save", "resume"]


def strategy_config(name: str, model: SplitModel, settings: SplitSettings) -> dict:
    """The settings a run resumed from a checkpoint of strategy ``name`` must share (JSON values).

    A ``cut_layer`` given as a function cannot be compared and is recorded as ``"callable"``.
    """
    blocks = model.blocks.state_dict()
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in blocks.items()]
    cut = settings.cut_layer
    return {
        "strategy": name,
        "model": {
            "blocks": model.num_blocks,
            "tensors": len(layout),
            "parameters": sum(v.numel() for v in blocks.values()),
            "dtype": str(next(model.blocks.parameters()).dtype),
            "layout": hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16],  # names, shapes, dtypes
        },
        "input_shape": list(settings.input_shape),
        "num_classes": settings.num_classes,
        "cut_layer": "callable" if callable(cut) else (list(cut) if isinstance(cut, (list, tuple)) else int(cut)),
        # tail_cut only in a U-shaped run: the checkpoints of other runs stay as they were
        "train": {k: v for k, v in settings.train_settings().items() if k != "tail_cut" or v},
        "fraction_train": settings.fraction_train,
        "min_train_nodes": settings.min_train_nodes,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_evaluate_nodes": settings.min_evaluate_nodes,
        "scenario": settings.scenario.as_dict() if settings.scenario is not None else None,
    }


def strategy_state(model: SplitModel, server_stream: ServerStream, server_momentum: dict, devices: dict) -> dict:
    """The state every scheme carries into the next round (see the module docstring)."""
    return {
        "model": model.blocks.state_dict(),
        "torch_rng": server_stream.cpu.clone(),  # the server part's dropout stream
        "server_momentum": dict(server_momentum),  # empty without carry_momentum
        "devices": {
            str(n): {"partition": pid, "profile": dataclasses.asdict(own) if own is not None else None}
            for n, (pid, own) in sorted(devices.items())
        },
    }


def restore_strategy_state(state: dict, model: SplitModel, server_stream: ServerStream) -> tuple[dict, dict]:
    """Load ``strategy_state``'s model and dropout stream back; returns its server momentum and devices."""
    model.blocks.load_state_dict(state["model"])
    if not isinstance(state["torch_rng"], torch.Tensor) or state["torch_rng"].dtype != torch.uint8:
        raise ValueError("torch_rng is not a generator state")
    torch.Generator().set_state(state["torch_rng"])  # refuses a state that is not one
    server_stream.cpu = state["torch_rng"].clone()
    devices = {
        int(n): (int(d["partition"]), DeviceProfile(**d["profile"]) if d["profile"] is not None else None)
        for n, d in state["devices"].items()
    }
    return dict(state["server_momentum"]), devices


def _with_planner(config: dict, state: Optional[dict], planning: Optional[RoundPlanning]) -> tuple[dict, dict]:
    """A strategy's checkpoint config and state, with the planner in the loop's (if any) under ``planner``."""
    state = state or {}
    if planning is None:
        return config, {**state, "planner": None}
    return {**config, "planner": planning.planner_config()}, {**state, "planner": planning.planner_state()}


def save(directory: Union[str, Path], server_round: int, config: dict, state: dict, planning: Optional[RoundPlanning],
         history: RunHistory) -> Path:
    """Write the checkpoint after ``server_round`` into ``directory``: the strategy's ``config``
    and ``state``, the planner in the loop's, and the history."""
    config, state = _with_planner(config, state, planning)
    return save_checkpoint(Path(directory), server_round, config, state, history.data)


def resume(source: Union[str, Path, Checkpoint], num_rounds: int, config: dict, restore: Callable[[dict], None],
           planning: Optional[RoundPlanning], history: RunHistory) -> int:
    """Continue from a checkpoint (a run directory, its ``checkpoint.json``, or one already
    read): ``restore`` (the strategy's) and ``planning`` take its state back, ``history`` goes
    on from its history; returns the round it was taken after. Refuses, before anything is
    changed, a corrupt checkpoint, one written by a run with another ``config`` (or planner),
    and one that leaves no round of ``num_rounds`` to run."""
    checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    check_config(checkpoint, _with_planner(config, None, planning)[0])
    if checkpoint.round >= num_rounds:
        raise ValueError(
            f"the checkpoint {checkpoint.path} holds {checkpoint.round} rounds: num_rounds={num_rounds} "
            "leaves none to run (num_rounds counts from the run's first round)"
        )
    try:
        restore(checkpoint.state)
        if planning is not None:
            planning.restore_planner(checkpoint.state["planner"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"corrupt checkpoint {checkpoint.path}: its state does not restore "
                              f"({type(err).__name__}: {err})") from None
    history.resume(checkpoint.history, checkpoint.round)
    log(INFO, "[flsplit] resuming from %s after round %d", checkpoint.path, checkpoint.round)
    return checkpoint.round
