"""Real MNIST for benchmarks: per-node partitions of the MNIST files in ``../shared/data/mnist``.

That folder (or ``$FLSPLIT_MNIST_DIR``) holds only MNIST's test split (``t10k-*-idx*-ubyte.gz``, 10,000 images). Benchmarks
split it once, seeded, into a training part (``--train`` images, default 8,000) and a held-out
part (the rest), write iid partitions of the training part with ``flsplit.cli.partition``
(the code behind ``flsplit partition``) and give each in-process node ``data-path`` to its own
folder and the server ``test-data-path`` to the held-out part, exactly as a deployment would.
Not used by the tests (the files are not on a fresh machine).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from flsplit.data.datasets import TensorData, dataset_info
from flsplit.data.local import pixels_to_input
from flsplit.cli.partition import write_partitions

__all__ = ["MNIST_DIR", "DATASET", "load_mnist_t10k", "mnist_partitions"]

MNIST_DIR = Path(os.environ.get("FLSPLIT_MNIST_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
DATASET = "ylecun/mnist"  # the run's `dataset`: the model's input shape (1x28x28), classes and scaling


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a numpy array (the format's header: magic, then big-endian sizes).
    torchvision's ``read_image_file`` refuses compressed files, and these stay as shipped."""
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape).copy()


def load_mnist_t10k(folder: Path = MNIST_DIR) -> TensorData:
    """MNIST's 10,000 test images as the model's input (scaled like ``ylecun/mnist``) and labels."""
    images = _idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = _idx(folder / "t10k-labels-idx1-ubyte.gz")
    return TensorData(pixels_to_input(images[:, None], dataset_info(DATASET)), torch.from_numpy(labels.astype(np.int64)))


def mnist_partitions(out: Path, clients: int, train: int = 8000, seed: int = 0,
                     partitioning: str = "iid", alpha: float = 0.5) -> tuple[list[dict], str]:
    """Write ``clients`` partitions of a seeded ``train``-image training part under ``out``;
    return each node's node config (``data-path``) and the server's ``test-data-path``."""
    data = load_mnist_t10k()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train_part, held_out = data.subset(order[:train]), data.subset(order[train:])
    summary = write_partitions(train_part, None, dataset_info(DATASET), out, clients, partitioning, alpha, seed)
    test_path = out / "held-out.npz"
    np.savez(test_path, x=held_out.x.numpy(), y=held_out.y.numpy())
    return [{"data-path": row["data-path"]} for row in summary], str(test_path)
