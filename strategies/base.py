"""Common base of the split-learning strategies: the Flower API and the round loop.

A split strategy is a Flower ``Strategy`` whose ``start()`` runs many exchanges per round:
``configure_train`` samples nodes and picks their cuts (or takes a planner's, ``planning.py``);
``_train_round`` (per scheme) runs the split exchanges, its schedule (``flsplit.runtime.schedules``)
driving the round's ``flsplit.runtime.exchange.RoundExchange``; ``aggregate_train`` averages
(``averaging.py``); ``configure_evaluate`` / ``aggregate_evaluate`` evaluate (``evaluation.py``).
Pricing and history entries are in ``accounting.py``, cross-round state in ``checkpointing.py``.

A scheme (``sl.py``, ``psl.py``, ...) names its ``schedule`` and its ``scheme`` (its row in
``flsplit.sim.schemes``: traffic model and timing) and implements ``_train_round``; where it differs from the defaults it overrides:

- ``start_part``, ``aggregate_train``, ``server_contributions``, ``train_stats``: what a node
  starts from, how the round is averaged, what the server saw;
- ``round_outcome``: what the clients did, as the scheme counts it (``RoundOutcome``);
- ``checkpoint_config`` / ``checkpoint_state`` / ``restore_state``: its cross-round state;
- ``run_config_options``: how it reads its own run-config keys (``apps/server_app.py``).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any, Optional, Union

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flsplit.wire import protocol as p
from flsplit.runtime.aggregation import average_states, block_of
from flsplit.runtime.checkpoint import Checkpoint
from flsplit.wire.codecs import get_codec
from flsplit.sim.scenario import DeviceProfile
from flsplit.planes.dataplane import DataPlane, MessageDataPlane, Reply
from flsplit.runtime.exchange import RoundExchange, RoundRecord
from flsplit.wire.gate import ReplyGate
from flsplit.runtime.history import RunHistory
from flsplit.model.profile import profile_model
from flsplit.runtime.schedules import PerNode, Schedule
from flsplit.runtime.server import ServerPart, StepStats, resolve_device
from flsplit.runtime.server_stream import ServerStream, StreamServerPart
from flsplit.model.splitting import SplitModel, exchanged_keys
from flsplit.strategies import accounting, checkpointing
from flsplit.strategies.accounting import RoundOutcome, RoundPricing
from flsplit.strategies.averaging import Contribution, client_contributions, shared_part_contributions
from flsplit.strategies.evaluation import evaluation_requests, pool_evaluation
from flsplit.strategies.planning import RoundPlanning
from flsplit.strategies.settings import (SERVER_STREAM_OFFSET, CutAssignment, SplitSettings, assign_cuts, check_u_shape,
                                         check_cut_assignment, derived_seed)

__all__ = ["SplitStrategy", "SplitSettings", "CutAssignment", "ServerStream", "RoundOutcome"]

EvaluateFn = Callable[[int, ArrayRecord], Optional[MetricRecord]]  # centralized evaluation: (round, arrays) -> metrics


class SplitStrategy(Strategy):
    """Base class: the Flower API and the round loop (sampling, cuts, round-end averaging).

    Built from a ``SplitSettings`` (``PSL(settings)``), from its fields as keywords
    (``PSL(model_fn=..., input_shape=(1, 8, 8), num_classes=10, cut_layer=2)``), or from both
    (``PSL(settings, batch_size=16)``: keywords override); ``SplitSettings`` documents every
    field. A cut, ``input_shape`` or ``num_classes`` that does not fit the model is a
    ``ValueError`` here, before anything runs. The server part's dropout draws from the
    strategy's own ``ServerStream``, seeded from ``seed``.
    """

    scheme = ""  # the scheme's name in STRATEGIES and in the traffic model (flsplit.sim.traffic)
    schedule: type[Schedule] = PerNode  # the scheme's schedule
    # Why the scheme cannot run U-shaped (tail_cut > 0), or "" where it can.
    u_shape_refusal = ""

    def __init__(self, settings: Optional[SplitSettings] = None, /, **fields) -> None:
        self.settings = s = SplitSettings.of(settings, type(self).__name__, **fields)
        self.train_settings = s.train_settings()
        self.device = resolve_device(s.server_device)
        self.model = s.build_model()
        self._shapes = s.checked_shapes(self.model)
        self.server_dtype: torch.dtype = next(self.model.blocks.parameters()).dtype
        check_cut_assignment(self.model, s.cut_layer)
        check_u_shape(type(self), self.model, s)
        self.server_stream = ServerStream(derived_seed(s.seed, SERVER_STREAM_OFFSET))
        self.history = s.history or RunHistory()
        self.data_plane_factory: Callable[[Grid, float], DataPlane] = s.data_plane_factory or MessageDataPlane
        self.codec_up, self.codec_down = get_codec(s.codec_up), get_codec(s.codec_down)
        # What travels of a part: what trains and the buffers (LoRA: the adapters), not frozen weights.
        self.exchanged = frozenset(exchanged_keys(self.model.blocks))
        state = self.model.blocks.state_dict()
        self.gate = ReplyGate({k: v for k, v in state.items() if k in self.exchanged}, block_of, self._shapes, self.server_dtype, s.num_classes,
                              s.batch_size, s.steps_per_exchange, self.codec_up, s.label_shape(self._shapes), s.tail_cut)
        self.data_plane: Optional[DataPlane] = None
        self.progress_interval = 10.0  # seconds between progress lines within a round
        self.profile = profile_model(self.model, s.input_shape) if s.scenario is not None else None
        self.pricing = RoundPricing(self.scheme, self.profile, s.scenario, s.tail_cut) if s.scenario is not None else None
        self.model.blocks.to(self.device)  # after the shapes and the profile, measured on the CPU
        self.devices: dict[int, tuple[int, Optional[DeviceProfile]]] = {}  # node -> (partition, own profile)
        self.server_momentum: dict[str, torch.Tensor] = {}  # by parameter name (carry_momentum)
        self.round = self.new_round(0)  # the current round's exchange state

    def __getattr__(self, name: str):  # the settings' fields, read as before: strategy.input_shape, .seed, ...
        if name != "settings" and name in SplitSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def run_config_options(cls, config: Mapping[str, Any]) -> dict:
        """The scheme's own keywords (or ``SplitSettings`` overrides) from a run config (none here)."""
        return {}

    def new_round(self, server_round: int) -> RoundExchange:
        """A round's exchange state, over the run's data plane."""
        return RoundExchange(server_round, self.data_plane, self.gate, self.codec_down, self.devices, self.scenario,
                             self.progress_interval)

    # The current round's state, under the names users and tests read.
    errors = property(lambda self: self.round.errors, doc="This round's errors (node, error, stage).")
    cuts = property(lambda self: self.round.cuts, doc="This round's cut per node.")
    server_steps = property(lambda self: self.round.server_steps, doc="This round's server steps.")

    def summary(self) -> None:
        """Log the strategy's settings."""
        s = self.settings
        log(INFO, "\t├── Scheme: %s, cut layer: %s, blocks: %d, server device: %s", type(self).__name__, s.cut_layer,
            self.model.num_blocks, self.device)
        for key, value in self.train_settings.items():
            log(INFO, "\t├── %s: %s", key.replace("_", "-"), value)
        log(INFO, "\t└── fraction-train: %s, fraction-evaluate: %s", s.fraction_train, s.fraction_evaluate)

    def client_part_record(self, cut: int) -> ArrayRecord:
        """Global weights of blocks ``[0, cut)`` (and ``[tail_cut, L)`` in a U-shaped split)."""
        tail = self.settings.tail_cut  # a U-shaped split's client part holds its tail too
        return ArrayRecord({k: v for k, v in self.model.blocks.state_dict().items()
                            if k in self.exchanged and (block_of(k) < cut or 0 < tail <= block_of(k))})

    def _client_trains(self, cut: int) -> bool:
        """Whether the blocks before ``cut`` have a parameter to train (a frozen head gets no gradients)."""
        return any(q.requires_grad for name, q in self.model.blocks.named_parameters() if block_of(name) < cut)

    def start_part(self, node_id: int, cut: int) -> ArrayRecord:
        """The client part a node starts the round from (default: the global one)."""
        return self.client_part_record(cut)

    def train_stats(self) -> StepStats:
        """Training loss/accuracy the server saw this round."""
        return self.server.stats

    def round_outcome(self, record: RoundRecord) -> RoundOutcome:
        """What the clients did this round (default: each node with a final reply, its samples)."""
        return RoundOutcome.of_replies(record.done)

    def new_server_part(self, model: Optional[SplitModel] = None) -> ServerPart:
        """A server part over ``model`` (default: the global model) from the shallowest cut;
        with ``carry_momentum`` the global model's part starts from last round's momentum."""
        s = self.train_settings
        part = StreamServerPart(model or self.model, min(self.cuts.values()), s["learning_rate"], momentum=s["momentum"],
                                weight_decay=s["weight_decay"], work=self.round.server_work, optimizer=s["optimizer"],
                                end=s["tail_cut"] or None)
        part.stream = self.server_stream  # dropout masks from the strategy's own stream
        if model is None and s["carry_momentum"]:
            part.load_momentum(self.server_momentum)
        return part

    def checkpoint_config(self) -> dict:
        """The settings a run resumed from this strategy's checkpoint must share (JSON values)."""
        return checkpointing.strategy_config(type(self).__name__, self.model, self.settings)

    def checkpoint_state(self) -> dict:
        """The state that carries into the next round (``checkpointing`` says what)."""
        return checkpointing.strategy_state(self.model, self.server_stream, self.server_momentum, self.devices)

    def restore_state(self, state: dict) -> None:
        """Take back what ``checkpoint_state`` returned."""
        self.server_momentum, self.devices = checkpointing.restore_strategy_state(state, self.model, self.server_stream)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        planning: Optional[RoundPlanning] = None) -> Iterable[Message]:
        """Sample nodes, assign cuts (``planning``'s, if given), and build each node's first request of the round."""
        nodes = self.settings.sample(grid, server_round, self.settings.fraction_train, self.settings.min_train_nodes)
        ex = self.round
        ex.plan = planning.plan_round(ex, nodes) if planning is not None else None  # cuts and resources
        if ex.plan is not None:
            nodes = list(ex.plan.nodes)  # a node that could not be identified sits out
            ex.cuts = {n: self.model.check_cut(int(ex.plan.cuts[n])) for n in nodes}
        else:
            ex.cuts = assign_cuts(self.model, self.settings.cut_layer, server_round, nodes)
        # Sampled: the nodes asked to train, and those that failed before (a planner's device query).
        ex.sampled = sorted(set(nodes) | {e["node"] for e in ex.errors})
        ex.configs = {n: self.settings.split_config(server_round, c) for n, c in ex.cuts.items()}
        ex.frozen = {n for n, c in ex.cuts.items() if not self._client_trains(c)}
        messages = []
        for node_id in nodes:
            content = ex.request(node_id)
            content[p.CLIENT_PART] = self.start_part(node_id, self.cuts[node_id])
            messages.append(Message(content, node_id, p.TRAIN_STEP, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message | Reply]) -> tuple[ArrayRecord, MetricRecord]:
        """Average every block over the client parts and server part(s) that trained it (``averaging.py``)."""
        contributions, examples = client_contributions(replies)
        averaged = average_states(contributions + self.server_contributions())
        if averaged:
            self.model.blocks.load_state_dict(averaged, strict=False)
        return ArrayRecord(self.model.blocks.state_dict()), MetricRecord({"num-examples": examples})

    def server_contributions(self) -> list[Contribution]:
        """The shared server part's blocks, each weighted by the samples that went through it."""
        return shared_part_contributions(self.model, self.server.entry, self.train_stats().per_cut_samples, self.server.end,
                                         self.exchanged)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask sampled nodes for the smashed data of their evaluation sets (``evaluation.py``)."""
        if self.settings.fraction_evaluate == 0.0:
            return []
        nodes = self.settings.sample(grid, server_round, self.settings.fraction_evaluate, self.settings.min_evaluate_nodes)
        self.round.eval_cuts = assign_cuts(self.model, self.settings.cut_layer, server_round, nodes)
        return evaluation_requests(server_round, self.round.eval_cuts, self.settings.split_config, self.client_part_record)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message | Reply]) -> Optional[MetricRecord]:
        """Finish the forward pass of each node's smashed evaluation data; pool the metrics (``evaluation.py``)."""
        return pool_evaluation(replies, self.round, self.gate, self.model)

    @abstractmethod
    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        """Run the round's split exchanges; return the final (``done``) reply of each node."""

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: Optional[ConfigRecord] = None, evaluate_config: Optional[ConfigRecord] = None,
              evaluate_fn: Optional[EvaluateFn] = None, resume_from: Optional[Union[str, Path, Checkpoint]] = None,
              planning: Optional[RoundPlanning] = None) -> Result:
        """Run ``num_rounds`` rounds of split training and return Flower's ``Result``.

        ``initial_arrays`` holds the full model under the blocks' keys; ``timeout`` bounds each
        exchange; ``train_config`` and ``evaluate_config`` are not used (the settings are the
        strategy's). ``resume_from`` continues a run from a checkpoint (``checkpointing.resume``;
        ``Result`` then holds the rounds run here). ``planning`` (``RoundPlanning``, e.g.
        ``Adaptive``) plans each round's cuts and allocation; it is checkpointed with the strategy.
        """
        log(INFO, "Starting %s split strategy (%d rounds)", type(self).__name__, num_rounds)
        self.summary()
        try:
            self.model.blocks.load_state_dict(initial_arrays.to_torch_state_dict())
        except RuntimeError as err:
            raise ValueError(f"initial_arrays do not fit the model: {err}") from err
        done = 0
        if resume_from is not None:
            done = checkpointing.resume(resume_from, num_rounds, self.checkpoint_config(), self.restore_state, planning,
                                        self.history)
        self.data_plane = self.data_plane_factory(grid, timeout)
        try:
            return self._run(grid, num_rounds, evaluate_fn, done, planning)
        finally:
            self.data_plane.close()  # no listener, socket or thread outlives the run

    def _run(self, grid: Grid, num_rounds: int, evaluate_fn: Optional[EvaluateFn], done_rounds: int,
             planning: Optional[RoundPlanning]) -> Result:
        result = Result()
        initial = evaluate_fn is not None and not done_rounds  # round 0 is the initial model: not a resumed run's
        if initial and (res := evaluate_fn(0, ArrayRecord(self.model.blocks.state_dict()))) is not None:
            result.evaluate_metrics_serverapp[0] = res
        trained_rounds = 0
        for server_round in range(done_rounds + 1, num_rounds + 1):
            t0 = time.perf_counter()
            record = self.train_round(server_round, grid, planning)
            outcome = self.round_outcome(record)
            trained_rounds += bool(outcome.finished)
            arrays, train_metrics = self.aggregate_train(server_round, record.done)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = train_metrics
            fed, eval_asked = self.evaluate_round(server_round, arrays, grid)
            if fed is not None:
                result.evaluate_metrics_clientapp[server_round] = fed
            central = evaluate_fn(server_round, arrays) if evaluate_fn else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
            sim = self.pricing.simulate(record, outcome, self.devices) if self.pricing is not None else None
            entry = accounting.round_entry(
                record, outcome, self.train_stats(), strategy=type(self).__name__, wall_seconds=time.perf_counter() - t0,
                train_metrics=train_metrics, central=central, federated=fed, eval_asked=eval_asked,
                eval_finished=self.round.eval_finished, sim=sim)
            if record.plan is not None:
                planning.observe_round(record.plan, entry)
            self.history.add_round(entry, num_rounds)
            if self.settings.checkpoint_dir is not None:  # after the round is complete: planner fed, history written
                checkpointing.save(self.settings.checkpoint_dir, server_round, self.checkpoint_config(),
                                   self.checkpoint_state(), planning, self.history)
        rounds_run = num_rounds - done_rounds
        if rounds_run > 0 and not trained_rounds:
            accounting.untrained(self.history, rounds_run, self.settings.fail_untrained)
        return result

    def train_round(self, server_round: int, grid: Grid, planning: Optional[RoundPlanning] = None) -> RoundRecord:
        """One round's training exchanges, from sampling to the last reply, as a record."""
        self.round = self.new_round(server_round)
        messages = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid, planning))
        done = self._train_round(server_round, {m.metadata.dst_node_id: m.content for m in messages})
        server = getattr(self, "server", None)  # carry_momentum: keep the shared server part's momentum
        if self.train_settings["carry_momentum"] and isinstance(server, ServerPart) and server.model is self.model:
            self.server_momentum = server.momentum_state()
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
