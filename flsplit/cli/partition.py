"""Write per-node partitions of a dataset to folders (the ``flsplit partition`` command).

``flsplit partition --dataset digits --num-partitions 4 --partitioning dirichlet --alpha 0.5
--out parts --format npz`` splits the dataset's training split with a flwr-datasets partitioner
(``iid``, or ``dirichlet`` by label), and its test split iid, exactly as a simulation's nodes do
(``flsplit.data.datasets.load_partition`` with the same settings gives the same samples), and writes

* ``<out>/partition-<i>/``: node ``i``'s data, to start its SuperNode with
  ``--node-config "data-path=<out>/partition-<i>"``: ``train.npz`` and ``test.npz`` (arrays
  ``x``, ``y``; ``x`` the model's float input) with ``--format npz``, or ``train/<label>/<k>.png``
  and ``test/<label>/<k>.png`` with ``--format imagefolder`` (8-bit pixels; the model's input
  is recovered to within 1/255 of the pixel range). A partition whose test share is empty
  gets no test data (the node then sends no evaluation data);
* ``<out>/centralized/``: the whole test split in the same format, for the server's
  ``test-data-path``.

``--source PATH`` partitions data already on disk (any format ``data-path`` reads:
``flsplit.data.local``) instead of the named dataset, which then only gives the model's input
shape and scaling. An iid split with more partitions than training samples is refused (the
partitions would be empty); so is a Dirichlet split that cannot give every partition 2 samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np

from flsplit.cli.args import int_at_least
from flsplit.data.datasets import DatasetInfo, TensorData, dataset_info, load_centralized, partition_indices
from flsplit.data.local import input_to_pixels, load_local

__all__ = ["write_partitions", "add_arguments"]

FORMATS = ("npz", "imagefolder")


def write_partitions(train: TensorData, test: Optional[TensorData], info: DatasetInfo, out: Path, num_partitions: int,
                     partitioning: str = "iid", alpha: float = 0.5, seed: int = 0, fmt: str = "npz") -> list[dict]:
    """Write ``num_partitions`` partitions of ``train`` (and iid shares of ``test``) under ``out``;
    return per partition its folder and sample counts."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if partitioning == "iid" and num_partitions > len(train):
        raise ValueError(f"{num_partitions} iid partitions of {len(train)} training samples: "
                         f"{num_partitions - len(train)} would be empty; use at most {len(train)} partitions")
    train_parts = partition_indices(train.y.numpy(), partitioning, num_partitions, alpha, seed)
    test_parts = (partition_indices(test.y.numpy(), "iid", num_partitions) if test is not None and len(test)
                  else [np.zeros(0, dtype=np.int64)] * num_partitions)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, (tr, te) in enumerate(zip(train_parts, test_parts)):
        folder = out / f"partition-{i}"
        if folder.exists():
            raise FileExistsError(f"{folder} exists: write partitions to a new or empty folder")
        folder.mkdir()
        _write(folder, "train", train.subset(tr), info, fmt)
        if len(te):
            _write(folder, "test", test.subset(te), info, fmt)
        summary.append({"partition": i, "data-path": str(folder.resolve()), "train": len(tr), "test": len(te)})
    if test is not None and len(test):
        central = out / "centralized"
        central.mkdir(exist_ok=True)
        _write(central, "test", test, info, fmt)
    return summary


def _write(folder: Path, split: str, data: TensorData, info: DatasetInfo, fmt: str) -> None:
    if fmt == "npz":
        np.savez(folder / f"{split}.npz", x=data.x.numpy(), y=data.y.numpy())
        return
    from PIL import Image

    pixels = input_to_pixels(data.x, info)
    for k, (image, label) in enumerate(zip(pixels, data.y.tolist())):
        target = folder / split / str(label)
        target.mkdir(parents=True, exist_ok=True)
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(target / f"{k}.png")


def run(args: argparse.Namespace) -> int:
    info = dataset_info(args.dataset)
    if args.source:
        train, test = load_local(args.source, info, "train"), load_local(args.source, info, "test")
    else:
        train, test = load_centralized(args.dataset, "train"), load_centralized(args.dataset, "test")
    summary = write_partitions(train, test, info, Path(args.out), args.num_partitions, args.partitioning,
                               args.alpha, args.seed, args.format)
    if args.json:
        print(json.dumps({"partitions": summary, "centralized": str((Path(args.out) / "centralized").resolve())}))
        return 0
    for row in summary:
        print(f"partition {row['partition']}: {row['train']} training, {row['test']} test samples -> "
              f"--node-config \"data-path={row['data-path']}\"")
    if test is not None and len(test):
        print(f"server: --run-config 'test-data-path=\"{(Path(args.out) / 'centralized').resolve()}\"'")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``partition`` arguments to ``parser`` and set its handler."""
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    parser.add_argument("--dataset", default="digits",
                        help="dataset name (digits, ylecun/mnist, uoft-cs/cifar10); with --source it only sets "
                             "the model's input shape and scaling (default digits)")
    parser.add_argument("--source", default="", help="partition data on disk (any format data-path reads) instead")
    parser.add_argument("--num-partitions", type=int_at_least(1), required=True)
    parser.add_argument("--partitioning", choices=("iid", "dirichlet"), default="iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="the Dirichlet draw's seed (default 0)")
    parser.add_argument("--out", required=True, help="folder to write partition-<i>/ and centralized/ into")
    parser.add_argument("--format", choices=FORMATS, default="npz")
    parser.add_argument("--json", action="store_true", help="print the partitions as one JSON document")
    parser.set_defaults(handler=run)
