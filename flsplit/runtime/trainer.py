"""The client-side trainer of split learning, with no Flower types.

A ``ClientTrainer`` is one client's round: its client part (an ``nn.Module``), the part's
SGD optimizer, and a data cursor. It does the two things a split client does:

* ``next_batches``: the smashed data of the next ``K`` batches (and their labels);
* ``apply_gradients``: back-propagate the gradients the server returned for those batches
  through the client part and step the optimizer, in order.

Transports adapt it: ``flsplit.runtime.client.SplitClient`` keeps nothing in memory between Flower
messages, so it saves ``state()`` into ``context.state`` and rebuilds the trainer from it on
the next message; the autograd graph cannot survive that, so it recomputes each batch's
forward pass (same weights, data and dropout seed) when the gradient arrives. A transport
that keeps the trainer alive for a whole round can pass ``keep_graph=True`` to
``next_batches`` (one batch per exchange), and ``apply_gradients`` back-propagates through the
kept graph instead of recomputing.

In a U-shaped split (``cfg.tail_cut > 0``) the part holds the head blocks and the tail blocks
(``SplitModel.client_part(cut, tail_cut)``); ``next_batches`` sends the head's output without
labels, and ``tail_step`` runs the tail and the loss on the server part's output, steps the
tail and returns the gradient at its input. The head's gradient then comes as in any scheme.

Batch order is reproducible from the seed: local data is a stream of epochs, epoch ``e``
being a permutation of the local samples drawn from ``SeedSequence([seed, salt, e])``;
batch ``j`` of epoch ``e`` is at stream *position* ``e * batches_per_epoch + j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from flsplit.model import rng
from flsplit.model.splitting import exchanged_keys
from flsplit.model.loss import correct, loss_sum
from flsplit.data.datasets import TensorData
from flsplit.runtime.optim import build_optimizer, load_state_tensors, state_fits, state_tensors
from flsplit.wire.protocol import ACTS as p_acts, ProtocolError, SmashedBatch, SplitConfig, check_tensor

__all__ = ["Cursor", "ClientTrainer", "round_steps", "module_dtype", "model_input"]


@lru_cache(maxsize=4096)
def _seed(*entropy: int) -> int:
    """A 32-bit seed derived from integers (numpy's ``SeedSequence``; a pure function, cached:
    a batch's dropout seed is asked for when it is sent and again when it is recomputed)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


_TAIL = 1  # tells a U-shaped split's tail dropout apart from its head's


@lru_cache(maxsize=64)
def _epoch_order(seed: int, salt: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of one epoch (read-only cache: a pure function of its arguments)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, salt, epoch)))


def module_dtype(module: nn.Module) -> torch.dtype:
    """Floating dtype of a module's parameters (float32 if it has none)."""
    return next((t.dtype for t in module.parameters()), torch.float32)


def model_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Samples as a module takes them: floats in its parameters' dtype; token ids as they are."""
    return x.to(module_dtype(module)) if x.is_floating_point() else x


def round_steps(cfg: SplitConfig, num_samples: int) -> int:
    """Batches in a round: ``max_steps``, or the local epochs' batches; none without data (a
    node whose partition is empty ends its round at once, with 0 examples)."""
    if num_samples == 0:
        return 0
    return cfg.max_steps or cfg.local_epochs * -(-num_samples // cfg.batch_size)


@dataclass
class Cursor:
    """Where a client is in its data stream and its round.

    Attributes
    ----------
    position : int
        Stream position of the next batch to send.
    round_end : int
        Position where this round ends.
    pending : list of int
        Positions sent and awaiting their gradients.
    num_examples : int
        Samples trained this round.
    """

    position: int = 0
    round_end: int = 0
    pending: list[int] = field(default_factory=list)
    num_examples: int = 0

    def as_dict(self) -> dict:
        return {"position": self.position, "round_end": self.round_end, "pending": list(self.pending),
                "num_examples": self.num_examples}


class ClientTrainer:
    """One client's round of split training (see the module docstring).

    Parameters
    ----------
    part : nn.Module
        The client part (blocks ``[0, cut)``); its weights are loaded from ``weights``.
    data : TensorData
        The local training data.
    cfg : SplitConfig
        The round's settings (cut, batch size, SGD, seed, shuffling, K).
    salt : int
        Tells this client's shuffling and dropout apart from other clients'.
    weights : mapping of str to Tensor
        The client part's weights to start from.
    cursor : Cursor
        The data cursor.
    momentum : mapping of str to Tensor, optional
        The optimizer's state by parameter index (``flsplit.runtime.optim.state_tensors``;
        none at a round's start).
    """

    def __init__(self, part: nn.Module, data: TensorData, cfg: SplitConfig, salt: int,
                 weights: Mapping[str, torch.Tensor], cursor: Cursor,
                 momentum: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.part, self.data, self.cfg, self.salt, self.cursor = part, data, cfg, salt, cursor
        # The head runs to the cut; a U-shaped split's tail (the part's later blocks) holds the loss.
        self.head = part[: cfg.cut] if cfg.tail_cut else part
        self.tail: Optional[nn.Module] = part[cfg.cut :] if cfg.tail_cut else None
        # Only what trains and the buffers travel (``exchanged_keys``): frozen weights (LoRA's base,
        # a frozen client part) are the part's own, from the model's construction.
        missing = set(exchanged_keys(part)) - set(weights)
        try:
            if missing:
                raise RuntimeError(f"missing key(s) {sorted(missing)[:3]}")
            part.load_state_dict(dict(weights), strict=False)
        except RuntimeError as err:
            raise ProtocolError(f"the client part does not fit cut {cfg.cut}: {err}") from err
        part.train()
        # A client part without trainable parameters (a parameter-free first block, a frozen
        # part) has nothing to train but still computes and sends its activations.
        params = [q for q in part.parameters() if q.requires_grad]
        self.optimizer = (
            build_optimizer(params, cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay) if params else None
        )
        if momentum and self.optimizer is not None:
            load_state_tensors(self.optimizer, {str(i): p for i, p in enumerate(params)}, momentum)
        # A head with nothing to train (a frozen client part, or a U-shape's frozen head) takes no
        # gradient: the server sends none, and its batches count as trained when the next request comes.
        self.head_trains = any(q.requires_grad for q in self.head.parameters())
        self._graphs: dict[int, torch.Tensor] = {}  # position -> output with its graph (kept rounds)

    @classmethod
    def start_round(cls, part: nn.Module, data: TensorData, cfg: SplitConfig, salt: int,
                    weights: Mapping[str, torch.Tensor], position: int = 0,
                    momentum: Optional[Mapping[str, torch.Tensor]] = None) -> "ClientTrainer":
        """A trainer at the start of a round: cursor at ``position``; a fresh optimizer, or
        with ``momentum`` (``carry_momentum``: last round's optimizer state, used only if it
        fits this part's parameters one for one)."""
        cursor = Cursor(position, position + round_steps(cfg, len(data)), [], 0)
        params = {str(i): p for i, p in enumerate(q for q in part.parameters() if q.requires_grad)}
        if momentum and not state_fits(momentum, params):
            momentum = None  # another cut's parameters: start fresh
        return cls(part, data, cfg, salt, weights, cursor, momentum)

    # ------------------------------------------------------------------ data and forward
    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and labels of the batch at a stream position."""
        index = self._rows(position)
        if isinstance(index, slice):
            return self.data.x[index], self.data.y[index]
        # x[index], not index_select: the same values, but index_select's output changed the
        # float results downstream (the last bits of the histories' losses)
        return self.data.x[index], self.data.y[index]

    def labels(self, position: int) -> torch.Tensor:
        """The labels of the batch at a stream position (``batch``'s, without gathering its samples)."""
        index = self._rows(position)
        return self.data.y[index]

    def _rows(self, position: int) -> torch.Tensor | slice:
        """Which local samples the batch at a stream position holds."""
        cfg, n = self.cfg, len(self.data)
        epoch, j = divmod(position, -(-n // cfg.batch_size))
        if cfg.shuffle:
            return _epoch_order(cfg.seed, self.salt, epoch, n)[j * cfg.batch_size : (j + 1) * cfg.batch_size]
        return slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)

    def forward(self, position: int) -> torch.Tensor:
        """The client part's output on a batch, with a dropout seed fixed by client and
        position so that a recompute is identical."""
        x, _ = self.batch(position)
        with rng.seeded(_seed(self.cfg.seed, self.salt, position)):
            return self.head(model_input(x, self.part))

    @property
    def done(self) -> bool:
        """Whether every batch of the round was sent (and its gradient applied)."""
        return self.cursor.position >= self.cursor.round_end and not self.cursor.pending

    # ------------------------------------------------------------------ the two steps
    def apply_gradients(self, grads: list[torch.Tensor]) -> None:
        """Back-propagate the gradients of the pending batches, in order, one step each.

        Raises ``ProtocolError`` (before any step) if their number does not match the
        pending batches, and if a gradient's shape or dtype does not match its batch.
        """
        pending = self.cursor.pending
        if len(grads) != len(pending):
            raise ProtocolError(f"got {len(grads)} gradients for {len(pending)} pending batches")
        for position, grad in zip(pending, grads):
            out = self._graphs.pop(position, None)
            if out is None:
                out = self.forward(position)  # recompute: the graph did not survive
            check_tensor(f"gradient for position {position}", grad, tuple(out.shape), out.dtype)
            if self.head_trains:
                self.optimizer.zero_grad(set_to_none=True)
                out.backward(grad)
                self.optimizer.step()
            self.cursor.num_examples += int(out.shape[0])
        self.cursor.pending = []

    def skip_pending(self) -> None:
        """No gradients came for the pending batches: forget them. The server dropped them, or
        this part trains nothing (frozen: SplitFrozen) and the server sends none; its batches
        then count as trained, as the server trained on them."""
        if not self.head_trains:
            self.cursor.num_examples += sum(len(self.labels(position)) for position in self.cursor.pending)
        self.cursor.pending = []
        self._graphs.clear()

    def next_batches(self, *, keep_graph: bool = False) -> list[SmashedBatch]:
        """Smashed data of the next ``K`` batches (empty when the round is over).

        With ``keep_graph`` the outputs keep their autograd graphs for ``apply_gradients``
        (only for transports that keep this trainer alive until the gradients arrive).
        """
        c = self.cursor
        c.pending = list(range(c.position, min(c.position + self.cfg.steps_per_exchange, c.round_end)))
        batches = []
        # Without the graph, the recompute in apply_gradients is the forward that counts: the
        # buffers (batch-norm statistics) this one changes are put back, so every batch
        # updates them once, in the same order, whether the graph is kept or not.
        buffers = None if keep_graph else [b.clone() for b in self.part.buffers()]
        for pos in c.pending:
            y = None if self.tail is not None else self.labels(pos)  # a U-shaped split keeps its labels
            if keep_graph:
                out = self.forward(pos)
                self._graphs[pos] = out
                batches.append(SmashedBatch(out.detach(), y))
            else:
                with torch.no_grad():
                    batches.append(SmashedBatch(self.forward(pos), y))
        if buffers:
            with torch.no_grad():
                for buf, saved in zip(self.part.buffers(), buffers):
                    buf.copy_(saved)
        if c.pending:
            c.position = c.pending[-1] + 1
        return batches

    def tail_step(self, acts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[float, float]]]:
        """A U-shaped split's tail: run the tail blocks and the loss on the server part's output
        for each pending batch, step the tail, and return the gradients at the tail's input
        (of each batch's mean loss) with each batch's loss sum and samples predicted right.

        Raises ``ProtocolError`` before any step if the activations do not fit the pending
        batches (their number, rows, dtype, finite values, or the tail's input)."""
        if self.tail is None:
            raise ProtocolError(f"'{p_acts}' in a split that is not U-shaped")
        pending = self.cursor.pending
        if len(acts) != len(pending):
            raise ProtocolError(f"got {len(acts)} server outputs for {len(pending)} pending batches")
        dtype = module_dtype(self.part)
        for i, (position, a) in enumerate(zip(pending, acts)):
            rows = int(self.labels(position).shape[0])
            check_tensor(f"'{p_acts}' a.{i}", a, (rows, *a.shape[1:]), dtype)
        grads, stats = [], []
        for position, a in zip(pending, acts):
            y = self.labels(position)
            a = a.detach().requires_grad_(True)
            with rng.seeded(_seed(self.cfg.seed, self.salt, position, _TAIL)):
                try:
                    logits = self.tail(a)
                    total = loss_sum(logits, y)
                except RuntimeError as err:  # a shape the tail cannot take
                    raise ProtocolError(f"'{p_acts}': the server part's output does not fit the tail: {err}") from None
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            (total / y.shape[0]).backward()
            if self.optimizer is not None:
                self.optimizer.step()  # only the tail has gradients here: the head's come with the next request
            grads.append(a.grad)
            stats.append((float(total.detach()), correct(logits.detach(), y)))
        return grads, stats

    def window(self, steps: int) -> list[SmashedBatch]:
        """Smashed data of the next ``steps`` batches with the frozen part (async SL's state B)."""
        c = self.cursor
        with torch.no_grad():
            batches = [SmashedBatch(self.forward(pos), self.labels(pos)) for pos in range(c.position, c.position + steps)]
        c.position += steps
        c.round_end = c.position
        c.pending, c.num_examples = [], 0
        return batches

    # ------------------------------------------------------------------ state
    def weights(self) -> dict[str, torch.Tensor]:
        """The client part's weights that travel: what trains, and the buffers (``exchanged_keys``)."""
        state, keys = self.part.state_dict(), exchanged_keys(self.part)
        return {k: state[k] for k in keys}

    def momentum(self) -> dict[str, torch.Tensor]:
        """The optimizer's state by parameter index (SGD's momentum buffers, AdamW's moments
        and step counts: ``flsplit.runtime.optim.state_tensors``)."""
        if self.optimizer is None:
            return {}
        params = self.optimizer.param_groups[0]["params"]
        return state_tensors(self.optimizer, {str(i): p for i, p in enumerate(params)})
