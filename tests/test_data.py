"""Data: embedded digits, flwr-datasets partitioners, the hub conversion path, run settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apps.task import RunSettings
from flsplit.data.datasets import _to_tensors, load_centralized, load_partition


def test_digits_train_test_split_is_disjoint_and_complete():
    train, test = load_centralized("digits", "train"), load_centralized("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert float(train.x.max()) <= 1.0 and float(train.x.min()) >= 0.0
    assert train.y.dtype == torch.int64 and set(test.y.tolist()) == set(range(10))


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_cover_the_training_set_without_overlap(partitioning):
    train = load_centralized("digits", "train")
    parts = [load_partition("digits", i, 4, partitioning, alpha=0.3, seed=1) for i in range(4)]
    assert sum(len(p) for p in parts) == len(train)
    # every training sample appears exactly once across partitions
    rows = {tuple(r) for p in parts for r in p.x.reshape(len(p), -1).numpy().round(6).tolist()}
    assert len(rows) == len({tuple(r) for r in train.x.reshape(len(train), -1).numpy().round(6).tolist()})


def test_dirichlet_partitions_are_label_skewed():
    iid = [load_partition("digits", i, 4, "iid") for i in range(4)]
    skew = [load_partition("digits", i, 4, "dirichlet", alpha=0.1, seed=0) for i in range(4)]
    share = lambda p: np.bincount(p.y.numpy(), minlength=10).max() / len(p)  # noqa: E731
    assert min(share(p) for p in skew) > max(share(p) for p in iid)


def test_bad_partition_settings_are_named():
    with pytest.raises(ValueError, match="partition-id 4 outside"):
        load_partition("digits", 4, 4)
    with pytest.raises(ValueError, match="unknown partitioning"):
        load_partition("digits", 0, 4, "pathological")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_centralized("imagenet")


def test_hub_rows_become_scaled_image_tensors():
    """The flwr-datasets path (hub unreachable here): PIL images and labels to tensors."""
    from datasets import Dataset
    from PIL import Image

    pixels = np.array([[[0, 255], [255, 0]]] * 3, dtype=np.uint8)
    table = Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2]})
    data = _to_tensors(table)
    assert data.x.shape == (3, 1, 2, 2)
    assert data.x[0, 0].tolist() == [[-1.0, 1.0], [1.0, -1.0]]
    assert data.y.tolist() == [0, 1, 2]


def test_run_settings_fill_defaults_and_refuse_unknown_keys():
    s = RunSettings({"cut-layer": "1,3"})
    assert s["strategy"] == "psl" and s.cuts == [1, 3]
    assert RunSettings({"cut-layer": 4}).cuts == 4
    with pytest.raises(ValueError, match="unknown run-config keys \\['cut'\\]"):
        RunSettings({"cut": 2})
