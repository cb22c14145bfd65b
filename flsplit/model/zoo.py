"""Built-in models, each an ``nn.Sequential`` of blocks so every cut is a split point: image
models (``MODELS``) and text models (``TEXT_MODELS``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from flsplit.model.splitting import SplitModel, flatten_torchvision

__all__ = ["MODELS", "TEXT_MODELS", "build_model", "digits_cnn", "lenet", "vgg", "resnet18", "vit_tiny", "gpt_tiny"]


def digits_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> nn.Sequential:
    """A small CNN for 8x8 digits (scikit-learn's ``load_digits``): 9 blocks."""
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(1),
        nn.Linear(32 * side * side, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def lenet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """LeNet-5 style network (12 blocks); 28x28 inputs are padded to 32x32 by the first conv.

    Other sizes work too as long as the feature map survives both 5x5 convs and pools
    (at least 16x16); the classifier's input size is computed from ``image_size``.
    """
    pad = 2 if image_size == 28 else 0
    side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet needs images of at least 16x16 pixels, got {image_size}x{image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(1),
        nn.Linear(16 * side * side, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


_VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    """CIFAR-style VGG with batch norm: one block per conv/BN/ReLU/pool layer.

    Five 2x2 poolings need images of at least 32x32 pixels; 28x28 inputs (MNIST) are padded
    to 32x32 by the first conv, as in ``lenet``.
    """
    pad = 3 if image_size == 28 else 1
    padded = image_size + 2 * pad - 2  # the first conv's output side
    if padded < 32:
        raise ValueError(f"{name} needs images of at least 32x32 pixels (or 28x28), got {image_size}x{image_size}")
    layers: list[nn.Module] = []
    channels = in_channels
    for v in _VGG_CFG[name]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=pad), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
            channels, pad = v, 1
    side = padded // 32
    layers += [nn.Flatten(1), nn.Linear(512 * side * side, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs and a skip); one block of the split sequence."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Sequential:
    """CIFAR-style ResNet18: stem (3 blocks), eight basic blocks, pooling, flatten, classifier (14 blocks)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
        in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class PatchEmbedding(nn.Module):
    """Image to tokens: non-overlapping ``patch x patch`` patches, each a ``dim`` vector, plus a
    learned position embedding; ``(N, C, H, W)`` to ``(N, H W / patch^2, dim)``."""

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"vit-tiny needs an image side divisible by its patch ({patch}), got {image_size}")
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class TokenPoolHead(nn.Module):
    """Tokens to class scores: layer norm, mean over the tokens, a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(dim=1))


def vit_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, *, patch: int = 0, dim: int = 64,
             depth: int = 4, heads: int = 4) -> nn.Sequential:
    """A small vision transformer (``torch.nn.TransformerEncoderLayer`` blocks, pre-norm, GELU):
    patch embedding, ``depth`` encoder layers, pooled head; ``depth + 2`` blocks, a cut between
    any two (what crosses is the ``(tokens, dim)`` hidden state). The patch is 2 pixels for
    images up to 16 pixels a side and 4 above, unless given."""
    patch = patch or (2 if image_size <= 16 else 4)
    layers: list[nn.Module] = [PatchEmbedding(in_channels, image_size, patch, dim)]
    for _ in range(depth):
        layers.append(nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True))
    layers.append(TokenPoolHead(dim, num_classes))
    return nn.Sequential(*layers)


class TokenEmbedding(nn.Module):
    """Token ids ``(N, T)`` to vectors ``(N, T, dim)``: a token embedding plus a learned
    position embedding (sequences up to ``max_len`` tokens)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token(x) + self.position[:, : x.shape[1]]


class CausalEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` in which a position attends only to itself and the
    positions before it (the mask is made from the sequence length: nothing but the hidden
    state needs to cross a cut)."""

    def forward(self, src: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        mask = nn.Transformer.generate_square_subsequent_mask(src.shape[1], device=src.device, dtype=src.dtype)
        return super().forward(src, src_mask=mask, is_causal=True)


class LanguageModelHead(nn.Module):
    """Hidden states ``(N, T, dim)`` to next-token logits ``(N, T, vocab)``: layer norm, linear."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def gpt_tiny(num_classes: int = 256, seq_len: int = 64, *, dim: int = 64, depth: int = 4, heads: int = 4,
             dropout: float = 0.0) -> nn.Sequential:
    """A small GPT-style language model on ``torch.nn.TransformerEncoderLayer`` blocks (causal,
    pre-norm, GELU): token and position embedding, ``depth`` layers, a head to
    ``num_classes`` (the vocabulary) logits per position; ``depth + 2`` blocks, and what
    crosses any cut is the ``(seq_len, dim)`` hidden state. Its embedding and head are not
    tied: they would sit on two sides of a cut."""
    layers: list[nn.Module] = [TokenEmbedding(num_classes, seq_len, dim)]
    for _ in range(depth):
        layers.append(CausalEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                         batch_first=True, norm_first=True))
    layers.append(LanguageModelHead(dim, num_classes))
    return nn.Sequential(*layers)


def _torchvision(name: str) -> Callable[..., SplitModel]:
    def build(num_classes: int = 10, in_channels: int = 3, image_size: int = 224) -> SplitModel:
        import torchvision

        if in_channels != 3:
            raise ValueError(f"torchvision {name} expects 3 input channels, got {in_channels}")
        if name.startswith("vgg") and image_size < 32:
            raise ValueError(f"torchvision {name} needs images of at least 32x32 pixels, got {image_size}x{image_size}")
        return flatten_torchvision(getattr(torchvision.models, name)(num_classes=num_classes))

    return build


MODELS: dict[str, Callable[..., nn.Module | SplitModel]] = {
    "digits-cnn": digits_cnn,
    "lenet": lenet,
    "vgg11": lambda **kw: vgg("vgg11", **kw),
    "vgg13": lambda **kw: vgg("vgg13", **kw),
    "vgg16": lambda **kw: vgg("vgg16", **kw),
    "resnet18": resnet18,
    "vit-tiny": vit_tiny,
    **{f"torchvision-{n}": _torchvision(n) for n in ("vgg11", "vgg16", "resnet18", "resnet50")},
}

# Models that read token sequences (``seq_len`` tokens in; ``num_classes`` is the vocabulary).
def _hugging_face(kind: str) -> Callable[..., SplitModel]:
    """A GPT-2-style (or Llama-style) decoder of 6 layers, width 384, 6 heads, from a config
    (``flsplit.model.hf``; ``pip install "flsplit[transformers]"``), its head untied."""

    def build(num_classes: int = 256, seq_len: int = 64) -> SplitModel:
        from flsplit.model.hf import build_hf_model

        return build_hf_model(kind, vocab_size=num_classes, seq_len=seq_len, hidden=384, layers=6, heads=6)

    return build


TEXT_MODELS: dict[str, Callable[..., nn.Module | SplitModel]] = {
    "gpt-tiny": gpt_tiny,
    "hf-gpt2": _hugging_face("gpt2"),
    "hf-llama": _hugging_face("llama"),
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
                seq_len: int = 0) -> SplitModel:
    """Build a zoo model by name as a ``SplitModel``: an image model for ``in_channels`` x
    ``image_size`` images, or (``TEXT_MODELS``) a text model for ``seq_len``-token sequences."""
    from flsplit.model.splitting import as_split_model

    if name in TEXT_MODELS:
        if seq_len < 1:
            raise ValueError(f"model {name!r} reads token sequences: use a text dataset (e.g. 'stdlib-text')")
        return as_split_model(TEXT_MODELS[name](num_classes=num_classes, seq_len=seq_len))
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted([*MODELS, *TEXT_MODELS])}")
    if seq_len:
        raise ValueError(f"model {name!r} reads images, but the dataset is text: use one of {sorted(TEXT_MODELS)}")
    return as_split_model(MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size))
