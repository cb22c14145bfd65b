"""Splittable models: an ordered sequence of blocks, cut at k.

Cut ``k`` puts blocks ``[0, k)`` on the client and ``[k, L)`` on the server. Every model is
flattened into an ``nn.Sequential`` of blocks; ``SplitModel`` remembers where each block came
from, so a state dict of the blocks can be written back under the original model's names.
``as_split_model`` takes a ``nn.Sequential`` as is, flattens torchvision VGG/ResNet models, and
splits any other module from its ``torch.fx`` graph (``flsplit.model.graph_split``), checking that
the split forward and backward equal the original's (``SplitModel.verify``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from flsplit.model import rng
from flsplit.model.graph_split import Crossing, graph_split

__all__ = ["SplitModel", "SplitMismatch", "as_split_model", "block_output_shapes", "flatten_torchvision", "split_model_of"]


class SplitMismatch(AssertionError):
    """The split model does not compute what the original does (``SplitModel.verify``)."""


@dataclass
class SplitModel:
    """A model as an ordered sequence of blocks.

    Parameters
    ----------
    blocks : nn.Sequential
        The blocks, in forward order. ``blocks(x)`` is the unsplit model's forward.
    block_paths : list of str or None
        For each block, the name of the module it came from in the original model
        (``None`` for blocks that have no counterpart, e.g. an inserted ``nn.Flatten``).
        Defaults to the block index, i.e. the blocks *are* the original model.
    original : nn.Module, optional
        The unsplit model the blocks were made from (sharing its parameters), for ``verify``.
    input_shape : tuple of int, optional
        Shape of one input sample, where known (a graph split knows it from its example).
    cut_names : list of str, optional
        For graph splits, the name of each cut ``1 .. L-1`` (the module it sits before).
    crossings : list of list of Crossing, optional
        For graph splits, the tensors that cross each cut ``1 .. L-1``; where there are
        several, the smashed tensor is their packing (``flsplit.model.graph_split.pack``).
    input_dtype : torch.dtype, optional
        The dtype of the model's input when it is not the parameters' floating dtype:
        ``torch.int64`` for token ids. Found by itself when the first block starts with an
        ``nn.Embedding`` (``takes_token_ids``).
    """

    blocks: nn.Sequential
    block_paths: list[Optional[str]] = field(default_factory=list)
    original: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    input_shape: Optional[tuple[int, ...]] = None
    cut_names: Optional[list[str]] = None
    crossings: Optional[list[list[Crossing]]] = field(default=None, repr=False)
    input_dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.input_dtype is None and takes_token_ids(self.blocks):
            self.input_dtype = torch.int64
        if not self.block_paths:
            self.block_paths = [str(i) for i in range(len(self.blocks))]
        if len(self.block_paths) != len(self.blocks):
            raise ValueError("block_paths must name one path per block")
        # A block's input may be smashed data the server made a leaf that requires grad;
        # an in-place op on it (torchvision's ``ReLU(inplace=True)``) would fail in backward.
        # Turning ``inplace`` off keeps the forward and only costs a copy.
        for block in self.blocks:
            if getattr(block, "inplace", False) is True:
                block.inplace = False

    @property
    def num_blocks(self) -> int:
        """Number of blocks ``L``; valid cuts are ``1 .. L-1``."""
        return len(self.blocks)

    def check_cut(self, cut: int) -> int:
        """Return ``cut`` if it is a valid cut, else raise ``ValueError`` naming the range."""
        if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= self.num_blocks - 1:
            names = f" ({', '.join(f'{i}: before {n!r}' for i, n in enumerate(self.cut_names, 1))})" if self.cut_names else ""
            raise ValueError(
                f"cut layer {cut!r} is outside the model: valid cuts are 1..{self.num_blocks - 1}{names}"
            )
        return cut

    def cut_index(self, cut: Union[int, str]) -> int:
        """The cut ``1 .. L-1`` a cut is given as: its index, or (graph splits) its name."""
        if isinstance(cut, str) and self.cut_names and cut in self.cut_names:
            return self.cut_names.index(cut) + 1
        return self.check_cut(cut)

    def crossing(self, cut: int) -> list[Crossing]:
        """The tensors that cross cut ``cut`` (one, the smashed tensor itself, unless the model
        was split from its graph with several values alive there)."""
        self.check_cut(cut)
        if self.crossings is not None:
            return list(self.crossings[cut - 1])
        return []

    def verify(self, example_input: torch.Tensor, rtol: Optional[float] = None, atol: float = 0.0) -> float:
        """Check that the blocks compute what ``original`` computes, forward and backward.

        Runs the example through the original model, and through the blocks one by one with
        each block's input a leaf that requires grad (as the server gets smashed data),
        back-propagating block by block (as the server returns the cut-layer gradient); in
        eval mode and in train mode (dropout seeded alike). Compares the outputs and every
        parameter's gradient. Buffers (batch-norm statistics), gradients, modes and torch's
        random stream are left as they were. Returns the largest absolute difference; raises
        ``SplitMismatch`` naming the first mismatch. Without ``original`` there is nothing to
        compare (a ``nn.Sequential`` or a flattened torchvision model is its blocks).
        """
        if self.original is None:
            return 0.0
        if rtol is None:
            dtype = next((p.dtype for p in self.original.parameters() if p.is_floating_point()), torch.float32)
            rtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)
        params = dict(self.original.named_parameters())
        buffers = [(b, b.clone()) for b in self.original.buffers()]
        grads = {k: p.grad for k, p in params.items()}
        modes = [(m, m.training) for m in [*self.original.modules(), *self.blocks.modules()]]

        def fresh() -> None:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p in params.values():
                p.grad = None

        worst = 0.0
        try:
            for train in (False, True):
                mode = "train" if train else "eval"
                self.original.train(train)
                self.blocks.train(train)
                fresh()
                with rng.seeded(0):
                    expected = self.original(example_input)
                    expected.square().sum().backward()
                want = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
                fresh()
                with rng.seeded(0):
                    got = _blockwise(self.blocks, example_input)
                worst = max(worst, _compare(f"{mode} forward output", got, expected.detach(), rtol, atol, "forward"))
                for k, p in params.items():
                    if k in want:
                        if p.grad is None:
                            raise SplitMismatch(f"{mode} backward: the split model gives {k!r} no gradient")
                        worst = max(worst, _compare(f"{mode} gradient of {k!r}", p.grad, want[k], rtol, atol, "backward"))
        finally:
            fresh()
            for k, p in params.items():
                p.grad = grads[k]
            for m, mode in modes:
                m.training = mode
        return worst

    def example_input(self, input_shape: Sequence[int], batch_size: int = 1, *, random: bool = False) -> torch.Tensor:
        """A batch of inputs for probes and profiles, on the model's device: token ids (zeros)
        when the model takes them, else its floating dtype (``randn`` with ``random``, else zeros)."""
        param = next(self.blocks.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if self.input_dtype is not None and not self.input_dtype.is_floating_point:
            return torch.zeros(batch_size, *input_shape, dtype=self.input_dtype, device=device)
        dtype = self.input_dtype or (param.dtype if param is not None else torch.float32)
        make = torch.randn if random else torch.zeros
        return make(batch_size, *input_shape, dtype=dtype, device=device)

    def client_part(self, cut: int, tail_cut: int = 0) -> nn.Sequential:
        """Blocks ``[0, cut)`` (shares parameters with ``blocks``); in a U-shaped split
        (``tail_cut > 0``) also blocks ``[tail_cut, L)``, each under its own index, so the part's
        state-dict keys are the model's. (Run the two pieces apart: ``part[:cut]`` and
        ``part[cut:]``; the part as one module would run them back to back.)"""
        if not tail_cut:
            return self.blocks[: self.check_cut(cut)]
        if not self.check_cut(cut) < self.check_cut(tail_cut):
            raise ValueError(f"tail cut {tail_cut} must lie after the cut {cut}")
        keep = [*range(cut), *range(tail_cut, self.num_blocks)]
        return nn.Sequential(OrderedDict((str(i), self.blocks[i]) for i in keep))

    def server_part(self, cut: int) -> nn.Sequential:
        """Blocks ``[cut, L)`` (shares parameters with ``blocks``)."""
        return self.blocks[self.check_cut(cut) :]

    def to_original_state_dict(
        self, blocks_state: Optional[dict[str, torch.Tensor]] = None
    ) -> "OrderedDict[str, torch.Tensor]":
        """Map a blocks state dict (keys ``"<block>.<name>"``) to the original model's keys."""
        blocks_state = self.blocks.state_dict() if blocks_state is None else blocks_state
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, value in blocks_state.items():
            index, _, rest = key.partition(".")
            path = self.block_paths[int(index)]
            if path is None:
                raise ValueError(f"block {index} has state but no original path")
            out[f"{path}.{rest}" if path else rest] = value
        return out


def _blockwise(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Forward block by block, each block's input a leaf (as on the server), then backward of
    ``square().sum()`` block by block, handing each block's input gradient to the previous."""
    inputs, outputs = [], []
    for i, block in enumerate(blocks):
        if i > 0:
            x = x.detach().requires_grad_(x.is_floating_point())
        inputs.append(x)
        x = block(x)
        outputs.append(x)
    grad: Optional[torch.Tensor] = None
    for i in reversed(range(len(blocks))):
        out = outputs[i]
        if not out.requires_grad:
            break
        if i == len(blocks) - 1:
            out.square().sum().backward()
        elif grad is not None:
            out.backward(grad)
        grad = inputs[i].grad if i > 0 and inputs[i].requires_grad else None
    return outputs[-1].detach()


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, which: str) -> float:
    """The largest difference; ``SplitMismatch`` if it exceeds ``atol + rtol * max|want|``."""
    if got.shape != want.shape:
        raise SplitMismatch(f"{what}: shape {tuple(got.shape)} differs from the original's {tuple(want.shape)}")
    if not got.numel():
        return 0.0
    diff = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    if not diff <= atol + rtol * scale:  # also refuses NaN
        raise SplitMismatch(f"{what} differs from the original model's by up to {diff:.3g} (largest value {scale:.3g}; "
                            f"allowed {atol:g} + {rtol:g} x that): the split model does not compute the original {which}")
    return diff


def _leaf_blocks(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str]]:
    """Flatten nested ``nn.Sequential`` containers into their children, keeping paths."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[nn.Module, str]] = []
        for name, child in module.named_children():
            out.extend(_leaf_blocks(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(module, prefix)]


def exchanged_keys(module: nn.Module) -> list[str]:
    """The state-dict keys a split part sends and averages, in state-dict order: its parameters
    that train (``requires_grad``) and its buffers. A frozen parameter (a LoRA base weight, a
    frozen client part) is the same on every side from the model's construction and never
    travels: with LoRA the weight traffic is the adapters'."""
    params = {id(p): p.requires_grad for p in module.parameters()}
    return [k for k, v in module.state_dict(keep_vars=True).items() if params.get(id(v), True)]


def takes_token_ids(module: nn.Module) -> bool:
    """Whether a model reads token ids: its first leaf module with parameters is an ``nn.Embedding``."""
    first = next((m for m in module.modules() if not next(m.children(), None) and next(m.parameters(), None) is not None),
                 None)
    return isinstance(first, nn.Embedding)


def flatten_torchvision(model: nn.Module) -> SplitModel:
    """Flatten a torchvision VGG or ResNet into blocks with the same forward.

    VGG: ``features`` layers, ``avgpool``, a ``Flatten``, ``classifier`` layers.
    ResNet: the stem layers, each residual block of ``layer1..layer4``, ``avgpool``, a
    ``Flatten`` and ``fc``. Residual blocks stay whole (a cut cannot fall inside a skip).
    """
    pairs: list[tuple[nn.Module, Optional[str]]]
    names = dict(model.named_children())
    if {"features", "avgpool", "classifier"} <= names.keys():  # VGG, AlexNet-like
        pairs = list(_leaf_blocks(model.features, "features"))
        pairs += [(model.avgpool, "avgpool"), (nn.Flatten(1), None)]
        pairs += _leaf_blocks(model.classifier, "classifier")
    elif {"conv1", "bn1", "relu", "maxpool", "layer1", "fc"} <= names.keys():  # ResNet
        pairs = [(names[n], n) for n in ("conv1", "bn1", "relu", "maxpool")]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            pairs += _leaf_blocks(names[layer], layer)
        pairs += [(model.avgpool, "avgpool"), (nn.Flatten(1), None), (model.fc, "fc")]
    else:
        raise TypeError(
            f"cannot flatten {type(model).__name__}: only nn.Sequential, VGG- and ResNet-style "
            "torchvision models are supported"
        )
    blocks = nn.Sequential(*(m for m, _ in pairs))
    blocks.training = model.training  # the container only: each block keeps its own mode
    return SplitModel(blocks, [p for _, p in pairs])


def as_split_model(model: nn.Module | SplitModel, example_input: Optional[torch.Tensor] = None,
                   cuts: Optional[Sequence[Union[str, int]]] = None, verify: bool = True) -> SplitModel:
    """The blocks of any model.

    A ``SplitModel`` is returned as is. A ``nn.Sequential`` is used as is (its children are the
    blocks, its state dict keys the blocks' keys) and a torchvision VGG/ResNet is flattened
    (``flatten_torchvision``), unless ``cuts`` are named. Any other module is split from its
    ``torch.fx`` graph (``flsplit.model.graph_split``): it needs ``example_input``, a batch of
    inputs, and is cut before each top-level module it calls (after the first), or at
    ``cuts``: module paths (``"layer2"``, ``"blocks.3"``; the cut sits where that module is
    first called) or indices into those default points. Whatever crosses a cut (skip
    connections, several tensors) travels in the smashed tensor. With ``verify`` the split
    forward and backward are compared with the original's on ``example_input``
    (``SplitModel.verify``), and a mismatch raises ``SplitMismatch``.

    Example::

        split = as_split_model(torchvision.models.resnet18(num_classes=10),
                               example_input=torch.randn(2, 3, 32, 32), cuts=["layer2", "layer3.0.conv2"])
        client, server = split.client_part(1), split.server_part(1)
    """
    if isinstance(model, SplitModel):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"as_split_model takes an nn.Module or a SplitModel, got {type(model).__name__}")
    if cuts is None:
        if isinstance(model, nn.Sequential):
            return SplitModel(model)
        try:
            return flatten_torchvision(model)
        except TypeError:
            if example_input is None:
                raise TypeError(
                    f"{type(model).__name__} is not a layer stack: pass example_input (a batch of inputs, e.g. "
                    f"x[:2]) to split it from its torch.fx graph, and optionally cuts=['module.path', ...]"
                ) from None
    elif example_input is None:
        raise TypeError("cuts need example_input (a batch of inputs) to split the model from its graph")
    stages, names, crossings = graph_split(model, example_input, cuts)
    blocks = nn.Sequential(*stages)
    blocks.training = model.training
    split = SplitModel(blocks, [""] * len(stages), original=model, input_shape=tuple(example_input.shape[1:]),
                       cut_names=names, crossings=crossings)
    if verify:
        split.verify(example_input)
    return split


def split_model_of(obj: object, example_input: Optional[torch.Tensor] = None) -> SplitModel:
    """``obj`` if it is a ``SplitModel``, else the ``nn.Module`` ``obj`` split into blocks by
    ``flsplit.as_split_model`` (``example_input``: a batch, e.g. ``x[:2]``, which a module
    other than ``nn.Sequential`` or a torchvision VGG/ResNet needs; a floating batch is cast
    to the module's parameter dtype). ``TypeError`` when ``obj`` is neither."""
    if isinstance(obj, SplitModel):
        return obj
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module or a flsplit SplitModel, it returned "
                        f"{type(obj).__module__}.{type(obj).__qualname__}")
    if example_input is None:
        return as_split_model(obj)
    dtype = next((t.dtype for t in obj.parameters() if t.is_floating_point()), None)
    if dtype is not None and example_input.is_floating_point():
        example_input = example_input.to(dtype)
    return as_split_model(obj, example_input=example_input)


@torch.no_grad()
def block_output_shapes(model: SplitModel, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample output shape of every block; entry ``k-1`` is the smashed shape at cut ``k``."""
    blocks = model.blocks
    modes = [(m, m.training) for m in blocks.modules()]  # per module: some may be frozen in eval
    blocks.eval()  # eval: no batch-norm statistics are updated by this probe
    x = model.example_input(input_shape)
    shapes = []
    try:
        for block in blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes
