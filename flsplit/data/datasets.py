"""Datasets for split training: embedded digits by default, Hugging Face datasets via flwr-datasets.

Loaded data is cached per process (read-only): in simulation each Ray worker loads a dataset
once. Partitions are computed when a node first asks for its own, from one flwr-datasets
partitioner per setting (a bounded cache: nothing per node is kept here). A node's own files
(``data-path`` in its node config) are read by ``flsplit.data.local``.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from functools import lru_cache

import numpy as np
import torch

from flsplit.data import text

__all__ = ["TensorData", "DatasetInfo", "load_centralized", "load_partition", "dataset_info", "partition_indices"]


@dataclass(frozen=True)
class TensorData:
    """Samples ``x`` and labels ``y``: images ``(N, C, H, W)`` float32 with classes ``(N,)``
    int64, or token ids ``(N, T)`` int64 with next tokens ``(N, T)`` int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index) -> "TensorData":
        """The samples at ``index`` (a tensor, list or slice)."""
        return TensorData(self.x[index], self.y[index])


@dataclass(frozen=True)
class DatasetInfo:
    """Shape facts a model needs: channels, side length, number of classes; and how 8-bit
    pixels become its input: ``(pixels / 255 - mean) / std``. A text dataset has a
    ``seq_len`` instead (token ids in, next tokens out; ``num_classes`` is the vocabulary)."""

    in_channels: int
    image_size: int
    num_classes: int
    mean: float = 0.0
    std: float = 1.0
    seq_len: int = 0

    @property
    def is_text(self) -> bool:
        return self.seq_len > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's input shape: ``(T,)`` token ids, or ``(C, H, W)`` pixels."""
        if self.is_text:
            return (self.seq_len,)
        return (self.in_channels, self.image_size, self.image_size)

    def empty(self) -> "TensorData":
        """No samples, in this input's shape."""
        if self.is_text:
            none = torch.empty(0, self.seq_len, dtype=torch.int64)
            return TensorData(none, none.clone())
        return TensorData(torch.empty(0, *self.input_shape), torch.empty(0, dtype=torch.int64))


DIGITS = "digits"
MIN_PARTITION_SIZE = 2  # Dirichlet partitions: redrawn until each has this many samples


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
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=MIN_PARTITION_SIZE
        )
    raise ValueError(f"unknown partitioning {partitioning!r}; choose 'iid' or 'dirichlet'")


def partition_indices(labels: np.ndarray, partitioning: str, num_partitions: int, alpha: float = 0.5,
                      seed: int = 0) -> list[np.ndarray]:
    """Every partition's sample indices of a split with these labels (flwr-datasets partitioners)."""
    partitioner = _fitted_partitioner(labels, partitioning, num_partitions, float(alpha), seed)
    return [_indices(partitioner, i, len(labels), partitioning, num_partitions, float(alpha)) for i in range(num_partitions)]


def _fitted_partitioner(labels: np.ndarray, partitioning: str, num_partitions: int, alpha: float, seed: int):
    from datasets import Dataset

    table = Dataset.from_dict({"index": np.arange(len(labels)), "label": np.asarray(labels)})
    partitioner = _partitioner(partitioning, num_partitions, alpha, seed)
    partitioner.dataset = table
    return partitioner


def _indices(partitioner, partition_id: int, n: int, partitioning: str, num_partitions: int, alpha: float) -> np.ndarray:
    """One partition's indices. ``IidPartitioner`` cuts contiguous shards, one sample each when
    there are more partitions than samples, so partitions from ``n`` on are empty (flwr-datasets
    raises for them). A Dirichlet split that cannot give every partition its minimum size is
    refused with what to change."""
    if partitioning == "iid" and partition_id >= n:
        return np.zeros(0, dtype=np.int64)
    try:
        with warnings.catch_warnings():  # flwr-datasets warns at each Dirichlet retry
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(partitioner.load_partition(partition_id)["index"], dtype=np.int64)
    except ValueError as err:
        if partitioning != "dirichlet":
            raise
        raise ValueError(
            f"dirichlet partitioning cannot split {n} samples into {num_partitions} partitions of at "
            f"least {MIN_PARTITION_SIZE} samples at dirichlet-alpha {alpha:g}: "
            f"use fewer partitions, a larger dirichlet-alpha or partitioning 'iid' (flwr-datasets: {err})"
        ) from None


@lru_cache(maxsize=4)
def _embedded_partitioner(dataset: str, split: str, partitioning: str, num_partitions: int, alpha: float, seed: int):
    """One fitted partitioner per setting (Dirichlet draws every partition at its first use)."""
    if dataset == text.STDLIB_TEXT:  # partitioned by source document
        return _fitted_partitioner(text.stdlib_text(split)[2], partitioning, num_partitions, alpha, seed)
    data = _digits()[0 if split == "train" else 1]
    return _fitted_partitioner(data.y.numpy(), partitioning, num_partitions, alpha, seed)


def dataset_info(dataset: str) -> DatasetInfo:
    """Channels, image size and classes (or sequence length and vocabulary) of a dataset name."""
    if dataset == DIGITS:
        return DatasetInfo(1, 8, 10)
    if dataset == text.STDLIB_TEXT:
        return DatasetInfo(0, 0, text.VOCAB_SIZE, seq_len=text.SEQ_LEN)
    known = {"uoft-cs/cifar10": DatasetInfo(3, 32, 10, 0.5, 0.5), "ylecun/mnist": DatasetInfo(1, 28, 10, 0.5, 0.5)}
    if dataset in known:
        return known[dataset]
    raise ValueError(f"unknown dataset {dataset!r}; use 'digits', '{text.STDLIB_TEXT}', 'uoft-cs/cifar10' or 'ylecun/mnist'")


def load_centralized(dataset: str, split: str = "test") -> TensorData:
    """A whole split (e.g. the held-out test set for server-side evaluation)."""
    dataset_info(dataset)  # refuse unknown names before touching the hub
    if dataset == DIGITS:
        return _digits()[0 if split == "train" else 1]
    if dataset == text.STDLIB_TEXT:
        x, y, _ = text.stdlib_text(split)
        return TensorData(x, y)
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
    """Partition ``partition_id`` of ``num_partitions`` of a dataset split (empty when an iid
    split has more partitions than samples). Text is split by sample (``iid``) or, with
    ``dirichlet``, by source document: each node holds mostly a few files of its own."""
    info = dataset_info(dataset)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    if dataset in (DIGITS, text.STDLIB_TEXT):
        data = load_centralized(dataset, split)
        partitioner = _embedded_partitioner(dataset, split, partitioning, num_partitions, float(alpha), seed)
        return data.subset(torch.from_numpy(_indices(partitioner, partition_id, len(data), partitioning, num_partitions, float(alpha))))
    fds = _hub_dataset(dataset, split, partitioning, num_partitions, float(alpha), seed)
    try:
        return _to_tensors(fds.load_partition(partition_id, split))
    except IndexError:  # an iid shard past the last sample
        if partitioning != "iid":
            raise
        return info.empty()


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


@lru_cache(maxsize=2)
def _hub_dataset(dataset, split, partitioning, num_partitions, alpha, seed):
    """One ``FederatedDataset`` per setting; each node loads its own partition from it."""
    from flwr_datasets import FederatedDataset

    return FederatedDataset(
        dataset=dataset, partitioners={split: _partitioner(partitioning, num_partitions, alpha, seed)}
    )


@lru_cache(maxsize=4)
def _hub_split(dataset: str, split: str) -> TensorData:
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(dataset=dataset, partitioners={})
    return _to_tensors(fds.load_split(split))
