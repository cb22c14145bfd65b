"""The server's end of the split exchange, per node: requests, reply checks, progress, devices.

``ExchangeHost`` gives a ``SplitStrategy`` what a schedule (``flsplit.schedules``) calls on
its host: building a node's step request, admitting a reply through the reply gate
(``flsplit.gate``), letting a node whose reply was refused sit out, recording a dropped
node, counting progress and noting which device a node is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log

from flsplit import protocol as p
from flsplit.dataplane import Reply, innermost_error
from flsplit.scenario import device_from_node_config

__all__ = ["ExchangeHost", "Admitted"]


@dataclass
class Admitted:
    """A train reply the gate let through: the round's end, or smashed batches to train on."""

    final: bool
    batches: list[p.SmashedBatch] = field(default_factory=list)


class ExchangeHost:
    """Mixin of ``SplitStrategy``: the per-node duties of the schedule's host."""

    def request(
        self,
        node_id: int,
        grads: Optional[list[torch.Tensor]] = None,
        broadcast: Optional[ArrayRecord] = None,
        broadcast_config: Optional[ConfigRecord] = None,
    ) -> RecordDict:
        """A step request: the node's config, the gradients of its pending batches, and the
        broadcast rows (already encoded, shared by every receiver) if the scheme has them."""
        content = RecordDict({p.CONFIG: self._configs[node_id]})
        if grads:
            content[p.GRAD] = p.encode_grads(grads, self.codec_down)
        if broadcast is not None:
            content[p.BCAST] = broadcast
            content[p.BCAST_CONFIG] = broadcast_config
        return content

    def admit(self, node_id: int, reply: Reply) -> Optional[Admitted]:
        """A train reply through the gate (``flsplit.gate``): its checked smashed batches, or
        ``final`` for the reply that ends the node's round; ``None`` if it was refused, and
        the node then sits out the rest of the round."""
        cut = self.cuts[node_id]
        try:
            if self.gate.is_final(reply.content):
                self.gate.final(reply.content, cut, self._rows.get(node_id, 0))
                return Admitted(final=True)
            batches = self.gate.step(reply.content, cut)
        except p.ProtocolError as err:
            self.sit_out(node_id, str(err))
            return None
        self._rows[node_id] = self._rows.get(node_id, 0) + sum(int(b.y.shape[0]) for b in batches)
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

    def track_progress(self, server_round: int, node_id: int, reply: Reply, batches: int) -> None:
        """Count a node's batches and log the round's progress at most every 10 seconds."""
        status = reply.content.config_records.get(p.STATUS) or ConfigRecord()
        if node_id not in self._total:  # the first reply tells how many batches the round has
            self._total[node_id] = int(status.get("remaining", 0))
            self.note_device(node_id, reply)
        self._done[node_id] = self._done.get(node_id, 0) + batches
        now = time.perf_counter()
        if now - self._last_progress >= self.progress_interval:
            self._last_progress = now
            done, total = sum(self._done.values()), sum(self._total.values())
            log(INFO, "[flsplit] round %d: %d/%d client batches (%.0f%%)", server_round, done, total, 100 * done / max(total, 1))

    def note_device(self, node_id: int, reply: Reply) -> None:
        """Remember which partition/device a node is (its first reply of a round says)."""
        record = reply.content.config_records.get(p.DEVICE)
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
        """Log and record (in the round's ``errors``, with the ``stage`` of the round: ``train``
        or ``evaluate``) what went wrong with a node: a dropped node, a refused reply (see
        ``sit_out``), a failed device query or evaluation. A ClientApp's error reply inside
        ``reason`` is reduced to the exception its handler raised (``innermost_error``)."""
        reason = innermost_error(reason)
        log(WARNING, "[flsplit] node %s: %s", node_id, reason)  # the reason says what happens to the node
        self.errors.append({"node": node_id, "error": reason, "stage": getattr(self, "_stage", "train")})

