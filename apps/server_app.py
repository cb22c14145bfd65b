"""ServerApp: the edge-server side of split learning, configured from the run config."""

from __future__ import annotations

import inspect
import time
from logging import INFO
from typing import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from apps.task import RunSettings, make_evaluate_fn, make_model_fn
from flsplit.runtime.checkpoint import load_checkpoint
from flsplit.model.hf import export_hf
from flsplit.model.lora import lora_family, merge_lora
from flsplit.data.datasets import dataset_info
from flsplit.planes.dataplane import MessageDataPlane, time_noop_exchanges
from flsplit.planes.registry import plane_factory
from flsplit.runtime.history import RunHistory
from flsplit.wire.protocol import NOOP
from flsplit.sim.scenario_files import scenario_from_run_config
from flsplit.planners.online import make_online_planner
from flsplit.planners.registry import planner_entry
from flsplit.strategies import STRATEGIES
from flsplit.strategies.adaptive import Adaptive

app = ServerApp()


def build_strategy(settings: RunSettings, history: RunHistory):
    """The strategy named by ``strategy`` with every knob from the run config: the common ones
    here, the scheme's own from its class (``SplitStrategy.run_config_options``)."""
    name = settings["strategy"]
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    scheme_options = cls.run_config_options(settings)  # the scheme's own keys (they may override a common one)
    info = dataset_info(settings["dataset"])
    options = dict(
        model_fn=make_model_fn(settings),
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        cut_layer=settings.cuts,
        batch_size=int(settings["batch-size"]),
        local_epochs=int(settings["local-epochs"]),
        max_steps=int(settings["max-steps"]),
        steps_per_exchange=int(settings["steps-per-exchange"]),
        learning_rate=float(settings["learning-rate"]),
        momentum=settings.momentum,
        optimizer=str(settings["optimizer"]),
        tail_cut=int(settings["tail-cut"]),
        carry_momentum=settings["carry-momentum"],
        seed=int(settings["seed"]),
        fraction_train=float(settings["fraction-train"]),
        fraction_evaluate=float(settings["fraction-evaluate"]),
        min_available_nodes=int(settings["min-available-nodes"]),
        history=history,
        scenario=scenario_from_run_config(settings),
        data_plane_factory=plane_factory(settings),  # the plane folder that serves `data-plane` (flsplit.planes)
        checkpoint_dir=history.directory,  # a checkpoint after every round, beside history.json
        server_device=settings["server-device"],
    )
    for key, arg in (("codec-up", "codec_up"), ("codec-down", "codec_down")):
        if settings[key]:  # empty: the scheme's default (FP8 for async, lossless otherwise)
            options[arg] = str(settings[key])
    options.update(scheme_options)
    return with_planner(cls(**options), settings)


# The run-config key and type of each online planner knob; a planner gets the knobs its class
# takes (flsplit.planners.online), so a planner with known knobs needs nothing here.
PLANNER_KNOBS: dict[str, tuple[str, Callable[[object], object]]] = {
    "energy_budget_j": ("planner-energy-budget", str),
    "V": ("planner-v", float),
    "phi": ("phi", float),
    "agent_path": ("planner-agent", str),
}


def with_planner(strategy, settings: RunSettings):
    """The strategy itself, or wrapped in ``Adaptive`` with the planner the run config names."""
    name = str(settings["planner"])
    if name == "none":
        return strategy
    if strategy.scenario is None:
        raise ValueError(f"planner '{name}' needs a wireless scenario: cost-scenario must not be 'none'")
    cuts = [c.strip() for c in str(settings["planner-candidate-cuts"]).split(",") if c.strip()]
    try:
        candidate_cuts = [int(c) for c in cuts] or None
    except ValueError:
        raise ValueError(f"planner-candidate-cuts must be a comma list of cut layers, got {settings['planner-candidate-cuts']!r}") from None
    takes = inspect.signature(planner_entry(name, online=True).online_class()).parameters
    knobs: dict = {knob: read(settings[key]) for knob, (key, read) in PLANNER_KNOBS.items() if knob in takes}
    knobs.update(bytes_per_element=strategy.codec_up.bytes_per_element(strategy.server_dtype), candidate_cuts=candidate_cuts)
    return Adaptive(strategy, make_online_planner(name, strategy.profile, strategy.scenario, **knobs))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train with the configured scheme, log a line per round, save history and final model."""
    settings = RunSettings(context.run_config)
    checkpoint = None
    if settings["resume-from"]:  # a corrupt checkpoint, or one of other settings, is refused before anything runs
        checkpoint = load_checkpoint(settings["resume-from"])
        settings.check_resume(checkpoint.history.get("run", {}))
        run_dir = checkpoint.directory  # the run goes on in its own directory
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(settings["output-dir"]).expanduser().resolve() / f"{stamp}-{settings['strategy']}-{context.run_id}"
    history = RunHistory(run_dir, run={**settings, "run_id": context.run_id})
    log(INFO, "[flsplit] %s on %s, history: %s", settings["strategy"], settings["dataset"], history.path)
    strategy = build_strategy(settings, history)

    if int(settings["noop-exchanges"]) > 0:
        _, nodes = sample_nodes(grid, strategy.settings.min_available_nodes, 0)  # waits for the nodes
        seconds = time_noop_exchanges(MessageDataPlane(grid), sorted(nodes), int(settings["noop-exchanges"]), NOOP)
        history.data["noop_exchange_seconds"] = seconds
        log(INFO, "[flsplit] no-op exchange with %d nodes: %.4f s", len(nodes), seconds)

    model_fn = make_model_fn(settings)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model_fn().blocks.state_dict()),
        num_rounds=int(settings["num-server-rounds"]),
        timeout=float(settings["exchange-timeout"]),
        evaluate_fn=make_evaluate_fn(settings, model_fn, strategy.device),
        resume_from=checkpoint,
    )
    model = model_fn()
    final = run_dir / "final_model.pt"
    torch.save(model.to_original_state_dict(result.arrays.to_torch_state_dict()), final)
    history.data["final_model"] = str(final)
    if int(settings["lora-rank"]) and lora_family(model) in ("gpt2", "llama", "bert"):  # a Hugging Face model
        model.blocks.load_state_dict(result.arrays.to_torch_state_dict())
        history.data["final_model_hf"] = str(export_hf(merge_lora(model), run_dir / "final_model_hf"))
    history.save()
    log(INFO, "[flsplit] done: history %s, final model %s", history.path, final)
