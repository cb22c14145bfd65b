"""Client runtime: the ClientApp side of the split exchange.

Nothing survives in memory between messages (deployment starts a fresh process per message,
simulation routes a node's messages to different workers), so everything lives in
``context.state``: the client part's weights, the optimizer state, the data cursor. The
autograd graph cannot survive either: when a gradient arrives, the client recomputes the
forward pass of that batch (same weights, same data, same dropout seed) and back-propagates
the gradient through it.

Batch order is reproducible from the seed: local data is a stream of epochs, epoch ``e``
being a permutation of the local samples drawn from ``SeedSequence([seed, salt, e])``
(``salt`` tells clients apart, e.g. the partition id); batch ``j`` of epoch ``e`` is at stream
*position* ``e * batches_per_epoch + j``. The state keeps positions, never data.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from flsplit import protocol as p
from flsplit.codecs import get_codec
from flsplit.data import TensorData
from flsplit.scenario import DEVICE_KEYS
from flsplit.splitting import SplitModel

__all__ = ["SplitClient"]

_WEIGHTS = "flsplit.client.weights"
_OPTIM = "flsplit.client.optim"
_CURSOR = "flsplit.client.cursor"


def _seed(*entropy: int) -> int:
    """A 32-bit seed derived from integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


@lru_cache(maxsize=64)
def _epoch_order(seed: int, salt: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of one epoch (read-only cache: a pure function of its arguments)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, salt, epoch)))


def _momentum_record(optimizer: Optional[torch.optim.SGD]) -> ArrayRecord:
    """SGD's only state, the momentum buffers, as arrays keyed by parameter index."""
    record = ArrayRecord()
    if optimizer is not None:
        for i, param in enumerate(optimizer.param_groups[0]["params"]):
            buf = optimizer.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                record[str(i)] = Array(buf)
    return record


def _load_momentum(optimizer: torch.optim.SGD, record: ArrayRecord) -> None:
    params = optimizer.param_groups[0]["params"]
    for key, array in record.items():
        optimizer.state[params[int(key)]]["momentum_buffer"] = torch.from_numpy(array.numpy().copy())


def _dtype(module: nn.Module) -> torch.dtype:
    """Floating dtype of a module's parameters (float32 if it has none)."""
    return next((t.dtype for t in module.parameters()), torch.float32)


class SplitClient:
    """Handles the split-learning messages of one ClientApp.

    Parameters
    ----------
    model_fn : callable
        Returns the full ``SplitModel`` (only its client blocks are used); called once per
        worker thread and cut, the module is then reused as scratch space, its weights
        always reloaded from the message or ``context.state``.
    train_data : TensorData
        The local training data.
    eval_data : TensorData, optional
        Local evaluation data for ``evaluate.split_eval``.
    salt : int
        Distinguishes this client's shuffling from other clients' (e.g. the partition id).
    """

    def __init__(
        self,
        model_fn: Callable[[], SplitModel],
        train_data: TensorData,
        eval_data: Optional[TensorData] = None,
        salt: int = 0,
    ) -> None:
        self.model_fn = model_fn
        self.train_data = train_data
        self.eval_data = eval_data
        self.salt = salt
        self._scratch = threading.local()

    # ------------------------------------------------------------------ helpers
    def _client_part(self, cut: int) -> nn.Sequential:
        cache = self._scratch.__dict__.setdefault("parts", {})
        if cut not in cache:
            cache[cut] = self.model_fn().client_part(cut)
        return cache[cut]

    def _batches_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.train_data) // batch_size)

    def _batch(self, cfg: p.SplitConfig, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self._batches_per_epoch(cfg.batch_size)
        epoch, j = divmod(position, nb)
        if cfg.shuffle:
            order = _epoch_order(cfg.seed, self.salt, epoch, len(self.train_data))
            index = order[j * cfg.batch_size : (j + 1) * cfg.batch_size]
        else:
            index = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
        return self.train_data.x[index], self.train_data.y[index]

    def _config_and_part(self, content: RecordDict) -> tuple[p.SplitConfig, nn.Sequential]:
        """The request's ``SplitConfig`` and the client-part module for its cut."""
        if p.CONFIG not in content.config_records:
            raise p.ProtocolError(f"request has no '{p.CONFIG}' record")
        cfg = p.SplitConfig.from_record(content.config_records[p.CONFIG])
        return cfg, self._client_part(cfg.cut)

    def _forward(self, part: nn.Module, x: torch.Tensor, cfg: p.SplitConfig, position: int) -> torch.Tensor:
        """Forward with a dropout seed fixed by client and position, so a recompute is identical."""
        dtype = _dtype(part)
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also queue lazy CUDA seeding.
            torch.default_generator.manual_seed(_seed(cfg.seed, self.salt, position))
            return part(x.to(dtype))

    # ------------------------------------------------------------------ train
    def train_step(self, message: Message, context: Context) -> Message:
        """One fused exchange: apply the gradients of the pending batches, send the next ones."""
        content = message.content
        cfg, part = self._config_and_part(content)
        part.train()
        state = context.state

        if p.CLIENT_PART in content.array_records:  # a new round starts
            weights = content.array_records[p.CLIENT_PART]
            cursor = state.config_records.get(_CURSOR, ConfigRecord({"position": 0}))
            steps = cfg.max_steps or cfg.local_epochs * self._batches_per_epoch(cfg.batch_size)
            position = int(cursor["position"])
            cursor = ConfigRecord(
                {"position": position, "round_end": position + steps, "pending": [], "num_examples": 0}
            )
            optim_state = None
        else:
            if _WEIGHTS not in state.array_records or _CURSOR not in state.config_records:
                raise p.ProtocolError(f"no round in progress: the first request must carry '{p.CLIENT_PART}'")
            weights = state.array_records[_WEIGHTS]
            cursor = state.config_records[_CURSOR]
            optim_state = state.array_records.get(_OPTIM)
        try:
            part.load_state_dict(weights.to_torch_state_dict())
        except RuntimeError as err:
            raise p.ProtocolError(f"'{p.CLIENT_PART}' does not fit cut {cfg.cut}: {err}") from err
        # A client part without parameters (e.g. a cut after a parameter-free first block)
        # has nothing to train but still recomputes and sends its activations.
        params = list(part.parameters())
        optimizer = (
            torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            if params
            else None
        )
        if optim_state is not None and optimizer is not None:
            _load_momentum(optimizer, optim_state)

        pending = list(cursor["pending"])
        num_examples = int(cursor["num_examples"])
        if p.GRAD in content.array_records or p.BCAST in content.array_records:
            grads = p.assemble_grads(
                content.array_records.get(p.GRAD),
                content.array_records.get(p.BCAST),
                content.config_records.get(p.BCAST_CONFIG),
                get_codec(cfg.codec_down),
                _dtype(part),
            )
            if len(grads) != len(pending):
                raise p.ProtocolError(f"got {len(grads)} gradients for {len(pending)} pending batches")
            for position, grad in zip(pending, grads):
                x, _ = self._batch(cfg, position)
                out = self._forward(part, x, cfg, position)  # recompute: the graph did not survive
                p.check_tensor(f"{p.GRAD} for position {position}", grad, tuple(out.shape), out.dtype)
                if optimizer is not None:
                    optimizer.zero_grad(set_to_none=True)
                    out.backward(grad)
                    optimizer.step()
                num_examples += x.shape[0]
        # Without gradients the pending batches were dropped by the server: skip them.

        position, round_end = int(cursor["position"]), int(cursor["round_end"])
        state.array_records[_WEIGHTS] = ArrayRecord(part.state_dict())
        state.array_records[_OPTIM] = _momentum_record(optimizer)

        reply = RecordDict()
        if p.CLIENT_PART in content.array_records:  # tell the server who this device is
            reply[p.DEVICE] = self._device_record(context)
        if position >= round_end:
            reply[p.CLIENT_PART] = state.array_records[_WEIGHTS]
            reply[p.METRICS] = MetricRecord({"num-examples": num_examples})
            reply[p.STATUS] = ConfigRecord({"done": True, "position": position})
            pending = []
        else:
            pending = list(range(position, min(position + cfg.steps_per_exchange, round_end)))
            batches = []
            with torch.no_grad():  # buffers changed here are not saved: the recompute updates them
                for pos in pending:
                    x, y = self._batch(cfg, pos)
                    batches.append(p.SmashedBatch(self._forward(part, x, cfg, pos), y))
            reply[p.SMASHED] = p.encode_batches(batches, get_codec(cfg.codec_up))
            reply[p.STATUS] = ConfigRecord(
                {"done": False, "position": position, "remaining": round_end - position}
            )
            position = pending[-1] + 1
        state.config_records[_CURSOR] = ConfigRecord(
            {"position": position, "round_end": round_end, "pending": pending, "num_examples": num_examples}
        )
        return Message(reply, reply_to=message)

    def _device_record(self, context: Context) -> ConfigRecord:
        """Partition id and the numeric device-profile keys of the node config."""
        record = {"partition-id": int(context.node_config.get("partition-id", self.salt))}
        for key in DEVICE_KEYS:
            if key in context.node_config:
                record[key] = float(context.node_config[key])
        return ConfigRecord(record)

    def describe(self, message: Message, context: Context) -> Message:
        """Who this node is, for a planner (``query.split_device``): partition id, the device
        profile of its node config, and its numbers of training and evaluation samples."""
        record = self._device_record(context)
        record["num-train-examples"] = len(self.train_data)
        record["num-eval-examples"] = len(self.eval_data) if self.eval_data is not None else 0
        return Message(RecordDict({p.DEVICE: record}), reply_to=message)

    # ------------------------------------------------------------------ upload
    def upload(self, message: Message, context: Context) -> Message:
        """One-way upload (async SL, state B): smashed data of a whole window, frozen client part.

        The client part is not trained and no gradient will come back: the client computes
        the window's batches with the weights it holds in ``context.state`` and sends them
        all in this one reply; only the data cursor moves.
        """
        cfg, part = self._config_and_part(message.content)
        state = context.state
        if _WEIGHTS not in state.array_records or _CURSOR not in state.config_records:
            raise p.ProtocolError("no client part to upload with: the client has not trained yet")
        part.load_state_dict(state.array_records[_WEIGHTS].to_torch_state_dict())
        part.train()
        position = int(state.config_records[_CURSOR]["position"])
        steps = cfg.max_steps or cfg.local_epochs * self._batches_per_epoch(cfg.batch_size)
        batches = []
        with torch.no_grad():
            for pos in range(position, position + steps):
                x, y = self._batch(cfg, pos)
                batches.append(p.SmashedBatch(self._forward(part, x, cfg, pos), y))
        state.config_records[_CURSOR] = ConfigRecord(
            {"position": position + steps, "round_end": position + steps, "pending": [], "num_examples": 0}
        )
        reply = RecordDict(
            {
                p.SMASHED: p.encode_batches(batches, get_codec(cfg.codec_up)),
                p.METRICS: MetricRecord({"num-examples": sum(int(b.y.shape[0]) for b in batches)}),
            }
        )
        return Message(reply, reply_to=message)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, message: Message, context: Context) -> Message:
        """Send the smashed data of all local evaluation data (eval mode) with its labels."""
        content = message.content
        cfg, part = self._config_and_part(content)
        if p.CLIENT_PART in content.array_records:
            weights = content.array_records[p.CLIENT_PART]
        elif _WEIGHTS in context.state.array_records:
            weights = context.state.array_records[_WEIGHTS]
        else:
            raise p.ProtocolError(f"no client part to evaluate: send '{p.CLIENT_PART}'")
        part.load_state_dict(weights.to_torch_state_dict())
        part.eval()
        data = self.eval_data if self.eval_data is not None else TensorData(torch.empty(0), torch.empty(0))
        batches = []
        with torch.no_grad():
            dtype = _dtype(part)
            for start in range(0, len(data), cfg.batch_size):
                chunk = data.subset(slice(start, start + cfg.batch_size))
                batches.append(p.SmashedBatch(part(chunk.x.to(dtype)), chunk.y))
        reply = RecordDict(
            {p.SMASHED: p.encode_batches(batches, get_codec(cfg.codec_up)), p.METRICS: MetricRecord({"num-examples": len(data)})}
        )
        return Message(reply, reply_to=message)

    @staticmethod
    def noop(message: Message, context: Context) -> Message:
        """Answer at once with an empty reply (measures the exchange floor)."""
        return Message(RecordDict(), reply_to=message)
