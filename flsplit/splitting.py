"""Splittable models: an ordered sequence of blocks, cut at k.

Cut ``k`` puts blocks ``[0, k)`` on the client and ``[k, L)`` on the server. Every model is
flattened into an ``nn.Sequential`` of blocks; ``SplitModel`` remembers where each block came
from, so a state dict of the blocks can be written back under the original model's names.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["SplitModel", "as_split_model", "block_output_shapes", "flatten_torchvision"]


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
    """

    blocks: nn.Sequential
    block_paths: list[Optional[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
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
            raise ValueError(
                f"cut layer {cut!r} is outside the model: valid cuts are 1..{self.num_blocks - 1}"
            )
        return cut

    def client_part(self, cut: int) -> nn.Sequential:
        """Blocks ``[0, cut)`` (shares parameters with ``blocks``)."""
        return self.blocks[: self.check_cut(cut)]

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


def _leaf_blocks(module: nn.Module, prefix: str) -> list[tuple[nn.Module, str]]:
    """Flatten nested ``nn.Sequential`` containers into their children, keeping paths."""
    if isinstance(module, nn.Sequential):
        out: list[tuple[nn.Module, str]] = []
        for name, child in module.named_children():
            out.extend(_leaf_blocks(child, f"{prefix}.{name}" if prefix else name))
        return out
    return [(module, prefix)]


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


def as_split_model(model: nn.Module | SplitModel) -> SplitModel:
    """Turn a ``nn.Sequential``, a torchvision VGG/ResNet or a ``SplitModel`` into blocks.

    A ``nn.Sequential`` is used as is (its children are the blocks), so its own state dict
    keys are the blocks' keys.
    """
    if isinstance(model, SplitModel):
        return model
    if isinstance(model, nn.Sequential):
        return SplitModel(model)
    return flatten_torchvision(model)


@torch.no_grad()
def block_output_shapes(model: SplitModel, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample output shape of every block; entry ``k-1`` is the smashed shape at cut ``k``."""
    blocks = model.blocks
    modes = [(m, m.training) for m in blocks.modules()]  # per module: some may be frozen in eval
    blocks.eval()  # eval: no batch-norm statistics are updated by this probe
    param = next(blocks.parameters(), None)
    like = {} if param is None else dict(dtype=param.dtype, device=param.device)
    x = torch.zeros(1, *input_shape, **like)
    shapes = []
    try:
        for block in blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes
