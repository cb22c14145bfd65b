"""The round as a value: one round's exchange state, driven by a schedule, returned as a record.

A ``RoundExchange`` is created by the strategy for each round. It holds everything that lives
for that round only: the cuts and configs of the sampled nodes, the plan (if a planner made
one), the replies admitted (rows per node), the errors, the server's steps and work, and
progress. A schedule (``flsplit.runtime.schedules``) drives it: it sends ``request``s over its
``data_plane``, passes each reply through ``admit`` (the reply gate, ``flsplit.wire.gate``), and
counts steps. When the round's exchanges are over, ``record`` returns what happened as a
``RoundRecord``. The data plane owns the traffic meter (``DataPlane.traffic``, restarted by
``begin_round``); the record keeps the round's meter.

Nothing here imports the strategies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log

from flsplit.wire import protocol as p
from flsplit.wire.codecs import Codec
from flsplit.planes.dataplane import DataPlane, Reply, Traffic, innermost_error
from flsplit.wire.gate import ReplyGate, record_of
from flsplit.sim.scenario_files import Scenario, device_from_node_config
from flsplit.runtime.server import ServerWork

__all__ = ["Admitted", "RoundExchange", "RoundRecord"]


@dataclass
class Admitted:
    """A train reply the gate let through: the round's end, or smashed batches to train on."""

    final: bool
    batches: list[p.SmashedBatch] = field(default_factory=list)


@dataclass
class RoundRecord:
    """What one round's exchanges produced (``RoundExchange.record``)."""

    server_round: int
    cuts: dict[int, int]
    sampled: list[int]  # nodes asked to train, and those that failed before (a planner's device query)
    done: list[Reply]  # each finished node's final reply, by node id
    errors: list[dict]
    rows: dict[int, int]  # smashed rows admitted per node
    server_steps: int
    server_work: ServerWork
    traffic: Traffic
    planes: dict[int, str]  # which data plane each node used
    plan: Optional[Any] = None  # the planner's RoundPlan, if the round was planned


class RoundExchange:
    """One round's exchange state; the schedule's host.

    Parameters
    ----------
    server_round : int
    data_plane : DataPlane or None
        The run's plane (``None`` outside ``start``: no exchange can run).
    gate : ReplyGate
    codec_down : Codec
        Gradients' wire codec (requests, broadcast rows).
    devices : dict
        The strategy's ``node -> (partition, own profile)`` (kept across rounds: updated in place).
    scenario : Scenario, optional
        Needed to read a node's device record.
    progress_interval : float
        Seconds between progress lines.
    """

    def __init__(self, server_round: int, data_plane: Optional[DataPlane], gate: ReplyGate, codec_down: Codec,
                 devices: dict, scenario: Optional[Scenario] = None, progress_interval: float = 10.0) -> None:
        self.server_round = server_round
        self.data_plane = data_plane
        self.gate = gate
        self.codec_down = codec_down
        self.devices = devices
        self.scenario = scenario
        self.progress_interval = progress_interval
        self.cuts: dict[int, int] = {}
        self.configs: dict[int, ConfigRecord] = {}
        self.frozen: set[int] = set()  # nodes whose client part trains nothing: no gradient is sent them
        self.plan: Optional[Any] = None
        self.sampled: list[int] = []
        self.stage = "train"  # which part of the round errors belong to (train, evaluate)
        self.errors: list[dict] = []
        self.rows: dict[int, int] = {}
        self.server_steps = 0
        self.server_work = ServerWork()
        self.eval_cuts: dict[int, int] = {}  # the evaluation's cut per node asked
        self.eval_finished = 0  # evaluation replies pooled
        self._done: dict[int, int] = {}
        self._total: dict[int, int] = {}
        self._last_progress = time.perf_counter()
        if data_plane is not None:
            data_plane.begin_round()

    # ------------------------------------------------------------------ what a schedule calls
    def request(self, node_id: int, grads: Optional[list[torch.Tensor]] = None, broadcast: Optional[ArrayRecord] = None,
                broadcast_config: Optional[ConfigRecord] = None) -> RecordDict:
        """A step request: the node's config, the gradients of its pending batches, and the
        broadcast rows (already encoded, shared by every receiver) if the scheme has them."""
        content = RecordDict({p.CONFIG: self.configs[node_id]})
        if node_id in self.frozen:  # its head trains nothing: no gradient rows, unicast or broadcast
            return content
        if grads:
            content[p.GRAD] = p.encode_grads(grads, self.codec_down)
        if broadcast is not None:
            content[p.BCAST] = broadcast
            content[p.BCAST_CONFIG] = broadcast_config
        return content

    def acts_request(self, node_id: int, acts: list[torch.Tensor]) -> RecordDict:
        """A U-shaped step's second request: the server part's output for the node's tail."""
        return RecordDict({p.CONFIG: self.configs[node_id], p.ACTS: p.encode_tensors(acts, "a", self.codec_down)})

    def admit_tail(self, node_id: int, reply: Optional[Reply],
                   acts: list[torch.Tensor]) -> Optional[tuple[list[torch.Tensor], list[tuple[float, float]]]]:
        """A U-shaped step's tail reply through the gate (its gradients and reported losses), or
        ``None``: dropped (no reply, or an error) or refused, and the node sits out the rest of the round."""
        if reply is None or reply.error is not None:
            self.reject(node_id, f"node dropped for this round: {reply.error if reply else 'no reply'}")
            return None
        try:
            return self.gate.tail(reply.content, acts)
        except p.ProtocolError as err:
            self.sit_out(node_id, str(err))
            return None

    def admit(self, node_id: int, reply: Reply) -> Optional[Admitted]:
        """A train reply through the gate: its checked smashed batches, or ``final`` for the
        reply that ends the node's round; ``None`` if it was refused, and the node then sits
        out the rest of the round."""
        cut = self.cuts[node_id]
        try:
            if self.gate.is_final(reply.content):
                _, reply.client_part = self.gate.final_part(reply.content, cut, self.rows.get(node_id, 0))
                return Admitted(final=True)
            batches = self.gate.step(reply.content, cut)
        except p.ProtocolError as err:
            self.sit_out(node_id, str(err))
            return None
        self.rows[node_id] = self.rows.get(node_id, 0) + sum(b.rows for b in batches)
        return Admitted(final=False, batches=batches)

    def admit_upload(self, node_id: int, reply: Reply, max_batches: Optional[int]) -> Optional[list[p.SmashedBatch]]:
        """An upload's checked batches, or ``None`` (refused and logged)."""
        try:
            return self.gate.upload(reply.content, self.cuts[node_id], max_batches)
        except p.ProtocolError as err:
            self.sit_out(node_id, str(err))
            return None

    def sit_out(self, node_id: int, reason: str) -> None:
        """Refuse a reply: nothing of it is trained on, the node gets no more requests this
        round and its client part is not averaged."""
        self.reject(node_id, f"node sits out the rest of the round: {reason}")
        self.data_plane.drop(node_id, reason)

    def track_progress(self, node_id: int, reply: Reply, batches: int) -> None:
        """Count a node's batches and log the round's progress at most every ``progress_interval`` s."""
        status = record_of(reply.content, p.STATUS, ConfigRecord) or ConfigRecord()
        if node_id not in self._total:  # the first reply tells how many batches the round has
            self._total[node_id] = int(status.get("remaining", 0))
            self.note_device(node_id, reply)
        self._done[node_id] = self._done.get(node_id, 0) + batches
        now = time.perf_counter()
        if now - self._last_progress >= self.progress_interval:
            self._last_progress = now
            done, total = sum(self._done.values()), sum(self._total.values())
            log(INFO, "[flsplit] round %d: %d/%d client batches (%.0f%%)", self.server_round, done, total,
                100 * done / max(total, 1))

    def note_device(self, node_id: int, reply: Reply) -> None:
        """Remember which partition/device a node is (its first reply of a round says)."""
        record = record_of(reply.content, p.DEVICE, ConfigRecord)
        if record is None or self.scenario is None:
            return
        pid = int(record.get("partition-id", len(self.devices)))
        try:
            own = device_from_node_config(record, self.scenario.device(pid))  # reads the device keys only
        except ValueError as err:
            self.reject(node_id, f"device profile ignored: {err}")
            own = None
        self.devices[node_id] = (pid, own)

    def reject(self, node_id: int, reason: str) -> None:
        """Log and record (in ``errors``, with the round's ``stage``: ``train`` or ``evaluate``)
        what went wrong with a node: a dropped node, a refused reply (``sit_out``), a failed
        device query or evaluation. A ClientApp's error reply inside ``reason`` is reduced to
        the exception its handler raised (``innermost_error``)."""
        reason = innermost_error(reason)
        log(WARNING, "[flsplit] node %s: %s", node_id, reason)  # the reason says what happens to the node
        self.errors.append({"node": node_id, "error": reason, "stage": self.stage})

    # ------------------------------------------------------------------ the round's end
    def record(self, done: list[Reply]) -> RoundRecord:
        """The round's exchanges as a value: closes the plane's per-node round state
        (sessions ended, every node's state committed) and takes its traffic meter."""
        planes = self.data_plane.end_round() if self.data_plane is not None else {}
        traffic = self.data_plane.traffic if self.data_plane is not None else Traffic()
        return RoundRecord(self.server_round, dict(self.cuts), list(self.sampled),
                           sorted(done, key=lambda r: r.node_id), self.errors, dict(self.rows), self.server_steps,
                           self.server_work, traffic, planes, self.plan)
