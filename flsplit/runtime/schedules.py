"""Schedules: who is asked what, and when, in one round of split training over a DataPlane.

A schedule runs one round's split exchanges over the round's data plane with a
server-step rule, in the spirit of ``torch.distributed.pipelining``'s schedule classes:

``PerNode``
    clients run independently: each reply is trained on at once and answered at once
    (SFL-V1 with a server copy per node, SFL-V2 on one shared part in arrival order). Parallel.
``Relay``
    one node at a time, each finishing its round before the next starts; the strategy hands the
    client part on between nodes (vanilla SL). Sequential.
``Lockstep``
    all nodes step together: the k-th batches of every node form one server step (PSL,
    EPSL, SFL-GA); a step's broadcast rows are encoded once and counted once. Parallel.
``UploadOnly``
    one one-way message per node carrying a window of smashed data, no gradient back
    (async SL's state B). Parallel.

A schedule drives the round's exchange state (``flsplit.runtime.exchange.RoundExchange``): its data
plane, request building, the reply gate (a refused reply's node sits out the rest of the
round: no more requests, its client part not averaged), step counting and progress. A
strategy names its schedule class (``SplitStrategy.schedule``). How a scheme's round latency
combines its clients' chains (sequential for ``Relay``, parallel for the others) is declared
once, beside the scheme's traffic model, in ``flsplit.sim.schemes.SCHEME_MODELS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import Reply
from flsplit.runtime.exchange import RoundExchange
from flsplit.runtime.server import ServerPart, StepGrads

__all__ = ["Schedule", "PerNode", "Relay", "Lockstep", "UploadOnly"]


class Schedule(ABC):
    """One round of exchanges; ``run`` returns the final (``done``) reply of each node."""


    @abstractmethod
    def run(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        """Run the round from each node's first request."""


class PerNode(Schedule):
    """Clients run independently; each reply is trained on at once and answered at once.

    Parameters
    ----------
    server_for : callable
        ``server_for(node_id) -> ServerPart``: the server part a node's batches train
        (one shared part, or a copy per node).
    """


    def __init__(self, server_for: Callable[[int], ServerPart]) -> None:
        self.server_for = server_for

    def run(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        if ex.gate.tail_cut:
            return self._run_u_shaped(ex, requests)
        dp, group, done = ex.data_plane, str(ex.server_round), []
        for node_id, content in requests.items():
            dp.push(node_id, content, p.TRAIN_STEP, group)
        while dp.in_flight:
            for reply in dp.pull():
                node = reply.node_id
                if reply.error is not None:
                    ex.reject(node, f"node dropped for this round: {reply.error}")
                    continue
                admitted = ex.admit(node, reply)
                if admitted is None:  # refused: the node sits out the rest of the round
                    continue
                if admitted.final:
                    done.append(reply)
                    continue
                batches = admitted.batches
                ex.track_progress(node, reply, len(batches))
                grads = self.server_for(node).step_each([(ex.cuts[node], b) for b in batches])
                ex.server_steps += len(batches)
                dp.push(node, ex.request(node, grads), p.TRAIN_STEP, group)
        return done

    def _run_u_shaped(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        """A U-shaped round: a step is two exchanges (the smashed batch up, the server part's
        output down; the tail's gradient up, the head's gradient down with the next request).
        A server part holds one step in flight: another node's batch for it waits its turn
        (arrival order), so every step runs on the weights the previous one left."""
        dp, group, done = ex.data_plane, str(ex.server_round), []
        in_flight: dict[int, tuple[ServerPart, list[torch.Tensor]]] = {}  # node -> (its part, outputs sent)
        waiting: dict[int, list[tuple[int, list[p.SmashedBatch]]]] = {}  # id(part) -> queued (node, batches)

        def begin(node: int, part: ServerPart, batches: list[p.SmashedBatch]) -> None:
            acts = part.forward_middle([(ex.cuts[node], b) for b in batches])
            in_flight[node] = (part, acts)
            dp.push(node, ex.acts_request(node, acts), p.TRAIN_STEP, group)

        def release(part: ServerPart) -> None:  # the part's step is over: the next queued batch may start
            queue = waiting.get(id(part))
            if queue:
                node, batches = queue.pop(0)
                begin(node, part, batches)

        for node_id, content in requests.items():
            dp.push(node_id, content, p.TRAIN_STEP, group)
        while dp.in_flight:
            for reply in dp.pull():
                node = reply.node_id
                if node in in_flight:  # the tail's reply
                    part, acts = in_flight.pop(node)
                    admitted_tail = ex.admit_tail(node, reply, acts)
                    if admitted_tail is None:
                        part.abandon_middle()
                    else:
                        head = part.backward_middle(*admitted_tail)
                        ex.server_steps += 1
                        dp.push(node, ex.request(node, head), p.TRAIN_STEP, group)
                    release(part)
                    continue
                if reply.error is not None:
                    ex.reject(node, f"node dropped for this round: {reply.error}")
                    continue
                admitted = ex.admit(node, reply)
                if admitted is None:
                    continue
                if admitted.final:
                    done.append(reply)
                    continue
                ex.track_progress(node, reply, len(admitted.batches))
                part = self.server_for(node)
                if any(busy is part for busy, _ in in_flight.values()):
                    waiting.setdefault(id(part), []).append((node, admitted.batches))
                else:
                    begin(node, part, admitted.batches)
        return done


class Relay(Schedule):
    """One node at a time, in request order, each through its whole round (vanilla SL).

    Parameters
    ----------
    server_for : callable
        ``server_for(node_id) -> ServerPart`` (SL: the one shared part).
    hand_over : callable
        ``hand_over(node_id, content)``: called before a node starts, to put the client part
        the previous node left into its first request.
    take_back : callable
        ``take_back(reply)``: called with a node's final reply, before the next node starts.
    """


    def __init__(self, server_for: Callable[[int], ServerPart], hand_over: Callable[[int, RecordDict], None],
                 take_back: Callable[[Reply], None]) -> None:
        self.per_node = PerNode(server_for)
        self.hand_over = hand_over
        self.take_back = take_back

    def run(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        done = []
        for node_id, content in requests.items():
            self.hand_over(node_id, content)
            finished = self.per_node.run(ex, {node_id: content})
            for reply in finished:
                self.take_back(reply)
            done += finished
        return done


class _Outgoing:
    """One node's share of a lockstep exchange's step results, batch by batch."""

    def __init__(self) -> None:
        self.unicast: list[torch.Tensor] = []
        self.broadcast: Optional[ArrayRecord] = None
        self.broadcast_config = ConfigRecord()

    def add(self, result: StepGrads, i: int, shared: ArrayRecord) -> None:
        k = len(self.unicast)  # the step's index in this exchange: the same for every receiver
        self.unicast.append(result.unicast[i])
        if result.broadcast is not None:
            self.broadcast = self.broadcast if self.broadcast is not None else ArrayRecord()
            for key, array in shared.items():  # the same Array objects for every receiver, keyed b.{k}
                self.broadcast[key] = array
            self.broadcast_config[f"positions.{k}"] = result.positions[i]
            self.broadcast_config[f"scale.{k}"] = float(result.scales[i])


def _broadcast_record(ex: RoundExchange, result: StepGrads, k: int) -> ArrayRecord:
    """A step's broadcast rows, encoded once under the step's key ``b.{k}`` and counted once."""
    shared = ArrayRecord()
    if result.broadcast is not None:
        ex.codec_down.encode_into(shared, f"b.{k}", result.broadcast)
        ex.data_plane.traffic.record_broadcast(sum(len(a.data) for a in shared.values()))
    return shared


class Lockstep(Schedule):
    """All nodes step together: the k-th batches of every node form one server step.

    A step's broadcast rows (EPSL, SFL-GA) are encoded once, put into every receiver's
    request, and counted once in the traffic.

    Parameters
    ----------
    step : callable
        ``step([(cut, batch), ...]) -> StepGrads``: the server-step rule.
    server : ServerPart, optional
        The server part a U-shaped round steps over the union of the batches (PSL's
        ``step_union`` with the loss on the clients: ``forward_middle``, ``backward_middle``).
    combine : callable, optional
        A U-shaped step's rule for what goes back: ``combine(cut-layer gradients) -> StepGrads``
        (default: each node its own; SFL-GA: ``flsplit.runtime.server.gradient_average``).
    """


    def __init__(self, step: Callable[[list[tuple[int, p.SmashedBatch]]], StepGrads],
                 server: Optional[ServerPart] = None,
                 combine: Optional[Callable[[list[torch.Tensor]], StepGrads]] = None) -> None:
        self.step = step
        self.server = server
        self.combine = combine or StepGrads

    def run(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        dp, group, done = ex.data_plane, str(ex.server_round), []
        while requests:
            replies = dp.exchange(requests, p.TRAIN_STEP, group)
            requests = {}
            received: dict[int, list[p.SmashedBatch]] = {}
            for node, reply in sorted(replies.items()):
                if reply.error is not None:
                    ex.reject(node, f"node dropped for this round: {reply.error}")
                elif (admitted := ex.admit(node, reply)) is None:
                    continue  # refused: the node sits out the rest of the round
                elif admitted.final:
                    done.append(reply)
                else:
                    received[node] = admitted.batches
                    ex.track_progress(node, reply, len(admitted.batches))
            if ex.gate.tail_cut:
                requests = self._u_shaped_step(ex, received)
                continue
            outgoing = {n: _Outgoing() for n in received}
            for k in range(max((len(b) for b in received.values()), default=0)):
                nodes = [n for n in received if k < len(received[n])]
                result = self.step([(ex.cuts[n], received[n][k]) for n in nodes])
                shared = _broadcast_record(ex, result, k)
                for i, n in enumerate(nodes):
                    outgoing[n].add(result, i, shared)
                ex.server_steps += 1
            for n, out in outgoing.items():
                requests[n] = ex.request(n, out.unicast, out.broadcast, out.broadcast_config)
        return done

    def _u_shaped_step(self, ex: RoundExchange, received: dict[int, list[p.SmashedBatch]]) -> dict[int, RecordDict]:
        """A U-shaped lockstep step: one forward over the union of the batches, every node's
        tail in one exchange, one backward; the next requests (with the head gradients)."""
        if not received:
            return {}
        if self.server is None:
            raise ValueError("a U-shaped lockstep round needs the server part (Lockstep(..., server=...))")
        nodes = sorted(received)
        acts = self.server.forward_middle([(ex.cuts[n], received[n][0]) for n in nodes])  # one batch per exchange
        replies = ex.data_plane.exchange({n: ex.acts_request(n, [a]) for n, a in zip(nodes, acts)}, p.TRAIN_STEP,
                                         str(ex.server_round))
        tails = [ex.admit_tail(n, replies.get(n), [a]) for n, a in zip(nodes, acts)]
        heads = self.server.backward_middle([t[0][0] if t else None for t in tails],
                                            [t[1][0] if t else (0.0, 0.0) for t in tails], union=True)
        ex.server_steps += 1
        alive = [(n, h) for n, h in zip(nodes, heads) if h is not None]
        if not alive:
            return {}
        result = self.combine([h for _, h in alive])
        shared = _broadcast_record(ex, result, 0)
        outgoing = {n: _Outgoing() for n, _ in alive}
        for i, (n, _) in enumerate(alive):
            outgoing[n].add(result, i, shared)
        return {n: ex.request(n, out.unicast, out.broadcast, out.broadcast_config) for n, out in outgoing.items()}


class UploadOnly(Schedule):
    """One one-way message per node with a window of smashed data; nothing is sent back.

    Parameters
    ----------
    on_upload : callable
        ``on_upload(node_id, batches, record)``: the checked batches of a node's upload and
        the record as received (async SL trains the server on them and caches the record).
    max_batches : int, optional
        Most batches an upload may carry (``max-steps`` when set; else unbounded).
    """


    def __init__(self, on_upload: Callable[[int, list[p.SmashedBatch], ArrayRecord], None],
                 max_batches: Optional[int] = None) -> None:
        self.on_upload = on_upload
        self.max_batches = max_batches

    def run(self, ex: RoundExchange, requests: dict[int, RecordDict]) -> list[Reply]:
        replies = ex.data_plane.exchange(requests, p.UPLOAD, str(ex.server_round))
        done = []
        for node, reply in replies.items():
            if reply.error is not None:
                ex.reject(node, f"upload failed: {reply.error}")
            elif (batches := ex.admit_upload(node, reply, self.max_batches)) is not None:
                self.on_upload(node, batches, reply.content.array_records[p.SMASHED])
                done.append(reply)
        return done
