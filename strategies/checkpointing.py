"""What a split strategy carries from one round to the next, saved after each round and restored to resume.

``Checkpointing`` gives a ``SplitStrategy`` its cross-round state as one value
(``checkpoint_state`` / ``restore_state``), the fingerprint a resumed run must share
(``checkpoint_config``), and the two ends of a checkpoint: ``save_checkpoint`` (called by the
round loop after each round when ``checkpoint_dir`` is set) and ``resume`` (called by
``start`` before anything runs). The file format is ``flsplit.checkpoint``'s.

What survives a round, and so what is saved:

- the global model (every block), and the server part's own random stream (its dropout
  masks: ``SplitStrategy.server_stream``'s CPU generator; sampling is seeded per round:
  nothing to save);
- with ``carry_momentum``, the shared server part's SGD momentum;
- which device each node is (``devices``);
- the planner in the loop, if any (``flsplit.strategies.adaptive.Adaptive``: nodes identified, the
  planner's own state);
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
from logging import INFO
from pathlib import Path
from typing import Optional, Union

import torch
from flwr.common.logger import log

from flsplit.checkpoint import Checkpoint, CheckpointError, check_config, load_checkpoint, save_checkpoint
from flsplit.sim.scenario import DeviceProfile

__all__ = ["Checkpointing"]


class Checkpointing:
    """Mixin of ``SplitStrategy``: cross-round state, saved after each round, restored to resume."""

    def checkpoint_config(self) -> dict:
        """The settings a run resumed from this strategy's checkpoint must share (JSON values).

        A ``cut_layer`` given as a function cannot be compared and is recorded as ``"callable"``.
        """
        blocks = self.model.blocks.state_dict()
        layout = [[k, list(v.shape), str(v.dtype)] for k, v in blocks.items()]
        s = self.settings
        cut = s.cut_layer
        config = {
            "strategy": type(self).__name__,
            "model": {
                "blocks": self.model.num_blocks,
                "tensors": len(layout),
                "parameters": sum(v.numel() for v in blocks.values()),
                "dtype": str(self.server_dtype),
                "layout": hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16],  # names, shapes, dtypes
            },
            "input_shape": list(s.input_shape),
            "num_classes": s.num_classes,
            "cut_layer": "callable" if callable(cut) else (list(cut) if isinstance(cut, (list, tuple)) else int(cut)),
            "train": dict(self.train_settings),
            "fraction_train": s.fraction_train,
            "min_train_nodes": s.min_train_nodes,
            "fraction_evaluate": s.fraction_evaluate,
            "min_evaluate_nodes": s.min_evaluate_nodes,
            "scenario": self.scenario.as_dict() if self.scenario is not None else None,
        }
        if self.round_planner is not None:
            config["planner"] = self.round_planner.planner_config()
        return config

    def checkpoint_state(self) -> dict:
        """The state that carries into the next round (see the module docstring)."""
        return {
            "model": self.model.blocks.state_dict(),
            "torch_rng": self.server_stream.cpu.clone(),  # the server part's dropout stream
            "server_momentum": dict(self.server_momentum),  # empty without carry_momentum
            "devices": {
                str(n): {"partition": pid, "profile": dataclasses.asdict(own) if own is not None else None}
                for n, (pid, own) in sorted(self.devices.items())
            },
            "planner": self.round_planner.planner_state() if self.round_planner is not None else None,
        }

    def restore_state(self, state: dict) -> None:
        """Take back what ``checkpoint_state`` returned (subclasses extend both)."""
        self.model.blocks.load_state_dict(state["model"])
        if not isinstance(state["torch_rng"], torch.Tensor) or state["torch_rng"].dtype != torch.uint8:
            raise ValueError("torch_rng is not a generator state")
        torch.Generator().set_state(state["torch_rng"])  # refuses a state that is not one
        self.server_stream.cpu = state["torch_rng"].clone()
        self.server_momentum = dict(state["server_momentum"])
        self.devices = {
            int(n): (int(d["partition"]), DeviceProfile(**d["profile"]) if d["profile"] is not None else None)
            for n, d in state["devices"].items()
        }
        if self.round_planner is not None:
            self.round_planner.restore_planner(state["planner"])

    def save_checkpoint(self, server_round: int) -> Path:
        """Write the checkpoint after ``server_round`` into ``checkpoint_dir``."""
        return save_checkpoint(
            Path(self.settings.checkpoint_dir), server_round, self.checkpoint_config(), self.checkpoint_state(), self.history.data
        )

    def resume(self, source: Union[str, Path, Checkpoint], num_rounds: int) -> int:
        """Continue from a checkpoint (a run directory, its ``checkpoint.json``, or one already
        read); returns the round it was taken after. Refuses, before anything is changed, a
        corrupt checkpoint, one written by a run with other settings, and one that leaves no
        round of ``num_rounds`` to run."""
        checkpoint = source if isinstance(source, Checkpoint) else load_checkpoint(source)
        check_config(checkpoint, self.checkpoint_config())
        if checkpoint.round >= num_rounds:
            raise ValueError(
                f"the checkpoint {checkpoint.path} holds {checkpoint.round} rounds: num_rounds={num_rounds} "
                "leaves none to run (num_rounds counts from the run's first round)"
            )
        try:
            self.restore_state(checkpoint.state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"corrupt checkpoint {checkpoint.path}: its state does not restore "
                                  f"({type(err).__name__}: {err})") from None
        self.history.resume(checkpoint.history, checkpoint.round)
        log(INFO, "[flsplit] resuming from %s after round %d", checkpoint.path, checkpoint.round)
        return checkpoint.round
