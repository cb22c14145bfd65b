"""Device-local data: a node's own training and evaluation data, read from a path on its disk.

A SuperNode started with ``--node-config "data-path=/data/node-0"`` trains on what lies at that
path instead of a partition of the run's ``dataset`` (which then only says what the model
takes: channels, side length, number of classes, pixel scaling). The format is recognised
from the path:

``<path>.npz`` (a file)
    arrays ``x`` and ``y`` (training) and optionally ``x_test`` and ``y_test`` (evaluation).
``<path>/train.npz`` (and optionally ``<path>/test.npz``)
    each with arrays ``x`` and ``y``; this is what ``flsplit partition --format npz`` writes.
``<path>/train/<label>/*.png`` (and optionally ``<path>/test/<label>/*.png``)
    torchvision's ``ImageFolder`` layout (any image type PIL reads), class folders named by
    their label index ``0`` .. ``num_classes - 1`` (so a node that has only some classes still
    labels them right); this is what ``flsplit partition --format imagefolder`` writes.
``<path>/MNIST/raw/`` or ``<path>/cifar-10-batches-py/``
    the files of torchvision's ``MNIST`` / ``CIFAR10`` classes already on disk (``<path>`` is
    the ``root`` those classes take; read with ``download=False``; the training and test files).

For a text dataset (``stdlib-text``) only the ``.npz`` layouts apply: ``x`` token ids and ``y``
next tokens, both ``(N, seq_len)`` integers in ``[0, vocabulary)``.

Arrays: ``x`` as ``(N, C, H, W)``, ``(N, H, W, C)`` or, for one channel, ``(N, H, W)``, of the
model's channels and side length; integer ``x`` are 8-bit pixels (0..255), scaled like the
run's dataset; float ``x`` are taken as the model's input as they are. ``y`` integer labels in
``[0, num_classes)``. Images (files, MNIST, CIFAR-10) are converted to the model's channels
(grayscale <-> RGB, as PIL converts) and resized to its side length, then scaled like the
run's dataset.

Anything wrong (a missing path or folder, no training samples, a wrong shape or channel
count, labels out of range, unreadable files) raises ``LocalDataError`` naming the problem.
A missing evaluation part is not an error: the node has no evaluation data.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from flsplit.data.datasets import DatasetInfo, TensorData

__all__ = ["LocalDataError", "load_local", "data_format", "pixels_to_input", "input_to_pixels", "FORMATS"]

FORMATS = ("npz-file", "npz-dir", "imagefolder", "mnist", "cifar10")
SPLITS = ("train", "test")


class LocalDataError(ValueError):
    """Device-local data that cannot be used, with what is wrong."""


def data_format(path: str | os.PathLike) -> str:
    """Which of ``FORMATS`` the data at ``path`` is in (``LocalDataError`` if none)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise LocalDataError(f"{str(root)!r} does not exist")
    if root.is_file():
        if root.suffix == ".npz":
            return "npz-file"
        raise LocalDataError(f"{str(root)!r} is a file but not an .npz archive")
    if (root / "train.npz").is_file() or (root / "test.npz").is_file():
        return "npz-dir"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "imagefolder"
    if (root / "MNIST" / "raw").is_dir():
        return "mnist"
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    raise LocalDataError(
        f"no data found in {str(root)!r}: expected train.npz, a train/ folder (ImageFolder layout: "
        "train/<label>/*.png), MNIST/raw/ or cifar-10-batches-py/ (torchvision's files), or an .npz file"
    )


def load_local(path: str | os.PathLike, info: DatasetInfo, split: str = "train") -> Optional[TensorData]:
    """The ``split`` (``"train"`` or ``"test"``) of the data at ``path``, as the model's input.

    ``None`` if the data has no such split (only allowed for ``"test"``). Raises
    ``LocalDataError`` for anything that does not fit ``info``; an empty training split is
    an error, an empty test split is ``None``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(path).expanduser()
    fmt = data_format(root)
    if info.is_text and not fmt.startswith("npz"):
        raise LocalDataError(f"{str(root)!r} is {fmt} images, but the run's dataset is text: give an .npz of token ids "
                             f"x and next tokens y, each (N, {info.seq_len})")
    loaders = {"npz-file": _npz_file, "npz-dir": _npz_dir, "imagefolder": _image_folder, "mnist": _mnist,
               "cifar10": _cifar10}
    data = loaders[fmt](root, info, split)
    if data is not None and len(data) == 0:
        data = None
    if data is None and split == "train":
        raise LocalDataError(f"no training samples in {str(root)!r} ({fmt})")
    return data


# ---------------------------------------------------------------------------- conversion
def pixels_to_input(pixels: np.ndarray | torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """8-bit pixels (N, C, H, W) to the model's float input, scaled as the dataset is."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32) / 255.0
    return (x - info.mean) / info.std


def input_to_pixels(x: torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """The inverse of ``pixels_to_input``, rounded to 8-bit pixels (for writing images)."""
    pixels = (x.to(torch.float64) * info.std + info.mean) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy()


def _labels(y, n: int, info: DatasetInfo, what: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1:
        raise LocalDataError(f"{what}: labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise LocalDataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if len(y) != n:
        raise LocalDataError(f"{what}: {n} samples but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= info.num_classes):
        bad = sorted({int(v) for v in y if not 0 <= int(v) < info.num_classes})[:5]
        raise LocalDataError(f"{what}: labels out of range {bad}: the model has {info.num_classes} classes "
                             f"(labels 0..{info.num_classes - 1})")
    return torch.as_tensor(y.astype(np.int64))


def _array_input(x: np.ndarray, info: DatasetInfo, what: str) -> torch.Tensor:
    """An ``x`` array to (N, C, S, S) float32, checking shape, channels and values."""
    c, s = info.in_channels, info.image_size
    want = f"(N, {c}, {s}, {s}) or (N, {s}, {s}, {c})" + (f" or (N, {s}, {s})" if c == 1 else "")
    if x.ndim == 3 and c == 1 and x.shape[1:] == (s, s):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] == (c, s, s):
        pass
    elif x.ndim == 4 and x.shape[1:] == (s, s, c):
        x = x.transpose(0, 3, 1, 2)
    else:
        channels = ""
        if x.ndim == 4 and x.shape[2:] == (s, s):
            channels = f" ({x.shape[1]} channels, the model takes {c})"
        elif x.ndim == 4 and x.shape[1:3] == (s, s):
            channels = f" ({x.shape[3]} channels, the model takes {c})"
        raise LocalDataError(f"{what}: x has shape {tuple(x.shape)}{channels}; the model takes {want}")
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise LocalDataError(f"{what}: x must hold numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer):
        if len(x) and (int(x.min()) < 0 or int(x.max()) > 255):
            raise LocalDataError(f"{what}: integer x must be 8-bit pixels 0..255, got {int(x.min())}..{int(x.max())}")
        return pixels_to_input(np.ascontiguousarray(x), info)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise LocalDataError(f"{what}: x holds NaN or infinite values")
    return torch.from_numpy(x)


def _fit_images(pixels: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """8-bit images (N, C, H, W) converted to the model's channels and side, then scaled."""
    x = pixels.to(torch.float32)
    if x.shape[1] != info.in_channels:
        if info.in_channels == 1:  # PIL's "L": ITU-R 601-2 luma
            x = (x[:, :3] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            x = x[:, :1].expand(-1, info.in_channels, -1, -1)
    if tuple(x.shape[2:]) != (info.image_size, info.image_size) and len(x):
        x = torch.nn.functional.interpolate(x, size=(info.image_size, info.image_size), mode="bilinear",
                                            antialias=True, align_corners=False)
    return ((x.round().clamp(0, 255) / 255.0) - info.mean) / info.std


# ---------------------------------------------------------------------------- formats
def _read_npz(file: Path, keys: tuple[str, str], info: DatasetInfo, optional: bool) -> Optional[TensorData]:
    what = str(file)
    try:
        with np.load(file, allow_pickle=False) as archive:
            names = set(archive.files)
            if optional and not set(keys) & names:
                return None
            missing = [k for k in keys if k not in names]
            if missing:
                raise LocalDataError(f"{what}: missing array(s) {missing} (has {sorted(names)})")
            x, y = archive[keys[0]], archive[keys[1]]
    except LocalDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise LocalDataError(f"{what}: not a readable .npz archive ({err})") from None
    if info.is_text:
        return _token_data(x, y, info, what)
    return TensorData(_array_input(x, info, what), _labels(y, len(x), info, what))


def _token_data(x: np.ndarray, y: np.ndarray, info: DatasetInfo, what: str) -> TensorData:
    """Token ids ``x`` and next tokens ``y``, both ``(N, seq_len)`` integers in ``[0, vocab)``."""
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2 or a.shape[1] != info.seq_len:
            raise LocalDataError(f"{what}: {name} has shape {tuple(a.shape)}; a text model takes (N, {info.seq_len}) tokens")
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise LocalDataError(f"{what}: {name} must hold integer token ids, got dtype {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= info.num_classes):
            raise LocalDataError(f"{what}: {name} has token ids outside 0..{info.num_classes - 1} (the vocabulary)")
    if len(x) != len(y):
        raise LocalDataError(f"{what}: {len(x)} sequences but {len(y)} target sequences")
    return TensorData(torch.as_tensor(x.astype(np.int64)), torch.as_tensor(y.astype(np.int64)))


def _npz_file(root: Path, info: DatasetInfo, split: str) -> Optional[TensorData]:
    keys = ("x", "y") if split == "train" else ("x_test", "y_test")
    return _read_npz(root, keys, info, optional=split == "test")


def _npz_dir(root: Path, info: DatasetInfo, split: str) -> Optional[TensorData]:
    file = root / f"{split}.npz"
    if not file.is_file():
        return None
    return _read_npz(file, ("x", "y"), info, optional=False)


def _class_folders(directory: Path, info: DatasetInfo) -> dict[str, int]:
    classes: dict[str, int] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        name = entry.name
        if not name.isdigit() or not 0 <= int(name) < info.num_classes:
            raise LocalDataError(f"{directory}: class folder {name!r}: class folders must be named by label, "
                                 f"0..{info.num_classes - 1} (the model has {info.num_classes} classes)")
        classes[name] = int(name)
    return classes


def _image_folder(root: Path, info: DatasetInfo, split: str) -> Optional[TensorData]:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    directory = root / split
    if not directory.is_dir():
        return None
    samples = make_dataset(str(directory), _class_folders(directory, info), extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    mode = "L" if info.in_channels == 1 else "RGB"
    size = (info.image_size, info.image_size)
    images, labels = [], []
    for file, label in samples:
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise LocalDataError(f"{file}: not a readable image ({err})") from None
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels.append(label)
    if not images:
        return TensorData(torch.empty(0, info.in_channels, *size), torch.empty(0, dtype=torch.int64))
    return TensorData(pixels_to_input(np.stack(images), info), torch.tensor(labels, dtype=torch.int64))


def _torchvision(cls, root: Path, info: DatasetInfo, split: str) -> TensorData:
    try:
        dataset = cls(str(root), train=split == "train", download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found ..." / "... or corrupted"
        raise LocalDataError(f"{root}: torchvision's {cls.__name__} files: {err}") from None
    pixels = torch.as_tensor(np.asarray(dataset.data))
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    what = f"{root} ({cls.__name__}, {split})"
    return TensorData(_fit_images(pixels, info), _labels(np.asarray(dataset.targets), len(pixels), info, what))


def _mnist(root: Path, info: DatasetInfo, split: str) -> TensorData:
    from torchvision.datasets import MNIST

    return _torchvision(MNIST, root, info, split)


def _cifar10(root: Path, info: DatasetInfo, split: str) -> TensorData:
    from torchvision.datasets import CIFAR10

    return _torchvision(CIFAR10, root, info, split)
