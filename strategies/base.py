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

import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Optional, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flsplit import protocol as p
from flsplit.codecs import get_codec
from flsplit.aggregation import average_states, block_of
from flsplit.checkpoint import Checkpoint
from flsplit.costmodel import DeviceProfile
from flsplit.dataplane import DataPlane, MessageDataPlane, Reply, Traffic
from flsplit.gate import ReplyGate
from flsplit.history import RunHistory
from flsplit.profile import profile_model
from flsplit.scenario import Scenario
from flsplit.server import ServerPart, ServerWork, StepStats, evaluate_smashed, resolve_device
from flsplit.splitting import SplitModel, block_output_shapes

from flsplit.strategies.accounting import RoundAccounting
from flsplit.strategies.checkpointing import Checkpointing
from flsplit.strategies.exchange import ExchangeHost

__all__ = ["SplitStrategy", "CutAssignment"]

CutAssignment = Union[int, list[int], Callable[[int, list[int]], Mapping[int, int]]]


class SplitStrategy(ExchangeHost, RoundAccounting, Checkpointing, Strategy):
    """Base class: round loop, node sampling, cut assignment, round-end averaging.

    Parameters
    ----------
    model_fn : callable
        Returns a fresh ``SplitModel`` (the same architecture the ClientApps build).
    input_shape : tuple of int
        Shape of one input sample, e.g. ``(1, 8, 8)``; fixes the expected smashed shapes.
    num_classes : int
        Number of classes (labels in replies are checked against it).
    cut_layer : int, list of int or callable
        One cut for all clients; a list assigned round-robin over the sampled nodes (sorted
        by node id); or ``fn(server_round, node_ids) -> {node_id: cut}`` (may change every
        round).
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
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {fraction_evaluate}")
        self.model_fn = model_fn
        self.device = resolve_device(server_device)
        self.model = model_fn()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.cut_layer = cut_layer
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
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_nodes = min_evaluate_nodes
        self.history = history or RunHistory()
        self.data_plane_factory = data_plane_factory or (lambda grid, timeout: MessageDataPlane(grid, timeout))
        self._shapes = block_output_shapes(self.model, self.input_shape)
        self.codec_up, self.codec_down = get_codec(codec_up), get_codec(codec_down)
        self.gate = ReplyGate(self.model.blocks.state_dict(), block_of, self._shapes, self.server_dtype, num_classes,
                              batch_size, steps_per_exchange, self.codec_up)
        self.data_plane: Optional[DataPlane] = None
        self.progress_interval = 10.0  # seconds between progress lines within a round
        self.scenario = scenario
        self.profile = profile_model(self.model, self.input_shape) if scenario is not None else None
        self.model.blocks.to(self.device)  # after the shapes and the profile, measured on the CPU
        self.devices: dict[int, tuple[int, Optional[DeviceProfile]]] = {}  # node -> (partition, own profile)
        self.cuts: dict[int, int] = {}
        self.errors: list[dict] = []
        self.server_steps = 0
        self.server_work = ServerWork()
        self.round_planner = None  # set by flsplit.strategies.adaptive.Adaptive: plans cuts + resources
        self.round_plan = None  # this round's plan (a flsplit.strategies.adaptive.RoundPlan) if planned
        self.server_momentum: dict[str, torch.Tensor] = {}  # by parameter name (carry_momentum)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    scheme = ""  # the scheme's name in STRATEGIES and in the traffic model (flsplit.sim.traffic)
    timing = "parallel"  # how clients' chains combine in the simulated round latency

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
            cuts = {n: int(spec(server_round, list(nodes))[n]) for n in nodes}
        elif isinstance(spec, (list, tuple)):
            cuts = {n: int(spec[i % len(spec)]) for i, n in enumerate(sorted(nodes))}
        else:
            cuts = {n: int(spec) for n in nodes}
        for cut in cuts.values():
            self.model.check_cut(cut)
        return cuts

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
        part = ServerPart(
            model or self.model,
            min(self.cuts.values()),
            s["learning_rate"],
            momentum=s["momentum"],
            weight_decay=s["weight_decay"],
            work=self.server_work,
        )
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
        self.round_plan = None
        if self.round_planner is not None:  # cuts (and resources) from the planner in the loop
            self.round_plan = self.round_planner.plan_round(self, server_round, nodes)
            nodes = list(self.round_plan.nodes)  # a node that could not be identified sits out
            self.cuts = {n: self.model.check_cut(int(self.round_plan.cuts[n])) for n in nodes}
        else:
            self.cuts = self.assign_cuts(server_round, nodes)
        self._configs = {n: self.config_record(server_round, c) for n, c in self.cuts.items()}
        messages = []
        for node_id in nodes:
            content = self.request(node_id)
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
        self._eval_cuts = self.assign_cuts(server_round, nodes)
        messages = []
        for node_id, cut in self._eval_cuts.items():
            content = RecordDict({p.CONFIG: self.config_record(server_round, cut), p.CLIENT_PART: self.client_part_record(cut)})
            messages.append(Message(content, node_id, p.EVALUATE, group_id=str(server_round)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message | Reply]) -> Optional[MetricRecord]:
        """Finish the forward pass of each node's smashed evaluation data; pool the metrics."""
        loss_sum, correct, n = 0.0, 0, 0
        for reply in replies:
            if reply.content is None:
                continue
            node_id = reply.node_id if isinstance(reply, Reply) else reply.metadata.src_node_id
            cut = self._eval_cuts[node_id]
            try:
                batches = self.gate.evaluation(reply.content, cut)
            except p.ProtocolError as err:
                self.reject(node_id, f"evaluation: {err}")
                continue
            ls, c, k = evaluate_smashed(self.model, cut, batches)
            loss_sum, correct, n = loss_sum + ls, correct + c, n + k
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
        for server_round in range(done_rounds + 1, num_rounds + 1):
            t0 = time.perf_counter()
            self.data_plane.traffic = Traffic()
            self.errors, self.server_steps, self.server_work = [], 0, ServerWork()
            self._done, self._total, self._rows, self._last_progress = {}, {}, {}, time.perf_counter()
            messages = list(self.configure_train(server_round, result.arrays, ConfigRecord(), grid))
            requests = {m.metadata.dst_node_id: m.content for m in messages}
            done = sorted(self._train_round(server_round, requests), key=lambda r: r.node_id)  # arrival order must not matter
            self.keep_server_momentum()
            planes = self.data_plane.end_round()  # sessions closed, every node's state committed
            examples = self.round_examples(done)
            arrays, train_metrics = self.aggregate_train(server_round, done)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = train_metrics
            eval_messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
            if eval_messages:
                replies = self.data_plane.exchange(
                    {m.metadata.dst_node_id: m.content for m in eval_messages}, p.EVALUATE, str(server_round)
                )
                if (fed := self.aggregate_evaluate(server_round, replies.values())) is not None:
                    result.evaluate_metrics_clientapp[server_round] = fed
            central = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            entry = self.round_record(
                server_round, t0, self.data_plane.traffic, train_metrics, central,
                result.evaluate_metrics_clientapp.get(server_round),
            )
            entry["examples_per_node"] = {str(n): k for n, k in sorted(examples.items())}
            entry["data_plane"] = {str(n): kind for n, kind in planes.items()}
            if self.scenario is not None:
                entry["sim"] = self.simulate_round(server_round, self.data_plane.traffic, examples)
            if self.round_plan is not None:
                entry["plan"] = self.round_plan.as_record()
                self.round_planner.observe(self, server_round, entry)
            self.history.add_round(entry, num_rounds)
            if self.checkpoint_dir is not None:  # after the round is complete: planner fed, history written
                self.save_checkpoint(server_round)
        return result
