"""Common base of the split-learning strategies: the Flower API and the round loop.

A split strategy is a Flower ``Strategy`` whose ``start()`` runs many exchanges per round.
In Flower's vocabulary a round is:

``configure_train``
    sample nodes (waiting until enough are connected), pick each node's cut and build its
    first request: the client part of the global model plus the round's ``SplitConfig``;
``_train_round`` (per scheme)
    the split exchanges: the scheme's schedule (``flsplit.schedules``) drives the round's
    exchange state (``flsplit.exchange.RoundExchange``) until every node has sent its trained
    client part; the round comes back as a ``RoundRecord``;
``aggregate_train``
    layer-wise averaging of client parts and server part(s), weighted by samples;
``configure_evaluate`` / ``aggregate_evaluate``
    optional federated split evaluation (clients send smashed evaluation data, the server
    finishes the forward pass); ``evaluate_fn`` gives centralized evaluation.

A strategy is built from a ``SplitSettings`` (``strategies/settings.py``), or from its fields
as keywords. Subclasses name their schedule (``schedule``: its class declares the scheme's
timing) and the server-step rule (``flsplit.server``); see ``sl.py``, ``sflv1.py``,
``sflv2.py``, ``psl.py``. The round's pricing and history entry are in ``accounting.py``, what
carries across rounds in ``checkpointing.py``; a planner in the loop wraps the strategy
(``adaptive.py``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable
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
from flsplit.aggregation import average_states, block_of
from flsplit.checkpoint import Checkpoint
from flsplit.codecs import get_codec
from flsplit.sim.scenario import DeviceProfile
from flsplit.dataplane import DataPlane, MessageDataPlane, Reply, innermost_error
from flsplit.exchange import RoundExchange, RoundRecord
from flsplit.gate import ReplyGate
from flsplit.history import RunHistory
from flsplit.profile import profile_model
from flsplit.schedules import PerNode, Schedule
from flsplit.server import ServerPart, StepStats, evaluate_smashed, resolve_device
from flsplit.server_stream import ServerStream, StreamServerPart
from flsplit.splitting import SplitModel

from flsplit.strategies.accounting import RoundAccounting
from flsplit.strategies.checkpointing import Checkpointing
from flsplit.strategies.settings import (SERVER_STREAM_OFFSET, CutAssignment, SplitSettings, assign_cuts,
                                         check_cut_assignment, derived_seed)

__all__ = ["SplitStrategy", "SplitSettings", "CutAssignment", "ServerStream"]


class SplitStrategy(RoundAccounting, Checkpointing, Strategy):
    """Base class: the Flower API and the round loop (sampling, cuts, round-end averaging).

    Built from a ``SplitSettings`` (``PSL(settings)``), from its fields as keywords
    (``PSL(model_fn=..., input_shape=(1, 8, 8), num_classes=10, cut_layer=2)``), or from both
    (keywords override the given settings); ``SplitSettings`` documents every field. A cut,
    ``input_shape`` or ``num_classes`` that does not fit the model is a ``ValueError`` here,
    before anything runs. ``model_fn`` runs on a fork of torch's generator seeded from
    ``seed``; the server part's dropout draws from the strategy's own ``ServerStream``, also
    seeded from ``seed``.

    Example::

        settings = SplitSettings(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=2)
        strategy = PSL(settings, batch_size=16)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(strategy.model.blocks.state_dict()))
    """

    scheme = ""  # the scheme's name in STRATEGIES and in the traffic model (flsplit.sim.traffic)
    schedule: type[Schedule] = PerNode  # the scheme's schedule; its class declares the round latency's timing

    def __init__(self, settings: Optional[SplitSettings] = None, /, **fields) -> None:
        if settings is None:
            settings = SplitSettings(**fields)
        elif not isinstance(settings, SplitSettings):
            raise TypeError(f"{type(self).__name__} takes a SplitSettings or keyword arguments (model_fn=..., "
                            f"input_shape=..., num_classes=...), got a {type(settings).__name__} positionally")
        elif fields:
            settings = dataclasses.replace(settings, **fields)
        self.settings = s = settings
        self.train_settings = s.train_settings()
        self.device = resolve_device(s.server_device)
        self.model = s.build_model()
        self._shapes = s.checked_shapes(self.model)
        check_cut_assignment(self.model, s.cut_layer)
        self.server_stream = ServerStream(derived_seed(s.seed, SERVER_STREAM_OFFSET))
        self.history = s.history or RunHistory()
        self.data_plane_factory: Callable[[Grid, float], DataPlane] = s.data_plane_factory or MessageDataPlane
        self.codec_up, self.codec_down = get_codec(s.codec_up), get_codec(s.codec_down)
        self.gate = ReplyGate(self.model.blocks.state_dict(), block_of, self._shapes, self.server_dtype, s.num_classes,
                              s.batch_size, s.steps_per_exchange, self.codec_up)
        self.data_plane: Optional[DataPlane] = None
        self.progress_interval = 10.0  # seconds between progress lines within a round
        self.scenario = s.scenario
        self.profile = profile_model(self.model, s.input_shape) if s.scenario is not None else None
        self.model.blocks.to(self.device)  # after the shapes and the profile, measured on the CPU
        self.devices: dict[int, tuple[int, Optional[DeviceProfile]]] = {}  # node -> (partition, own profile)
        self.server_momentum: dict[str, torch.Tensor] = {}  # by parameter name (carry_momentum)
        self.round_planner = None  # set by flsplit.strategies.adaptive.Adaptive: plans cuts + resources
        self.round = self.new_round(0)  # the current round's exchange state

    def __getattr__(self, name: str):  # the settings' fields, read as before: strategy.input_shape, .seed, ...
        if name != "settings" and name in SplitSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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

    # ------------------------------------------------------------------ pieces
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├── Scheme: %s, cut layer: %s, blocks: %d, server device: %s", type(self).__name__, self.settings.cut_layer,
            self.model.num_blocks, self.device)
        for key, value in self.train_settings.items():
            log(INFO, "\t├── %s: %s", key.replace("_", "-"), value)
        log(INFO, "\t└── fraction-train: %s, fraction-evaluate: %s", self.settings.fraction_train, self.settings.fraction_evaluate)

    def _sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int) -> list[int]:
        """Wait for enough nodes (Flower's ``sample_nodes``), then sample with a seeded RNG."""
        _, all_nodes = sample_nodes(grid, self.settings.min_available_nodes, 0)
        size = min(max(int(len(all_nodes) * fraction), min_nodes), len(all_nodes))
        return sorted(random.Random(self.settings.seed * 100_003 + server_round).sample(sorted(all_nodes), size))

    def assign_cuts(self, server_round: int, nodes: list[int]) -> dict[int, int]:
        """Cut per node for this round (checked against the model)."""
        return assign_cuts(self.model, self.settings.cut_layer, server_round, nodes)

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
        part = StreamServerPart(
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
        nodes = self._sample(grid, server_round, self.settings.fraction_train, self.settings.min_train_nodes)
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
        if self.settings.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, server_round, self.settings.fraction_evaluate, self.settings.min_evaluate_nodes)
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
            if self.settings.checkpoint_dir is not None:  # after the round is complete: planner fed, history written
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
        if self.settings.fail_untrained:
            raise RuntimeError(message)
