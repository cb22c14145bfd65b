"""Common base of the split-learning strategies.

A split strategy is a Flower ``Strategy`` whose ``start()`` runs many exchanges per round.
In Flower's vocabulary a round is:

``configure_train``
    sample nodes (waiting until enough are connected), pick each node's cut and build its
    first request: the client part of the global model plus the round's ``SplitConfig``;
``_train_round`` (per scheme)
    the split exchanges, driven through the ``DataPlane`` until every node has sent its
    trained client part;
``aggregate_train``
    layer-wise averaging of client parts and server part(s), weighted by samples;
``configure_evaluate`` / ``aggregate_evaluate``
    optional federated split evaluation (clients send smashed evaluation data, the server
    finishes the forward pass); ``evaluate_fn`` gives centralized evaluation.

Subclasses choose the schedule (``flsplit.schedules``) and the server-step rule
(``flsplit.server``); see ``sl.py``, ``sflv1.py``, ``sflv2.py``, ``psl.py``. The per-node duties
of the schedule's host are in ``exchange.py``, the round's pricing and history record in
``accounting.py``; a planner in the loop wraps the strategy (``adaptive.py``).
"""

from __future__ import annotations

import numbers
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from logging import ERROR, INFO
from pathlib import Path
from typing import Optional, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flsplit import protocol as p
from flsplit import rng
from flsplit.codecs import get_codec
from flsplit.aggregation import average_states, block_of
from flsplit.checkpoint import Checkpoint
from flsplit.costmodel import DeviceProfile
from flsplit.dataplane import DataPlane, MessageDataPlane, Reply, innermost_error
from flsplit.exchange import RoundExchange, RoundRecord
from flsplit.gate import ReplyGate
from flsplit.history import RunHistory
from flsplit.profile import profile_model
from flsplit.scenario import Scenario
from flsplit.schedules import PerNode, Schedule
from flsplit.server import ServerPart, ServerWork, StepStats, evaluate_smashed, resolve_device
from flsplit.graph_split import GraphSplitError
from flsplit.splitting import SplitModel, block_output_shapes, split_model_of

from flsplit.strategies.accounting import RoundAccounting
from flsplit.strategies.checkpointing import Checkpointing

__all__ = ["SplitStrategy", "CutAssignment", "ServerStream"]

CutAssignment = Union[int, list[int], Callable[[int, list[int]], Mapping[int, int]]]

# Fixed offsets from the strategy's seed: the generator model_fn runs under, and the one the
# server part's forward passes draw from (dropout masks). Any fixed values would do.
MODEL_SEED_OFFSET = 0x6D6F64656C  # "model"
SERVER_STREAM_OFFSET = 0x64726F70  # "drop"


def _derived_seed(seed: int, offset: int) -> int:
    return (int(seed) + offset) % 2**63


def _innermost_exception(err: BaseException) -> str:
    """The message of the deepest exception of ``err``'s chain, on one line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    return " ".join(str(err).split()) or type(err).__name__


class ServerStream:
    """The random stream the server part's forward passes draw from: its dropout masks.

    Seeded from the strategy's seed, and swapped into torch's generator (under
    ``flsplit.rng``'s lock) for each server forward only, so the masks depend on the seed and
    on what the server has drawn before, not on what else the process draws (a ``model_fn``
    call, a client in the same process, the caller's own ``torch.rand``). On a CUDA server
    part the device's generator gets the same treatment.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.cpu = torch.Generator().manual_seed(self.seed).get_state()
        self.cuda: dict[int, torch.Tensor] = {}

    @contextmanager
    def drawing(self, device: torch.device) -> Iterator[None]:
        """Draws inside come from this stream; torch's own streams resume afterwards untouched."""
        cuda = []
        if device.type == "cuda":
            cuda = [device.index if device.index is not None else torch.cuda.current_device()]
        with rng.shared(), torch.random.fork_rng(devices=cuda):
            torch.default_generator.set_state(self.cpu)
            for index in cuda:
                if index in self.cuda:
                    torch.cuda.set_rng_state(self.cuda[index], index)
                else:
                    torch.cuda.default_generators[index].manual_seed(self.seed)
            yield
            self.cpu = torch.default_generator.get_state()
            for index in cuda:
                self.cuda[index] = torch.cuda.get_rng_state(index)


class _StreamServerPart(ServerPart):
    """A ``ServerPart`` whose forward passes draw from its strategy's ``ServerStream``."""

    stream: ServerStream

    def _forward(self, cut: int, x: torch.Tensor) -> torch.Tensor:
        with self.stream.drawing(x.device):
            return super()._forward(cut, x)


class SplitStrategy(RoundAccounting, Checkpointing, Strategy):
    """Base class: round loop, node sampling, cut assignment, round-end averaging.

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
        also the names in ``model.cut_names``); a fixed cut or
        list is checked here, a function's cuts every round.
    batch_size, local_epochs, max_steps, steps_per_exchange, learning_rate, momentum,
    weight_decay, carry_momentum, seed, shuffle :
        Training settings sent to the clients (``SplitConfig``); the server part uses the
        same SGD settings. With ``carry_momentum`` the shared server part (every scheme but
        SFL-V1, whose per-node copies are averaged) and each client keep their SGD momentum
        from round to round instead of starting each round with a fresh optimizer.
    codec_up, codec_down : str
        Wire codecs for smashed data and gradients (``flsplit.codecs``): ``native`` (the
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
        Wireless edge scenario (``flsplit.scenario.load_scenario``); if given, every round's
        simulated latency and energy (from the bytes actually sent and the measured profile)
        go into the history under ``sim``.
    data_plane_factory : callable, optional
        ``fn(grid, timeout) -> DataPlane``; defaults to ``MessageDataPlane``.
    server_device : str
        Where the server part, its optimizer and the averaging run: ``"cpu"`` (default),
        ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present); clients are not affected.
    checkpoint_dir : str or Path, optional
        Save a checkpoint there after every round (``flsplit.checkpoint``); ``start(...,
        resume_from=...)`` continues from one.
    fail_untrained : bool
        A run in which no sampled node finished any round (every node dropped or sat out in
        every round) always logs an error and records ``error`` in the history; with
        ``fail_untrained`` (the default) ``start`` then raises ``RuntimeError``, so that Flower
        marks the run failed instead of completed.

    ``model_fn`` runs on a fork of torch's generator seeded from ``seed``, so building the
    strategy moves no random stream of the caller's; the server part's dropout draws from the
    strategy's own ``ServerStream``, also seeded from ``seed``. A cut, ``input_shape`` or
    ``num_classes`` that does not fit the model is a ``ValueError`` here, before anything runs.
    """

    def __init__(
        self,
        model_fn: Callable[[], SplitModel],
        input_shape: tuple[int, ...],
        num_classes: int,
        cut_layer: CutAssignment = 1,
        batch_size: int = 32,
        local_epochs: int = 1,
        max_steps: int = 0,
        steps_per_exchange: int = 1,
        learning_rate: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        carry_momentum: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        codec_up: str = "native",
        codec_down: str = "native",
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 1,
        history: Optional[RunHistory] = None,
        scenario: Optional[Scenario] = None,
        data_plane_factory: Optional[Callable[[Grid, float], DataPlane]] = None,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        server_device: str = "cpu",
        fail_untrained: bool = True,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {fraction_evaluate}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.train_settings = dict(
            batch_size=batch_size,
            local_epochs=local_epochs,
            max_steps=max_steps,
            steps_per_exchange=steps_per_exchange,
            learning_rate=learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            carry_momentum=carry_momentum,
            seed=seed,
            shuffle=shuffle,
            codec_up=codec_up,
            codec_down=codec_down,
        )
        p.SplitConfig(server_round=1, cut=1, **self.train_settings)  # fail early on bad settings
        self.seed = seed
        self.model_fn = model_fn
        self.device = resolve_device(server_device)
        self.input_shape = self._checked_input_shape(input_shape)
        self.model = self.build_model()
        self.num_classes = int(num_classes)
        self._shapes = self._checked_shapes()
        self.cut_layer = cut_layer
        self._check_cut_assignment(cut_layer)
        self.server_stream = ServerStream(_derived_seed(seed, SERVER_STREAM_OFFSET))
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.history = history or RunHistory()
        self.data_plane_factory = data_plane_factory or (lambda grid, timeout: MessageDataPlane(grid, timeout))
        self.codec_up, self.codec_down = get_codec(codec_up), get_codec(codec_down)
        self.gate = ReplyGate(self.model.blocks.state_dict(), block_of, self._shapes, self.server_dtype, self.num_classes,
                              batch_size, steps_per_exchange, self.codec_up)
        self.data_plane: Optional[DataPlane] = None
        self.progress_interval = 10.0  # seconds between progress lines within a round
        self.scenario = scenario
        self.profile = profile_model(self.model, self.input_shape) if scenario is not None else None
        self.model.blocks.to(self.device)  # after the shapes and the profile, measured on the CPU
        self.devices: dict[int, tuple[int, Optional[DeviceProfile]]] = {}  # node -> (partition, own profile)
        self.round_planner = None  # set by flsplit.strategies.adaptive.Adaptive: plans cuts + resources
        self.round = self.new_round(0)  # the current round's exchange state (flsplit.exchange)
        self.server_momentum: dict[str, torch.Tensor] = {}  # by parameter name (carry_momentum)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.fail_untrained = bool(fail_untrained)

    scheme = ""  # the scheme's name in STRATEGIES and in the traffic model (flsplit.sim.traffic)
    schedule: type[Schedule] = PerNode  # the scheme's schedule; its timing is the round latency's rule

    def new_round(self, server_round: int) -> RoundExchange:
        """A round's exchange state, over the run's data plane."""
        return RoundExchange(server_round, self.data_plane, self.gate, self.codec_down, self.devices, self.scenario,
                             self.progress_interval)

    # The current round's state, under the names users, tests and the planner read.
    errors = property(lambda self: self.round.errors, doc="This round's errors (node, error, stage).")
    cuts = property(lambda self: self.round.cuts, doc="This round's cut per node.")
    server_steps = property(lambda self: self.round.server_steps, doc="This round's server steps.")
    server_work = property(lambda self: self.round.server_work, doc="This round's server rows (ServerWork).")
    round_plan = property(lambda self: self.round.plan, doc="This round's plan (flsplit.planners.online.RoundPlan) or None.")
    reject = property(lambda self: self.round.reject, doc="Record a node's failure in this round (RoundExchange.reject).")

    # ------------------------------------------------------------------ checks at construction
    def build_model(self) -> SplitModel:
        """``model_fn()`` on a fork of torch's generator seeded from ``seed``: the same model
        every time, and no random stream of the caller's (the server's dropout, a client's in
        the same process) moves."""
        with rng.seeded(_derived_seed(self.seed, MODEL_SEED_OFFSET)):
            built = self.model_fn()
            if isinstance(built, SplitModel):
                return built
            try:  # a plain module: split as the clients split it, on an example batch of zeros
                return split_model_of(built, torch.zeros(2, *self.input_shape))
            except GraphSplitError as err:
                raise ValueError(f"model_fn's {type(built).__name__} cannot be split for input_shape "
                                 f"{self.input_shape}: {err}") from err

    def _checked_input_shape(self, input_shape) -> tuple[int, ...]:
        try:
            shape = tuple(input_shape)
        except TypeError:
            shape = ()
        if not shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape):
            raise ValueError(f"input_shape must be the shape of one sample, positive integers such as (1, 28, 28), "
                             f"got {input_shape!r}")
        return tuple(int(d) for d in shape)

    def _checked_shapes(self) -> list[tuple[int, ...]]:
        """Per-block output shapes of one sample of ``input_shape``; its fit to the model and
        the model's output to ``num_classes`` checked."""
        try:
            shapes = block_output_shapes(self.model, self.input_shape)
        except Exception as err:  # torch's error for whatever does not fit
            raise ValueError(f"input_shape {self.input_shape} does not fit the model: {_innermost_exception(err)}") from err
        out, n = shapes[-1], self.num_classes
        if out != (n,):
            if len(out) == 1:
                raise ValueError(f"num_classes is {n} but the model outputs {out[0]} classes (per-sample output shape {out})")
            raise ValueError(f"num_classes is {n} but the model's per-sample output shape is {out}, not ({n},): its last "
                             "block must output one logit per class")
        return shapes

    def _cut(self, value, what: str) -> int:
        """``value`` as a cut of the model, or ``ValueError`` saying why not (no truncation)."""
        top = self.model.num_blocks - 1
        names = self.model.cut_names or []
        if isinstance(value, str) and value in names:  # a graph split's cut, by the module it sits before
            return names.index(value) + 1
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            named = f", or the names {names}" if names else ""
            raise ValueError(f"{what} {value!r} is not a cut layer: cuts are integers 1..{top}{named} "
                             f"(the model has {self.model.num_blocks} blocks)")
        if not 1 <= value <= top:
            raise ValueError(f"{what} {value!r} is outside the model: valid cuts are 1..{top} "
                             f"(the model has {self.model.num_blocks} blocks)")
        return self.model.check_cut(int(value))

    def _check_cut_assignment(self, spec: CutAssignment) -> None:
        """A fixed cut or list of cuts checked against the model (a function's cuts are
        checked each round, in ``assign_cuts``)."""
        if callable(spec):
            return
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("cut_layer is an empty list: give one cut, or one per node (round-robin)")
            for i, value in enumerate(spec):
                self._cut(value, f"cut_layer[{i}]")
        else:
            self._cut(spec, "cut_layer")

    # ------------------------------------------------------------------ pieces
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├── Scheme: %s, cut layer: %s, blocks: %d, server device: %s", type(self).__name__, self.cut_layer,
            self.model.num_blocks, self.device)
        for key, value in self.train_settings.items():
            log(INFO, "\t├── %s: %s", key.replace("_", "-"), value)
        log(INFO, "\t└── fraction-train: %s, fraction-evaluate: %s", self.fraction_train, self.fraction_evaluate)

    def _sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        """Wait for enough nodes (Flower's ``sample_nodes``), then sample with a seeded RNG."""
        _, all_nodes = sample_nodes(grid, self.min_available_nodes, 0)
        size = min(max(int(len(all_nodes) * fraction), min_nodes), len(all_nodes))
        return sorted(random.Random(self.seed * 100_003 + server_round).sample(sorted(all_nodes), size))

    def assign_cuts(self, server_round: int, nodes: list[int]) -> dict[int, int]:
        """Cut per node for this round (checked against the model)."""
        spec = self.cut_layer
        if callable(spec):
            chosen = spec(server_round, list(nodes))
            missing = [n for n in nodes if n not in chosen]
            if missing:
                raise ValueError(f"cut_layer function: round {server_round} has no cut for nodes {missing}")
            return {n: self._cut(chosen[n], f"cut_layer function: round {server_round}, node {n}: cut") for n in nodes}
        if isinstance(spec, (list, tuple)):
            return {n: self._cut(spec[i % len(spec)], f"cut_layer[{i % len(spec)}]") for i, n in enumerate(sorted(nodes))}
        return {n: self._cut(spec, "cut_layer") for n in nodes}

    def config_record(self, server_round: int, cut: int) -> ConfigRecord:
        """The ``SplitConfig`` a node gets this round."""
        return p.SplitConfig(server_round=server_round, cut=cut, **self.train_settings).to_record()

    def client_part_record(self, cut: int) -> ArrayRecord:
        """Global weights of blocks ``[0, cut)``."""
        return ArrayRecord({k: v for k, v in self.model.blocks.state_dict().items() if block_of(k) < cut})

    def start_part(self, node_id: int, cut: int) -> ArrayRecord:
        """The client part a node starts the round from (default: the global one)."""
        return self.client_part_record(cut)

    def train_stats(self) -> StepStats:
        """Training loss/accuracy the server saw this round."""
        return self.server.stats

    @property
    def server_dtype(self) -> torch.dtype:
        return next(self.model.blocks.parameters()).dtype

    def new_server_part(self, model: Optional[SplitModel] = None) -> ServerPart:
        """A server part over ``model`` (default: the global model) from the shallowest cut;
        with ``carry_momentum`` the global model's part starts from last round's momentum."""
        s = self.train_settings
        part = _StreamServerPart(
            model or self.model,
            min(self.cuts.values()),
            s["learning_rate"],
            momentum=s["momentum"],
            weight_decay=s["weight_decay"],
            work=self.server_work,
        )
        part.stream = self.server_stream  # dropout masks from the strategy's own stream
        if model is None and s["carry_momentum"]:
            part.load_momentum(self.server_momentum)
        return part

    def keep_server_momentum(self) -> None:
        """After a round: keep the shared server part's momentum for the next (``carry_momentum``)."""
        server = getattr(self, "server", None)
        if self.train_settings["carry_momentum"] and isinstance(server, ServerPart) and server.model is self.model:
            self.server_momentum = server.momentum_state()


    # ------------------------------------------------------------------ Flower Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, assign cuts, and build each node's first request of the round."""
        nodes = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        ex = self.round
        ex.plan = None
        if self.round_planner is not None:  # cuts (and resources) from the planner in the loop
            ex.plan = self.round_planner.plan_round(self, server_round, nodes)
            nodes = list(ex.plan.nodes)  # a node that could not be identified sits out
            ex.cuts = {n: self.model.check_cut(int(ex.plan.cuts[n])) for n in nodes}
        else:
            ex.cuts = self.assign_cuts(server_round, nodes)
        # Sampled: the nodes asked to train, and those that failed before (a planner's device query).
        ex.sampled = sorted(set(nodes) | {e["node"] for e in ex.errors})
        ex.configs = {n: self.config_record(server_round, c) for n, c in ex.cuts.items()}
        messages = []
        for node_id in nodes:
            content = ex.request(node_id)
            content[p.CLIENT_PART] = self.start_part(node_id, self.cuts[node_id])
            messages.append(Message(content, node_id, p.TRAIN_STEP, group_id=str(server_round)))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message | Reply]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Average every block over the client parts and server part(s) that trained it."""
        contributions = []
        examples = 0
        for reply in replies:
            content = reply.content
            part = content.array_records[p.CLIENT_PART].to_torch_state_dict()
            n = int(content.metric_records[p.METRICS]["num-examples"])
            contributions.append((part, n))
            examples += n
        contributions += self.server_contributions()
        averaged = average_states(contributions)
        if averaged:
            self.model.blocks.load_state_dict(averaged, strict=False)
        return ArrayRecord(self.model.blocks.state_dict()), MetricRecord({"num-examples": examples})

    def server_contributions(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The shared server part's blocks, each weighted by the samples that went through it."""
        per_cut = self.train_stats().per_cut_samples
        full = self.model.blocks.state_dict()
        out = []
        for block in range(self.server.entry, self.model.num_blocks):
            weight = sum(n for cut, n in per_cut.items() if cut <= block)
            state = {k: v for k, v in full.items() if block_of(k) == block}
            if state:
                out.append((state, weight))
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the smashed data of their evaluation sets."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes)
        self.round.eval_cuts = self.assign_cuts(server_round, nodes)
        messages = []
        for node_id, cut in self.round.eval_cuts.items():
            content = RecordDict({p.CONFIG: self.config_record(server_round, cut), p.CLIENT_PART: self.client_part_record(cut)})
            messages.append(Message(content, node_id, p.EVALUATE, group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message | Reply]) -> Optional[MetricRecord]:
        """Finish the forward pass of each node's smashed evaluation data; pool the metrics.

        A failed reply (an error reply: the node's ``split_eval`` handler raised, or no reply
        in time) and a refused one are recorded in the round's ``errors`` with the reason."""
        loss_sum, correct, n = 0.0, 0, 0
        self.round.eval_finished = 0
        for reply in replies:
            if isinstance(reply, Reply):
                node_id, error, content = reply.node_id, reply.error, reply.content
            else:  # a Flower Message (called through Flower's Strategy API)
                node_id = reply.metadata.src_node_id
                error = innermost_error(reply.error.reason or f"error code {reply.error.code}") if reply.has_error() else None
                content = reply.content if reply.has_content() else None
            if error is not None or content is None:
                self.reject(node_id, f"evaluation failed: {error or 'the reply has no content'}")
                continue
            cut = self.round.eval_cuts[node_id]
            try:
                batches = self.gate.evaluation(content, cut)
            except p.ProtocolError as err:
                self.reject(node_id, f"evaluation: {err}")
                continue
            ls, c, k = evaluate_smashed(self.model, cut, batches)
            loss_sum, correct, n = loss_sum + ls, correct + c, n + k
            self.round.eval_finished += 1
        if n == 0:
            return None
        return MetricRecord({"eval-loss": loss_sum / n, "eval-accuracy": correct / n, "num-examples": n})

    # ------------------------------------------------------------------ drivers
    @abstractmethod
    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        """Run the round's split exchanges; return the final (``done``) reply of each node."""

    # ------------------------------------------------------------------ the run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: Optional[ConfigRecord] = None,
        evaluate_config: Optional[ConfigRecord] = None,
        evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]] = None,
        resume_from: Optional[Union[str, Path, Checkpoint]] = None,
    ) -> Result:
        """Run ``num_rounds`` rounds of split training and return Flower's ``Result``.

        ``initial_arrays`` holds the full model under the blocks' keys
        (``ArrayRecord(split_model.blocks.state_dict())``). ``timeout`` bounds each exchange.
        ``train_config`` and ``evaluate_config`` are accepted for signature compatibility and
        not used: the split settings are the strategy's constructor arguments.

        ``resume_from`` (a run directory with a checkpoint, or a ``Checkpoint``) continues a
        run: the checkpoint's model and state replace ``initial_arrays`` (which must still fit
        the model), rounds ``r + 1 .. num_rounds`` run after its round ``r``, the history goes
        on from the saved one, and ``Result`` holds the rounds run here (no round-0
        evaluation). A corrupt or mismatched checkpoint is refused before anything runs.
        """
        log(INFO, "Starting %s split strategy (%d rounds)", type(self).__name__, num_rounds)
        self.summary()
        try:
            self.model.blocks.load_state_dict(initial_arrays.to_torch_state_dict())
        except RuntimeError as err:
            raise ValueError(f"initial_arrays do not fit the model: {err}") from err
        done = self.resume(resume_from, num_rounds) if resume_from is not None else 0
        self.data_plane = self.data_plane_factory(grid, timeout)
        try:
            return self._run(grid, num_rounds, evaluate_fn, done)
        finally:
            self.data_plane.close()  # no listener, socket or thread outlives the run

    def _run(self, grid: Grid, num_rounds: int,
             evaluate_fn: Optional[Callable[[int, ArrayRecord], Optional[MetricRecord]]], done_rounds: int = 0) -> Result:
        result = Result()
        initial = evaluate_fn is not None and not done_rounds  # round 0 is the initial model: not a resumed run's
        if initial and (res := evaluate_fn(0, ArrayRecord(self.model.blocks.state_dict()))) is not None:
            result.evaluate_metrics_serverapp[0] = res
        trained_rounds = 0
        for server_round in range(done_rounds + 1, num_rounds + 1):
            t0 = time.perf_counter()
            record = self.train_round(server_round, grid)
            trained_rounds += bool(self.finished_nodes(record.done))
            arrays, train_metrics = self.aggregate_train(server_round, record.done)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = train_metrics
            fed, eval_asked = self.evaluate_round(server_round, arrays, grid)
            if fed is not None:
                result.evaluate_metrics_clientapp[server_round] = fed
            central = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            entry = self.round_entry(record, t0, train_metrics, central, fed, eval_asked)
            if record.plan is not None:
                entry["plan"] = record.plan.as_record()
                self.round_planner.observe(self, server_round, entry)
            self.history.add_round(entry, num_rounds)
            if self.checkpoint_dir is not None:  # after the round is complete: planner fed, history written
                self.save_checkpoint(server_round)
        rounds_run = num_rounds - done_rounds
        if rounds_run > 0 and not trained_rounds:
            self.untrained(rounds_run)
        return result

    def train_round(self, server_round: int, grid: Grid) -> RoundRecord:
        """One round's training exchanges, from sampling to the last reply, as a record."""
        self.round = self.new_round(server_round)
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        done = self._train_round(server_round, {m.metadata.dst_node_id: m.content for m in messages})
        self.keep_server_momentum()
        return self.round.record(done)  # sessions closed, every node's state committed

    def evaluate_round(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> tuple[Optional[MetricRecord], int]:
        """Federated split evaluation after a round: the pooled metrics (or None) and the nodes asked."""
        self.round.stage = "evaluate"
        messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        if not messages:
            return None, 0
        replies = self.data_plane.exchange({m.metadata.dst_node_id: m.content for m in messages}, p.EVALUATE,
                                           str(server_round))
        return self.aggregate_evaluate(server_round, replies.values()), len(messages)

    def round_status(self, record: RoundRecord, eval_asked: int, federated: Optional[MetricRecord]) -> dict:
        """The round's node counts and ``status`` for its history entry: ``error`` when no
        sampled node finished the round or every evaluation reply failed, ``warning`` when
        some node was dropped (or sat out) or some evaluation failed, else ``ok``."""
        finished = self.finished_nodes(record.done)
        sampled = set(record.sampled) | finished
        dropped = sorted(sampled - finished)
        record: dict = {"nodes_sampled": len(sampled), "nodes_finished": len(finished), "nodes_dropped": dropped}
        eval_failed = 0
        if eval_asked:
            finished_eval = self.round.eval_finished
            eval_failed = eval_asked - finished_eval
            record.update(eval_nodes_sampled=eval_asked, eval_nodes_finished=finished_eval)
        if (sampled and not finished) or (eval_failed and federated is None):
            record["status"] = "error"
        elif dropped or eval_failed:
            record["status"] = "warning"
        else:
            record["status"] = "ok"
        return record

    def untrained(self, rounds: int) -> None:
        """A run in which no node finished any round: logged as an error and recorded in the
        history (saved); with ``fail_untrained``, ``RuntimeError``, so that Flower marks the
        run failed instead of completed."""
        last = self.history.rounds[-1]["errors"] if self.history.rounds else []
        reasons = "; ".join(f"node {e['node']}: {e['error']}" for e in last[:3]) or "none recorded"
        if len(last) > 3:
            reasons += f" (and {len(last) - 3} more in the history)"
        message = f"no node finished a round in {rounds} round{'s' if rounds != 1 else ''}; last errors: {reasons}"
        self.history.data["error"] = message
        self.history.save()
        log(ERROR, "[flsplit] %s", message)
        if self.fail_untrained:
            raise RuntimeError(message)
