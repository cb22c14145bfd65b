"""A split strategy's settings as one value, and the checks that fit them to the model.

``SplitSettings`` is what a ``SplitStrategy`` is built from: ``PSL(settings)``, or its fields as
keywords, ``PSL(model_fn=..., input_shape=..., num_classes=..., cut_layer=2)`` (they build the
value), or both, ``PSL(settings, batch_size=8)`` (keywords override). Scheme-specific settings
(``phi``, ``sync_clients``, ``loss_threshold``, ...) stay keywords of the scheme's class.
"""

from __future__ import annotations

import dataclasses
import numbers
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flsplit.wire import protocol as p
from flsplit.model import rng
from flsplit.model.graph_split import GraphSplitError
from flsplit.runtime.history import RunHistory
from flsplit.sim.scenario_files import Scenario
from flsplit.model.splitting import SplitModel, block_output_shapes, split_model_of, takes_token_ids

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from flsplit.planes.dataplane import DataPlane

__all__ = ["SplitSettings", "CutAssignment", "derived_seed", "MODEL_SEED_OFFSET", "SERVER_STREAM_OFFSET"]

CutAssignment = Union[int, str, list, Callable[[int, list[int]], Mapping[int, int]]]

# Fixed offsets from the strategy's seed: the generator model_fn runs under, and the one the
# server part's forward passes draw from (dropout masks). Any fixed values would do.
MODEL_SEED_OFFSET = 0x6D6F64656C  # "model"
SERVER_STREAM_OFFSET = 0x64726F70  # "drop"


def derived_seed(seed: int, offset: int) -> int:
    return (int(seed) + offset) % 2**63


def _innermost_exception(err: BaseException) -> str:
    """The message of the deepest exception of ``err``'s chain, on one line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    return " ".join(str(err).split()) or type(err).__name__


@dataclass(frozen=True)
class SplitSettings(p.TrainingSettings):
    """The settings of a split strategy (checked when the strategy is built): the round's
    ``TrainingSettings`` (keywords only; ``flsplit.wire.protocol``) and the server's own.

    Parameters
    ----------
    model_fn : callable
        Returns the model: a ``SplitModel``, or any ``nn.Module``, split here as the clients
        split it (``flsplit.as_split_model`` with an example batch of zeros of ``input_shape``:
        a layer stack at every child, any other module before each module its forward calls).
    input_shape : tuple of int
        Shape of one input sample, e.g. ``(1, 8, 8)``; fixes the expected smashed shapes.
    num_classes : int
        Number of classes (labels in replies are checked against it); the model's last block
        must output ``(num_classes,)`` per sample.
    cut_layer : int, str, list of them, or callable
        One cut for all clients; a list assigned round-robin over the sampled nodes (sorted
        by node id); or ``fn(server_round, node_ids) -> {node_id: cut}`` (may change every
        round). Cuts are integers ``1 .. L-1`` for a model of ``L`` blocks (for a graph split,
        also the names in ``model.cut_names``); a fixed cut or list is checked when the
        strategy is built, a function's cuts every round.
    batch_size, local_epochs, max_steps, steps_per_exchange, learning_rate, momentum,
    weight_decay, carry_momentum, seed, shuffle, optimizer :
        Training settings sent to the clients (``flsplit.wire.protocol.TrainingSettings``,
        keywords only); the server part uses the same SGD settings. With ``carry_momentum`` the shared server part (every scheme but
        SFL-V1, whose per-node copies are averaged) and each client keep their optimizer's
        state (SGD momentum; AdamW's moments and step counts) from round to round instead of
        starting each round with a fresh optimizer.
    codec_up, codec_down : str
        Wire codecs for smashed data and gradients (``flsplit.wire.codecs``): ``native`` (the
        model's dtype, lossless), ``fp32``, ``fp16``, ``bf16``, ``fp8-e4m3``, ``fp8-e5m2``, ``int8``.
    fraction_train : float
        Fraction of connected nodes sampled per round (at least ``min_train_nodes``).
    min_train_nodes, min_available_nodes : int
        Sampling waits until ``min_available_nodes`` are connected.
    fraction_evaluate, min_evaluate_nodes : float, int
        Federated split evaluation after each round (0 disables it).
    history : RunHistory, optional
        Where per-round records go (in memory if not given).
    scenario : Scenario, optional
        Wireless edge scenario (``flsplit.sim.scenario_files.load_scenario``); if given, every round's
        simulated latency and energy (from the bytes actually sent and the measured profile)
        go into the history under ``sim``.
    data_plane_factory : callable, optional
        ``fn(grid, timeout) -> DataPlane``; defaults to ``MessageDataPlane``.
    checkpoint_dir : str or Path, optional
        Save a checkpoint there after every round (``flsplit.runtime.checkpoint``); ``start(...,
        resume_from=...)`` continues from one.
    server_device : str
        Where the server part, its optimizer and the averaging run: ``"cpu"`` (default),
        ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present); clients are not affected.
    fail_untrained : bool
        A run in which no sampled node finished any round (every node dropped or sat out in
        every round) always logs an error and records ``error`` in the history; with
        ``fail_untrained`` (the default) ``start`` then raises ``RuntimeError``, so that Flower
        marks the run failed instead of completed.

    ``model_fn`` runs on a fork of torch's generator seeded from ``seed``, so building the
    strategy moves no random stream of the caller's. A cut, ``input_shape`` or ``num_classes``
    that does not fit the model is a ``ValueError`` when the strategy is built.
    """

    model_fn: Callable[[], SplitModel]
    input_shape: tuple[int, ...]
    num_classes: int
    cut_layer: CutAssignment = 1
    fraction_train: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 1
    history: Optional[RunHistory] = None
    scenario: Optional[Scenario] = None
    data_plane_factory: Optional[Callable[[Grid, float], DataPlane]] = None
    checkpoint_dir: Optional[Union[str, Path]] = None
    server_device: str = "cpu"
    fail_untrained: bool = True

    def __post_init__(self) -> None:
        """The checks that need no model."""
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        n = self.num_classes
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {n!r}")
        object.__setattr__(self, "num_classes", int(n))
        super().__post_init__()  # the training settings, checked as every client checks them
        try:
            shape = tuple(self.input_shape)
        except TypeError:
            shape = ()
        if not shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape):
            raise ValueError(f"input_shape must be the shape of one sample, positive integers such as (1, 28, 28), "
                             f"got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))

    @classmethod
    def of(cls, settings: Optional[SplitSettings], owner: str, /, **fields) -> SplitSettings:
        """The settings a strategy (``owner``, for the error) is built from: ``settings``, its
        fields as keywords, or both (keywords override)."""
        if settings is None:
            return cls(**fields)
        if not isinstance(settings, cls):
            raise TypeError(f"{owner} takes a SplitSettings or keyword arguments (model_fn=..., input_shape=..., "
                            f"num_classes=...), got a {type(settings).__name__} positionally")
        return dataclasses.replace(settings, **fields) if fields else settings

    def train_settings(self) -> dict:
        """The ``TrainingSettings`` (sent to the clients every round)."""
        return self.training_settings()

    def split_config(self, server_round: int, cut: int) -> ConfigRecord:
        """The ``SplitConfig`` a node training at ``cut`` gets in ``server_round``."""
        return p.SplitConfig(server_round=server_round, cut=cut, **self.train_settings()).to_record()

    def sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        """A round's nodes: wait for ``min_available_nodes`` (Flower's ``sample_nodes``), then
        sample ``fraction`` of them (at least ``min_nodes``) with an RNG seeded from ``seed``
        and the round."""
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        size = min(max(int(len(all_nodes) * fraction), min_nodes), len(all_nodes))
        return sorted(random.Random(self.seed * 100_003 + server_round).sample(sorted(all_nodes), size))

    def build_model(self) -> SplitModel:
        """``model_fn()`` on a fork of torch's generator seeded from ``seed``: the same model
        every time, and no random stream of the caller's (the server's dropout, a client's in
        the same process) moves."""
        with rng.seeded(derived_seed(self.seed, MODEL_SEED_OFFSET)):
            built = self.model_fn()
            if isinstance(built, SplitModel):
                return built
            try:  # a plain module: split as the clients split it, on an example batch of zeros
                dtype = torch.int64 if takes_token_ids(built) else torch.float32  # token ids, or floats
                return split_model_of(built, torch.zeros(2, *self.input_shape, dtype=dtype))
            except GraphSplitError as err:
                raise ValueError(f"model_fn's {type(built).__name__} cannot be split for input_shape "
                                 f"{self.input_shape}: {err}") from err

    def checked_shapes(self, model: SplitModel) -> list[tuple[int, ...]]:
        """Per-block output shapes of one sample of ``input_shape``; its fit to the model and
        the model's output to ``num_classes`` checked: ``(num_classes,)`` logits per sample, or
        ``(*positions, num_classes)`` (a language model's ``(T, vocab)``: labels ``(T,)``)."""
        try:
            shapes = block_output_shapes(model, self.input_shape)
        except Exception as err:  # torch's error for whatever does not fit
            raise ValueError(f"input_shape {self.input_shape} does not fit the model: {_innermost_exception(err)}") from err
        out, n = shapes[-1], self.num_classes
        if not out or out[-1] != n:
            if len(out) == 1:
                raise ValueError(f"num_classes is {n} but the model outputs {out[0]} classes (per-sample output shape {out})")
            raise ValueError(f"num_classes is {n} but the model's per-sample output shape is {out}, not ({n},) or "
                             f"(..., {n}): its last block must output one logit per class (per position)")
        return shapes

    @staticmethod
    def label_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """One sample's label shape from the checked block shapes: ``()``, or the positions of
        sequence logits (``(T,)`` for ``(T, vocab)``)."""
        return tuple(shapes[-1][:-1])


def checked_cut(model: SplitModel, value, what: str) -> int:
    """``value`` as a cut of the model, or ``ValueError`` saying why not (no truncation)."""
    top = model.num_blocks - 1
    names = model.cut_names or []
    if isinstance(value, str) and value in names:  # a graph split's cut, by the module it sits before
        return names.index(value) + 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        named = f", or the names {names}" if names else ""
        raise ValueError(f"{what} {value!r} is not a cut layer: cuts are integers 1..{top}{named} "
                         f"(the model has {model.num_blocks} blocks)")
    if not 1 <= value <= top:
        raise ValueError(f"{what} {value!r} is outside the model: valid cuts are 1..{top} "
                         f"(the model has {model.num_blocks} blocks)")
    return model.check_cut(int(value))


def check_u_shape(scheme: type, model: SplitModel, settings: SplitSettings) -> None:
    """A U-shaped split (``tail_cut > 0``) checked against the scheme, the model and the fixed
    cuts: ``ValueError`` saying what does not fit (a function's cuts are checked each round,
    by ``SplitConfig``)."""
    tail = settings.tail_cut
    if not tail:
        return
    if scheme.u_shape_refusal:
        raise ValueError(f"{scheme.__name__} cannot run a U-shaped split (tail-cut {tail}): {scheme.u_shape_refusal}")
    checked_cut(model, tail, "tail_cut")
    spec = settings.cut_layer
    if not callable(spec):
        for value in spec if isinstance(spec, (list, tuple)) else [spec]:
            if checked_cut(model, value, "cut_layer") >= tail:
                raise ValueError(f"cut_layer {value!r} must lie before tail_cut {tail}: the server runs the blocks between")
    if settings.fraction_evaluate > 0:
        raise ValueError("fraction-evaluate > 0: federated evaluation of a U-shaped split is not supported (the "
                         "server would need the labels, or a second exchange per batch); the ServerApp's centralized "
                         "evaluation on its own test set works")


def assign_cuts(model: SplitModel, spec: CutAssignment, server_round: int, nodes: list[int]) -> dict[int, int]:
    """Cut per node for a round (checked against the model)."""
    if callable(spec):
        chosen = spec(server_round, list(nodes))
        missing = [n for n in nodes if n not in chosen]
        if missing:
            raise ValueError(f"cut_layer function: round {server_round} has no cut for nodes {missing}")
        return {n: checked_cut(model, chosen[n], f"cut_layer function: round {server_round}, node {n}: cut") for n in nodes}
    if isinstance(spec, (list, tuple)):
        return {n: checked_cut(model, spec[i % len(spec)], f"cut_layer[{i % len(spec)}]") for i, n in enumerate(sorted(nodes))}
    return {n: checked_cut(model, spec, "cut_layer") for n in nodes}


def check_cut_assignment(model: SplitModel, spec: CutAssignment) -> None:
    """A fixed cut or list of cuts checked against the model (a function's cuts are checked
    each round, in ``assign_cuts``)."""
    if callable(spec):
        return
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("cut_layer is an empty list: give one cut, or one per node (round-robin)")
        for i, value in enumerate(spec):
            checked_cut(model, value, f"cut_layer[{i}]")
    else:
        checked_cut(model, spec, "cut_layer")
