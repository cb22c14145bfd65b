"""Per-cut profiles measured from the model with torch's FLOP counter.

Each block is run once forward and once backward on a small batch under
``torch.utils.flop_counter.FlopCounterMode``; a cut's numbers are sums over its blocks.
Block 0 is run with an input that does not require grad (raw data), every other block with
one that does (the server must return the cut-layer gradient), so the backward FLOPs are
what split training really executes. The counter counts matmuls and convolutions, not
element-wise ops: a ``(b x n) @ (n x m)`` matmul is ``2*b*n*m`` FLOPs, so ``Linear(n, m)`` costs
``2*n*m`` forward and ``4*n*m`` backward per sample (``2*n*m``, the weight gradient only, as
block 0), and a convolution's backward is twice its forward (once as block 0).

Measuring leaves the model as it was: weights, batch-norm statistics, gradients, train/eval
mode and torch's random number streams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from flsplit.model.splitting import SplitModel, as_split_model

__all__ = ["BlockProfile", "CutProfile", "ModelProfile", "profile_model"]


@dataclass(frozen=True)
class BlockProfile:
    """Measured cost of one block, per sample."""

    forward_flops: float
    backward_flops: float
    output_elements: int
    param_bytes: int


@dataclass(frozen=True)
class CutProfile:
    """Cost of splitting at one cut, per sample (FLOPs, elements) or per model (bytes)."""

    cut: int
    client_forward_flops: float
    client_backward_flops: float
    server_forward_flops: float
    server_backward_flops: float
    smashed_elements: int
    client_param_bytes: int
    server_param_bytes: int


@dataclass(frozen=True)
class ModelProfile:
    """Per-block measurements and the derived per-cut profiles (cuts ``1 .. L-1``)."""

    blocks: list[BlockProfile]
    # Derived per-cut profiles, memoised: planners ask for the same cuts thousands of times.
    _cuts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cut(self, k: int) -> CutProfile:
        """Profile of cut ``k``: client blocks ``[0, k)``, server blocks ``[k, L)``."""
        cached = self._cuts.get(k) if type(k) is int else None
        if cached is not None:
            return cached
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.blocks) - 1:
            raise ValueError(f"cut layer {k} is outside the model: valid cuts are 1..{len(self.blocks) - 1}")
        client, server = self.blocks[:k], self.blocks[k:]
        self._cuts[k] = CutProfile(
            cut=k,
            client_forward_flops=sum(b.forward_flops for b in client),
            client_backward_flops=sum(b.backward_flops for b in client),
            server_forward_flops=sum(b.forward_flops for b in server),
            server_backward_flops=sum(b.backward_flops for b in server),
            smashed_elements=client[-1].output_elements,
            client_param_bytes=sum(b.param_bytes for b in client),
            server_param_bytes=sum(b.param_bytes for b in server),
        )
        return self._cuts[k]

    @property
    def cuts(self) -> list[CutProfile]:
        """Profiles of every valid cut."""
        return [self.cut(k) for k in range(1, len(self.blocks))]

    def as_dicts(self) -> list[dict]:
        """Per-cut profiles as plain dicts (for JSON)."""
        return [asdict(c) for c in self.cuts]


def profile_model(model, input_shape: tuple[int, ...], batch_size: int = 2) -> ModelProfile:
    """Measure a model block by block.

    Parameters
    ----------
    model : nn.Module or SplitModel
        Anything ``as_split_model`` accepts.
    input_shape : tuple of int
        Shape of one sample, e.g. ``(1, 8, 8)``.
    batch_size : int
        Batch used for measuring (>= 2 so batch norm runs in train mode); results are per sample.
    """
    split: SplitModel = as_split_model(model)
    blocks = split.blocks
    params = list(blocks.parameters())
    modes = [(m, m.training) for m in blocks.modules()]  # per module: some may be frozen in eval
    # Forward and backward leave parameters alone (there is no optimizer step); only buffers
    # such as batch-norm running statistics change, so only they are saved and restored.
    buffers = [(b, b.clone()) for b in blocks.buffers()]
    grads = [p.grad for p in params]  # the caller's gradients survive the measuring backward
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    out: list[BlockProfile] = []
    # fork_rng: the random probe and dropout leave the caller's RNG streams untouched.
    with torch.random.fork_rng(devices=cuda):
        try:
            blocks.train()
            for p in params:
                p.grad = None
            x = split.example_input(input_shape, batch_size, random=True)
            for i, block in enumerate(blocks):
                x = x.detach().requires_grad_(i > 0)
                with FlopCounterMode(display=False) as fwd:
                    y = block(x)
                with FlopCounterMode(display=False) as bwd:
                    if y.requires_grad:
                        y.backward(torch.ones_like(y))
                out.append(
                    BlockProfile(
                        forward_flops=fwd.get_total_flops() / batch_size,
                        backward_flops=bwd.get_total_flops() / batch_size,
                        output_elements=y[0].numel(),
                        param_bytes=sum(p.numel() * p.element_size() for p in block.parameters()),
                    )
                )
                x = y
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.training = mode
    return ModelProfile(out)
