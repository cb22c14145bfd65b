"""Datasets for split training: embedded digits by default, Hugging Face datasets via flwr-datasets.

Loaded data is cached per process (read-only): in simulation each Ray worker loads it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["TensorData", "DatasetInfo", "load_centralized", "load_partition", "dataset_info"]


@dataclass(frozen=True)
class TensorData:
    """Samples ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index) -> "TensorData":
        """The samples at ``index`` (a tensor, list or slice)."""
        return TensorData(self.x[index], self.y[index])


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts a model needs: channels, side length, number of classes."""

    in_channels: int
    image_size: int
    num_classes: int


DIGITS = "digits"


@lru_cache(maxsize=4)
def _digits() -> tuple[TensorData, TensorData]:
    """scikit-learn's 1,797 8x8 handwritten digits, split 80/20 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    as_data = lambda a, b: TensorData(torch.from_numpy(a), torch.from_numpy(b))  # noqa: E731
    return as_data(x_tr, y_tr), as_data(x_te, y_te)


def _partitioner(partitioning: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if partitioning == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioning == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=2
        )
    raise ValueError(f"unknown partitioning {partitioning!r}; choose 'iid' or 'dirichlet'")


@lru_cache(maxsize=64)
def _partition_indices(
    dataset: str, split: str, partitioning: str, num_partitions: int, alpha: float, seed: int, partition_id: int
) -> np.ndarray:
    """Indices of one partition of an embedded dataset, computed by a flwr-datasets partitioner."""
    from datasets import Dataset

    data = _digits()[0 if split == "train" else 1]
    table = Dataset.from_dict({"index": np.arange(len(data)), "label": data.y.numpy()})
    partitioner = _partitioner(partitioning, num_partitions, alpha, seed)
    partitioner.dataset = table
    return np.asarray(partitioner.load_partition(partition_id)["index"], dtype=np.int64)


def dataset_info(dataset: str) -> DatasetInfo:
    """Channels, image size and classes of a dataset name."""
    if dataset == DIGITS:
        return DatasetInfo(1, 8, 10)
    known = {"uoft-cs/cifar10": DatasetInfo(3, 32, 10), "ylecun/mnist": DatasetInfo(1, 28, 10)}
    if dataset in known:
        return known[dataset]
    raise ValueError(f"unknown dataset {dataset!r}; use 'digits', 'uoft-cs/cifar10' or 'ylecun/mnist'")


def load_centralized(dataset: str, split: str = "test") -> TensorData:
    """A whole split (e.g. the held-out test set for server-side evaluation)."""
    dataset_info(dataset)  # refuse unknown names before touching the hub
    if dataset == DIGITS:
        return _digits()[0 if split == "train" else 1]
    return _hub_split(dataset, split)


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    split: str = "train",
) -> TensorData:
    """Partition ``partition_id`` of ``num_partitions`` of a dataset split."""
    dataset_info(dataset)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    if dataset == DIGITS:
        index = _partition_indices(dataset, split, partitioning, num_partitions, float(alpha), seed, partition_id)
        return load_centralized(dataset, split).subset(torch.from_numpy(index))
    return _hub_partition(dataset, split, partitioning, num_partitions, float(alpha), seed, partition_id)


def _to_tensors(table) -> TensorData:
    """Image/label columns of a Hugging Face dataset to tensors scaled to [-1, 1]."""
    image_col = next(c for c in table.column_names if c in ("img", "image"))
    label_col = next(c for c in table.column_names if c in ("label", "fine_label"))
    images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in table[image_col]])
    if images.ndim == 3:
        images = images[:, None]
    else:
        images = images.transpose(0, 3, 1, 2)
    x = torch.from_numpy((images - 0.5) / 0.5)
    return TensorData(x, torch.as_tensor(table[label_col], dtype=torch.int64))


@lru_cache(maxsize=8)
def _hub_partition(dataset, split, partitioning, num_partitions, alpha, seed, partition_id) -> TensorData:
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(
        dataset=dataset, partitioners={split: _partitioner(partitioning, num_partitions, alpha, seed)}
    )
    return _to_tensors(fds.load_partition(partition_id, split))


@lru_cache(maxsize=4)
def _hub_split(dataset: str, split: str) -> TensorData:
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(dataset=dataset, partitioners={})
    return _to_tensors(fds.load_split(split))
