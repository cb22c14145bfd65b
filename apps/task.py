"""Task definition shared by the ServerApp and the ClientApp: model, data, evaluation."""

from __future__ import annotations

import re
from functools import partial
from logging import WARNING
from typing import Any, Callable, Mapping, Optional

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from flsplit.model import rng
from flsplit.runtime.checkpoint import CheckpointMismatch
from flsplit.sim.checks import int_arg, real_arg
from flsplit.wire.protocol import SplitConfig
from flsplit.runtime.server import EPSL_MECHANISMS, EPSL_SCALINGS
from flsplit.strategies.epsl import POSITIONS as EPSL_POSITIONS
from flsplit.data.datasets import TensorData, dataset_info, load_centralized, load_partition
from flsplit.data.local import LocalDataError, load_local
from flsplit.model.loss import correct, mean_loss
from flsplit.model.lora import add_lora, freeze
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import build_model

__all__ = ["RunSettings", "make_model_fn", "client_data", "centralized_test", "make_evaluate_fn"]

DEFAULTS: dict[str, Any] = {
    "strategy": "psl",
    "model": "digits-cnn",
    "dataset": "digits",
    "test-data-path": "",
    "partitioning": "iid",
    "dirichlet-alpha": 0.5,
    "num-server-rounds": 10,
    "local-epochs": 1,
    "max-steps": 0,
    "batch-size": 32,
    "learning-rate": 0.1,
    "momentum": 0.9,
    "optimizer": "sgd",
    "carry-momentum": False,
    "cut-layer": "2",
    "tail-cut": 0,
    "lora-rank": 0,
    "lora-alpha": 16.0,
    "freeze-client": False,
    "steps-per-exchange": 1,
    "phi": 0.5,
    "aggregated-positions": "first",
    "epsl-mechanism": "gradient-weighted",
    "epsl-scaling": "sum",
    "codec-up": "",
    "codec-down": "",
    "loss-threshold": 0.05,
    "state-window": "epoch",
    "cache-max-mb": 1024.0,
    "seed": 0,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-available-nodes": 2,
    "exchange-timeout": 600.0,
    "noop-exchanges": 0,
    "output-dir": "flsplit-runs",
    "cost-scenario": "homogeneous",
    "planner": "none",
    "planner-v": 0.01,
    "planner-energy-budget": "",
    "planner-agent": "",
    "planner-candidate-cuts": "",
    "data-plane": "auto",
    "stream-listen": "127.0.0.1:0",
    "stream-advertise": "",
    "stream-certfile": "",
    "stream-keyfile": "",
    "stream-max-frame-mb": 256,
    "stream-handshake-timeout": 10.0,
    "stream-open-timeout": 600.0,
    "resume-from": "",
    "server-device": "auto",
}

# What a resumed run may change: how long it runs and how it reaches its nodes, not what it trains.
RESUME_MAY_CHANGE = frozenset({
    "num-server-rounds", "resume-from", "output-dir", "exchange-timeout", "noop-exchanges", "min-available-nodes",
    "data-plane", "stream-listen", "stream-advertise", "stream-certfile", "stream-keyfile", "stream-max-frame-mb",
    "stream-handshake-timeout", "stream-open-timeout", "planner-agent",  # the agent may move; the strategy compares the agent itself
    "server-device",  # the same training, on another device (equal to float tolerance)
})


class RunSettings(dict):
    """The run config with defaults filled in (``run_simulation`` leaves it empty)."""

    def __init__(self, run_config: Optional[Mapping[str, Any]] = None) -> None:
        # cost-* keys belong to the cost model (flsplit.sim.scenario_files.scenario_from_run_config)
        unknown = {k for k in run_config or {} if not k.startswith("cost-")} - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown run-config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        super().__init__({**DEFAULTS, **(run_config or {})})
        self.check()

    def check(self) -> None:
        """Every key the ServerApp reads, checked here once: ``ValueError`` names the key and
        the allowed values. The training settings are checked by ``SplitConfig``, the one
        definition clients check too."""
        for key, low in (("num-server-rounds", 1), ("min-available-nodes", 1), ("noop-exchanges", 0)):
            int_arg(key, self[key], minimum=low)
        for key, low, high, low_open in (
            ("fraction-train", 0.0, 1.0, True), ("fraction-evaluate", 0.0, 1.0, False), ("phi", 0.0, 1.0, False),
        ):
            real_arg(key, self[key], low=low, high=high, low_open=low_open)
        for key in ("exchange-timeout", "dirichlet-alpha", "cache-max-mb", "stream-max-frame-mb", "stream-handshake-timeout",
                    "stream-open-timeout"):
            real_arg(key, self[key], low=0.0, low_open=True)
        device = self["server-device"]  # whether this machine has it is checked where the server part is built
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"server-device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        for key in ("loss-threshold", "planner-v"):
            real_arg(key, self[key], low=0.0)
        int_arg("lora-rank", self["lora-rank"], minimum=0)
        real_arg("lora-alpha", self["lora-alpha"], low=0.0, low_open=True)
        if not isinstance(self["freeze-client"], bool):
            raise ValueError(f"freeze-client must be true or false, got {self['freeze-client']!r}")
        if not isinstance(self["test-data-path"], str):
            raise ValueError(f"test-data-path must be a path (a string, empty for the dataset's test split), "
                             f"got {self['test-data-path']!r}")
        if not isinstance(self["resume-from"], str):
            raise ValueError(f"resume-from must be a run directory (a string, empty for a new run), got {self['resume-from']!r}")
        if self["epsl-mechanism"] not in EPSL_MECHANISMS:
            raise ValueError(f"epsl-mechanism must be one of {list(EPSL_MECHANISMS)}, got {self['epsl-mechanism']!r}")
        if self["epsl-scaling"] not in EPSL_SCALINGS:
            raise ValueError(f"epsl-scaling must be one of {list(EPSL_SCALINGS)}, got {self['epsl-scaling']!r}")
        if self["aggregated-positions"] not in EPSL_POSITIONS:
            raise ValueError(f"aggregated-positions must be one of {list(EPSL_POSITIONS)}, "
                             f"got {self['aggregated-positions']!r}")
        if self["partitioning"] not in ("iid", "dirichlet"):
            raise ValueError(f"partitioning must be 'iid' or 'dirichlet', got {self['partitioning']!r}")
        _ = self.cuts  # parses cut-layer
        SplitConfig(
            server_round=1, cut=1, batch_size=self["batch-size"], local_epochs=self["local-epochs"],
            max_steps=self["max-steps"], steps_per_exchange=self["steps-per-exchange"],
            learning_rate=self["learning-rate"], momentum=self.momentum, seed=self["seed"],
            carry_momentum=self["carry-momentum"], optimizer=self["optimizer"], tail_cut=self["tail-cut"],
            codec_up=self["codec-up"] or "native", codec_down=self["codec-down"] or "native",
        )

    @property
    def momentum(self) -> float:
        """SGD's momentum; ``momentum`` is SGD's setting (its default 0.9 too): ``adamw`` ignores it."""
        return float(self["momentum"]) if self["optimizer"] == "sgd" else 0.0

    def check_resume(self, saved: Mapping[str, Any]) -> None:
        """Refuse to resume a run saved with ``saved`` settings (its history's ``run``) that
        differ from these in a key that changes what is trained (not in ``RESUME_MAY_CHANGE``)."""
        keys = {k for k in {*self, *saved} if k in DEFAULTS or k.startswith("cost-")} - RESUME_MAY_CHANGE
        diffs = [f"{k}: checkpoint {saved.get(k, DEFAULTS.get(k))!r}, this run {self.get(k, DEFAULTS.get(k))!r}"
                 for k in sorted(keys) if saved.get(k, DEFAULTS.get(k)) != self.get(k, DEFAULTS.get(k))]
        if diffs:
            raise CheckpointMismatch(f"resume-from {self['resume-from']!r}: the saved run had other settings: " + "; ".join(diffs))

    @property
    def cuts(self) -> int | list[int]:
        """``cut-layer`` as one cut (``2``) or a round-robin list (``"1,3"``)."""
        raw = self["cut-layer"]
        try:
            values = [int(v) for v in str(raw).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"cut-layer must be a cut layer or a comma list of them (\"2\", \"1,3\"), got {raw!r}") from None
        if not values or min(values) < 1:
            raise ValueError(f"cut-layer must name cuts >= 1, got {raw!r}")
        return values[0] if len(values) == 1 else values


def make_model_fn(settings: RunSettings) -> Callable[[], SplitModel]:
    """A function building the run's model (fixed init seed, so every process agrees)."""
    info = dataset_info(settings["dataset"])

    def model_fn() -> SplitModel:
        # Seeded on a fork of the generator: building a model does not reset the stream the
        # server's dropout draws from; the LoRA adapters are drawn from the same stream, so
        # every process builds the same ones.
        with rng.seeded(int(settings["seed"])):
            model = build_model(settings["model"], info.num_classes, info.in_channels, info.image_size, info.seq_len)
            if int(settings["lora-rank"]):
                add_lora(model, rank=int(settings["lora-rank"]), alpha=float(settings["lora-alpha"]))
        if settings["freeze-client"]:  # SplitFrozen: the devices only run their blocks forward
            cuts = settings.cuts
            freeze(model.client_part(min(cuts) if isinstance(cuts, list) else cuts))
        return model

    return model_fn


def node_name(node_config: Mapping[str, Any], node_id: Optional[int] = None) -> str:
    """How errors name a node: its node id and partition id, where known."""
    parts = [f"node {node_id}"] if node_id is not None else []
    if "partition-id" in node_config:
        parts.append(f"partition-id {node_config['partition-id']}")
    return ", ".join(parts) or "node"


def client_data(settings: RunSettings, node_config: Mapping[str, Any],
                node_id: Optional[int] = None) -> tuple[TensorData, Optional[TensorData]]:
    """This node's training data and its evaluation data (``None``: it has none).

    With ``data-path`` in the node config: the node's own files (``flsplit.data.local``; the
    run's ``dataset`` only gives the model's input shape, classes and pixel scaling). Otherwise
    partition ``partition-id`` of ``num-partitions`` of the run's ``dataset``, and an iid share
    of its test split; either may be empty when there are more partitions than samples (iid).
    Raises ``ValueError`` naming the node and the problem.
    """
    info = dataset_info(settings["dataset"])
    who = node_name(node_config, node_id)
    path = str(node_config.get("data-path", "") or "")
    if path:
        try:
            return load_local(path, info, "train"), load_local(path, info, "test")
        except LocalDataError as err:
            raise LocalDataError(f"{who}: data-path: {err}") from None
    try:
        pid = int(node_config.get("partition-id", 0))
        num = int(node_config.get("num-partitions", 1))
        load = partial(load_partition, settings["dataset"], pid, num, seed=int(settings["seed"]))
        train = load(partitioning=settings["partitioning"], alpha=float(settings["dirichlet-alpha"]), split="train")
        test = load(partitioning="iid", split="test")
    except ValueError as err:
        raise ValueError(f"{who}: {err}") from None
    if len(train) == 0:
        log(WARNING, "[flsplit] %s: partition %d of %d of '%s' has no training samples: the node reports 0 "
            "examples", who, pid, num, settings["dataset"])
    return train, (test if len(test) else None)


def centralized_test(settings: RunSettings) -> TensorData:
    """The server's held-out set: ``test-data-path``'s evaluation data (an ``.npz`` with only
    ``x``/``y`` is taken whole), or the dataset's test split."""
    path = str(settings["test-data-path"])
    if not path:
        return load_centralized(settings["dataset"], "test")
    info = dataset_info(settings["dataset"])
    try:
        test = load_local(path, info, "test")
        if test is None and path.endswith(".npz"):
            test = load_local(path, info, "train")
    except LocalDataError as err:
        raise LocalDataError(f"test-data-path: {err}") from None
    if test is None:
        raise LocalDataError(f"test-data-path: no evaluation data in {path!r} (test/, test.npz, x_test/y_test, "
                             "or torchvision's test files)")
    return test


def make_evaluate_fn(settings: RunSettings, model_fn: Callable[[], SplitModel], device: str | torch.device = "cpu"):
    """Centralized evaluation of the composed global model on the held-out test split (on
    ``device``, the server part's)."""
    test = centralized_test(settings)
    model = model_fn()
    model.blocks.to(device)
    x, y = test.x.to(device), test.y.to(device)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.blocks.load_state_dict(arrays.to_torch_state_dict())
        model.blocks.eval()
        with torch.no_grad():
            logits = torch.cat([model.blocks(x[i : i + 512]) for i in range(0, len(test), 512)])
        loss = mean_loss(logits, y).item()
        accuracy = correct(logits, y) / len(test)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate_fn
