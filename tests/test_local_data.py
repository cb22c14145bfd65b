"""Device-local data (``data-path``), the ``flsplit partition`` command, empty partitions, and a
fleet of 1000 nodes building only the sampled nodes' data."""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from apps import client_app as client_module
from apps.client_app import app as client_app
from apps.server_app import app as server_app
from apps.task import RunSettings, centralized_test, client_data
from flsplit.cli import main as flsplit_main
from flsplit.data.datasets import dataset_info, load_centralized, load_partition
from flsplit.planes.inprocess import InProcessGrid
from flsplit.data.local import data_format, load_local

DIGITS, MNIST, CIFAR = dataset_info("digits"), dataset_info("ylecun/mnist"), dataset_info("uoft-cs/cifar10")


def _pixels(n, *shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ------------------------------------------------------------------ formats
def test_npz_file_train_and_optional_test(tmp_path):
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    train = load_local(tmp_path / "a.npz", DIGITS)
    assert torch.equal(train.x, torch.from_numpy(x)) and train.y.tolist() == [0, 1, 2, 3, 4]
    assert load_local(tmp_path / "a.npz", DIGITS, "test") is None  # no x_test/y_test: no evaluation data
    pixels = _pixels(3, 8, 8)  # (N, H, W) 8-bit pixels: one channel, scaled like the dataset
    np.savez(tmp_path / "b.npz", x=x, y=np.arange(5), x_test=pixels, y_test=np.array([9, 0, 1]))
    test = load_local(tmp_path / "b.npz", DIGITS, "test")
    assert test.x.shape == (3, 1, 8, 8) and torch.allclose(test.x[:, 0], torch.from_numpy(pixels / 255.0).float())
    assert test.y.tolist() == [9, 0, 1] and data_format(tmp_path / "b.npz") == "npz-file"


def test_npz_folder_channels_last_rgb(tmp_path):
    pixels = _pixels(4, 32, 32, 3)
    np.savez(tmp_path / "train.npz", x=pixels, y=np.array([0, 1, 2, 3]))
    train = load_local(tmp_path, CIFAR)
    expected = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    assert train.x.shape == (4, 3, 32, 32) and torch.allclose(train.x, expected)
    assert load_local(tmp_path, CIFAR, "test") is None and data_format(tmp_path) == "npz-dir"


def test_image_folder_labels_by_folder_name_channels_and_size_converted(tmp_path):
    gray = _pixels(2, 8, 8)
    for k, image in enumerate(gray):  # only classes 3 and 7 on this node: labels stay 3 and 7
        (tmp_path / "train" / ("3" if k == 0 else "7")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "train" / ("3" if k == 0 else "7") / f"{k}.png")
    (tmp_path / "test" / "5").mkdir(parents=True)
    Image.fromarray(_pixels(1, 16, 16, 3)[0]).save(tmp_path / "test" / "5" / "rgb.png")  # RGB 16x16
    train, test = load_local(tmp_path, DIGITS), load_local(tmp_path, DIGITS, "test")
    assert train.y.tolist() == [3, 7] and torch.allclose(train.x[:, 0], torch.from_numpy(gray / 255.0).float())
    assert test.x.shape == (1, 1, 8, 8) and test.y.tolist() == [5]  # to grayscale, resized to 8x8
    assert data_format(tmp_path) == "imagefolder"


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def _mnist_files(root, n_train=6, n_test=4):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _pixels(n, 28, 28, seed=n), (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{split}-images-idx3-ubyte", images, 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels, 2049)
        data[split] = images, labels
    return data


def test_torchvision_mnist_files(tmp_path):
    data = _mnist_files(tmp_path)
    train, test = load_local(tmp_path, MNIST), load_local(tmp_path, MNIST, "test")
    assert train.x.shape == (6, 1, 28, 28) and len(test) == 4
    assert torch.allclose(train.x[:, 0], (torch.from_numpy(data["train"][0]).float() / 255 - 0.5) / 0.5)
    assert test.y.tolist() == data["t10k"][1].tolist()
    assert load_local(tmp_path, DIGITS).x.shape == (6, 1, 8, 8)  # resized to what the model takes


def test_torchvision_cifar10_files(tmp_path, monkeypatch):
    """CIFAR-10's files as torchvision reads them (its MD5 check patched: the files are made here)."""
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": _pixels(n, 3 * 32 * 32), "labels": list(range(n))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    train, test = load_local(tmp_path, CIFAR), load_local(tmp_path, CIFAR, "test")
    assert train.x.shape == (10, 3, 32, 32) and test.y.tolist() == [0, 1, 2] and data_format(tmp_path) == "cifar10"
    assert load_local(tmp_path, MNIST).x.shape == (10, 1, 28, 28)  # to grayscale and 28x28


# ------------------------------------------------------------------ errors name the node and the problem
def _bad_data(tmp_path, case):
    path = tmp_path / case
    if case == "missing":
        return path
    path.mkdir()
    if case == "unrecognised":
        (path / "images").mkdir()
    elif case == "no-train-folder":
        (path / "test" / "0").mkdir(parents=True)
    elif case == "empty-train":
        (path / "train" / "0").mkdir(parents=True)
    elif case == "class-name":
        (path / "train" / "cat").mkdir(parents=True)
    elif case == "class-range":
        (path / "train" / "12").mkdir(parents=True)
    elif case == "shape":
        np.savez(path / "train.npz", x=np.zeros((2, 1, 28, 28), np.float32), y=np.zeros(2, np.int64))
    elif case == "channels":
        np.savez(path / "train.npz", x=np.zeros((2, 3, 8, 8), np.float32), y=np.zeros(2, np.int64))
    elif case == "labels":
        np.savez(path / "train.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.array([1, 10]))
    elif case == "count":
        np.savez(path / "train.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.array([1]))
    elif case == "nan":
        np.savez(path / "train.npz", x=np.full((2, 1, 8, 8), np.nan, np.float32), y=np.array([1, 2]))
    elif case == "missing-y":
        np.savez(path / "train.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    elif case == "mnist-incomplete":
        (path / "MNIST" / "raw").mkdir(parents=True)
    return path


BAD = {
    "missing": "does not exist",
    "no-train-folder": "no training samples",
    "unrecognised": "no data found in .*expected train.npz, a train/ folder",
    "empty-train": "no training samples",
    "class-name": "class folder 'cat': class folders must be named by label, 0..9",
    "class-range": "class folder '12'",
    "shape": r"x has shape \(2, 1, 28, 28\); the model takes \(N, 1, 8, 8\)",
    "channels": r"x has shape \(2, 3, 8, 8\) \(3 channels, the model takes 1\)",
    "labels": r"labels out of range \[10\]: the model has 10 classes",
    "count": "2 samples but 1 labels",
    "nan": "NaN or infinite",
    "missing-y": r"missing array\(s\) \['y'\]",
    "mnist-incomplete": "torchvision's MNIST files: Dataset not found",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unusable_data_is_refused_naming_node_and_problem(tmp_path, case):
    path = _bad_data(tmp_path, case)
    with pytest.raises(ValueError, match=f"^node 77, partition-id 3: data-path: .*{BAD[case]}"):
        client_data(RunSettings(), {"data-path": str(path), "partition-id": 3}, node_id=77)


def test_server_test_data_path(tmp_path):
    np.savez(tmp_path / "held.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([1, 2, 3]))
    assert centralized_test(RunSettings({"test-data-path": str(tmp_path / "held.npz")})).y.tolist() == [1, 2, 3]
    np.savez(tmp_path / "train.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="test-data-path: no evaluation data"):
        centralized_test(RunSettings({"test-data-path": str(tmp_path)}))
    with pytest.raises(ValueError, match="test-data-path must be a path"):
        RunSettings({"test-data-path": 3})


def _run_server(grid, tmp_path, **run_config):
    run_config = {"output-dir": str(tmp_path / "runs"), **run_config}
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    (history,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/history.json")]
    return history


def test_nodes_train_on_their_data_path_and_a_bad_one_is_that_nodes_error(tmp_path, one_torch_thread):
    """Partitions written by ``flsplit partition`` feed nodes through ``data-path`` in their node
    config; a node whose path is wrong answers its first message with an error naming it, and
    the round goes on with the others."""
    parts = tmp_path / "parts"
    assert flsplit_main(["partition", "--num-partitions", "2", "--out", str(parts), "--format", "npz"]) == 0
    config = {"strategy": "sflv2", "max-steps": 3, "num-server-rounds": 1, "cost-scenario": "none",
              "fraction-evaluate": 1.0, "test-data-path": str(parts / "centralized")}
    grid = InProcessGrid(client_app, 3, run_config=config)
    for i, node in enumerate(grid.node_ids):
        grid.contexts[node].node_config = {"data-path": str(parts / f"partition-{i}")}  # partition-2: missing
    history = _run_server(grid, tmp_path, **config)
    (entry,) = history["rounds"]
    bad = str(grid.node_ids[2])
    assert entry["examples_per_node"] == {str(grid.node_ids[0]): 96, str(grid.node_ids[1]): 96}
    errors = json.dumps(entry["errors"])
    assert f"node {bad}: data-path: " in errors and "partition-2" in errors and "does not exist" in errors
    assert 0.0 <= entry["eval_accuracy"] <= 1.0 and 0.0 <= entry["test_accuracy"] <= 1.0


# ------------------------------------------------------------------ the partition command
@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
@pytest.mark.parametrize("fmt", ["npz", "imagefolder"])
def test_partitions_load_back_and_together_are_the_dataset(tmp_path, partitioning, fmt):
    out = tmp_path / "out"
    assert flsplit_main(["partition", "--num-partitions", "3", "--partitioning", partitioning, "--alpha", "0.3",
                         "--seed", "1", "--out", str(out), "--format", fmt]) == 0
    tol = 0.0 if fmt == "npz" else 0.5 / 255 + 1e-6  # PNG: 8-bit pixels
    for split in ("train", "test"):
        whole = load_centralized("digits", split)
        parts = [load_local(out / f"partition-{i}", DIGITS, split) for i in range(3)]
        expected = [load_partition("digits", i, 3, partitioning if split == "train" else "iid", 0.3, 1, split)
                    for i in range(3)]
        assert sum(len(p) for p in parts) == len(whole)
        for got, want in zip(parts, expected):  # the same samples a simulation's node gets
            order = lambda d: np.lexsort(np.c_[d.y.numpy(), d.x.reshape(len(d), -1).numpy().round(2)].T)  # noqa: E731
            g, w = got.subset(torch.from_numpy(order(got))), want.subset(torch.from_numpy(order(want)))
            assert torch.equal(g.y, w.y) and float((g.x - w.x).abs().max()) <= tol
    central = load_local(out / "centralized", DIGITS, "test")
    assert len(central) == 360


def test_partition_command_refuses_empty_partitions(tmp_path, capsys):
    with pytest.raises(ValueError, match="1500 iid partitions of 1437 training samples: 63 would be empty"):
        flsplit_main(["partition", "--num-partitions", "1500", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="dirichlet partitioning cannot split 1437 samples into 1000 partitions"):
        flsplit_main(["partition", "--num-partitions", "1000", "--partitioning", "dirichlet", "--out", str(tmp_path / "b")])


# ------------------------------------------------------------------ empty partitions and scale
def test_more_partitions_than_samples_gives_empty_partitions(tmp_path):
    assert len(load_partition("digits", 400, 1000, split="test")) == 0  # was: IndexError from flwr-datasets
    assert len(load_partition("digits", 359, 1000, split="test")) == 1
    train, test = client_data(RunSettings(), {"partition-id": 1499, "num-partitions": 1500})
    assert len(train) == 0 and train.x.shape == (0, 1, 8, 8) and test is None
    with pytest.raises(ValueError, match="^node 5, partition-id 9: partition-id 9 outside"):
        client_data(RunSettings(), {"partition-id": 9, "num-partitions": 4}, node_id=5)


def test_a_node_without_data_reports_zero_examples_cleanly(tmp_path, one_torch_thread):
    """Partitions 1437.. of 1500 have no training samples and partitions 360.. no test samples:
    such a node ends its round at once with 0 examples, which the reply gate accepts, and sends
    no evaluation data."""
    config = {"strategy": "psl", "max-steps": 2, "num-server-rounds": 1, "cost-scenario": "none",
              "fraction-evaluate": 1.0}
    grid = InProcessGrid(client_app, 3, run_config=config)
    for node, pid in zip(grid.node_ids, (0, 1000, 1499)):
        grid.contexts[node].node_config = {"partition-id": pid, "num-partitions": 1500}
    (entry,) = _run_server(grid, tmp_path, **config)["rounds"]
    assert not entry["errors"], entry["errors"]
    assert sorted(entry["examples_per_node"].values()) == [0, 2, 2]  # one sample, two steps
    assert entry["eval_accuracy"] in (0.0, 1.0)  # evaluated on partition 0's one test sample; the others sent none


def test_a_fleet_of_1000_builds_only_the_sampled_nodes_data(tmp_path, one_torch_thread, monkeypatch):
    """1000 nodes, 1% sampled for training and for evaluation: every sampled node trains (the
    held-out split has 360 samples: most evaluation shares are empty and send nothing), and only
    sampled nodes load their partitions."""
    config = {"strategy": "psl", "max-steps": 2, "num-server-rounds": 2, "cost-scenario": "none",
              "fraction-train": 0.01, "fraction-evaluate": 0.01, "min-available-nodes": 1}
    built = []
    monkeypatch.setattr(client_module, "client_data",
                        lambda settings, node_config, node_id: built.append(node_id) or client_data(settings, node_config, node_id))
    client_module._client.cache_clear()
    grid = InProcessGrid(client_app, 1000, run_config=config)
    history = _run_server(grid, tmp_path, **config)
    trained = set()
    for entry in history["rounds"]:
        assert not entry["errors"], entry["errors"]
        assert len(entry["examples_per_node"]) == 10 and all(v > 0 for v in entry["examples_per_node"].values())
        trained |= {int(n) for n in entry["examples_per_node"]}
    assert 10 < len(set(built)) <= 40 and trained <= set(built)  # 2 rounds x (10 trained + 10 evaluated)
    assert client_module._client.cache_info().currsize <= 16
