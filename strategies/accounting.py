"""What a round cost and did: its measured workload priced once, and its history entry.

The round loop (``SplitStrategy._run``) calls these with what they need: the round's
``RoundRecord`` (its exchanges), the scheme's ``RoundOutcome`` (what the clients did, as the
scheme counts it: ``SplitStrategy.round_outcome``) and the training statistics the server saw.
"""

from __future__ import annotations

import dataclasses
from logging import ERROR
from typing import Optional

from flwr.app import MetricRecord
from flwr.common.logger import log

from flsplit.planes.dataplane import Reply
from flsplit.runtime.exchange import RoundRecord
from flsplit.runtime.history import RunHistory
from flsplit.model.profile import ModelProfile
from flsplit.wire.protocol import METRICS
from flsplit.sim.scenario import Scenario
from flsplit.sim.schemes import scheme_model
from flsplit.runtime.server import StepStats
from flsplit.sim import ServerTiming, measured_workload, price
from flsplit.sim.workload import client_flops

__all__ = ["RoundOutcome", "RoundPricing", "round_entry", "untrained"]


@dataclasses.dataclass
class RoundOutcome:
    """What the clients did in a round, as the scheme counts it.

    Attributes
    ----------
    finished : set of int
        The nodes that finished their round (the others were dropped or sat out).
    examples : dict
        Samples each client processed, by node.
    forward_only : set of int
        Nodes whose client ran its forward pass only (a frozen client part): their simulated
        FLOPs are forward FLOPs.
    extra_server_flops : float
        Of the server's FLOPs, those on data no client sent this round (a cache).
    extras : dict
        Scheme-specific fields of the round's history entry.
    """

    finished: set[int]
    examples: dict[int, int]
    forward_only: set[int] = dataclasses.field(default_factory=set)
    extra_server_flops: float = 0.0
    extras: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of_replies(cls, done: list[Reply]) -> RoundOutcome:
        """Every node with a final reply finished, having processed the samples it reports."""
        return cls({r.node_id for r in done},
                   {r.node_id: int(r.content.metric_records[METRICS]["num-examples"]) for r in done})


@dataclasses.dataclass(frozen=True)
class RoundPricing:
    """Prices a round of a strategy with a ``scenario``: its measured workload (bytes
    serialized, FLOPs run), priced once by ``flsplit.sim.price``."""

    scheme: str  # the scheme's row in flsplit.sim.schemes (its traffic model and timing)
    profile: ModelProfile
    scenario: Scenario
    tail_cut: int = 0  # a U-shaped split's: the client also runs blocks [tail_cut, L), forward and backward

    def __post_init__(self) -> None:
        scheme_model(self.scheme)  # a scheme without a row cannot be priced: said before anything runs

    def simulate(self, record: RoundRecord, outcome: RoundOutcome, devices: dict) -> dict:
        """Simulated latency and energy of the round, with the round plan's allocation and
        server timing if the round was planned. ``devices`` is ``node -> (partition, own profile)``."""
        examples, traffic, profile = outcome.examples, record.traffic, self.profile
        nodes = sorted(examples)
        cuts = [record.cuts[n] for n in nodes]
        flops = [examples[n] * profile.cut(c).client_forward_flops if n in outcome.forward_only
                 else client_flops(profile.cut(c), examples[n]) for n, c in zip(nodes, cuts)]
        if self.tail_cut:  # the tail and the loss: the server-side FLOPs of the blocks from the tail cut on
            tail = profile.cut(self.tail_cut)
            flops = [f + examples[n] * (tail.server_forward_flops + tail.server_backward_flops) for f, n in zip(flops, nodes)]
        workload = measured_workload(
            self.scheme, profile,
            client_ids=[devices.get(n, (i, None))[0] for i, n in enumerate(nodes)],
            cuts=cuts,
            client_flops=flops,
            uplink_bytes=[traffic.up.get(n, 0) for n in nodes],
            downlink_bytes=[traffic.down.get(n, 0) for n in nodes],
            samples=[examples[n] for n in nodes],
            server_flops=record.server_work.flops(profile),
            unattributed_server_flops=outcome.extra_server_flops,
            broadcast_bytes=traffic.broadcast,
        )
        own = {pid: prof for n, (pid, prof) in devices.items() if prof is not None and n in examples}
        plan = record.plan
        cost = price(
            workload,
            self.scenario.with_devices(own) if own else self.scenario,
            plan.allocation(nodes) if plan is not None else None,
            server_round=record.server_round,
            server_timing=plan.server_timing if plan is not None else ServerTiming.AFTER_CLIENTS,
        )
        sim = cost.as_dict()
        sim["energy_j"] = sim.pop("total_energy_j")
        sim["clients"] = {str(n): c for n, c in zip(nodes, sim["clients"])}
        return sim


def round_entry(record: RoundRecord, outcome: RoundOutcome, stats: StepStats, *, strategy: str, wall_seconds: float,
                train_metrics: MetricRecord, central: Optional[MetricRecord], federated: Optional[MetricRecord],
                eval_asked: int, eval_finished: int, sim: Optional[dict]) -> dict:
    """The history entry of a round; ``sim`` is its priced workload (``RoundPricing``), if any."""
    traffic, cuts = record.traffic, record.cuts
    up, down = traffic.totals()
    entry = {
        "round": record.server_round,
        "scheme": strategy,
        "nodes": sorted(cuts),
        "cuts": {str(n): c for n, c in sorted(cuts.items())},
        "num_examples": int(train_metrics["num-examples"]),
        "server_steps": record.server_steps,
        # Samples the server part ran forward and backward this round, per cut (what the
        # simulated server FLOPs are priced from).
        "server_rows": {str(c): {"forward": f, "backward": b} for c, (f, b) in sorted(record.server_work.rows.items())},
        "train_loss": stats.loss if stats.samples else None,
        "train_accuracy": stats.accuracy if stats.samples else None,
        "bytes_up": up,
        "bytes_down": down,
        "split_bytes_up": sum(traffic.split_up.values()),
        "split_bytes_down": sum(traffic.split_down.values()),
        "broadcast_bytes_down": traffic.broadcast,
        "bytes_per_node": {str(n): traffic.per_node(n) for n in sorted(cuts)},
        "messages": traffic.messages,
        "errors": list(record.errors),
        "wall_seconds": wall_seconds,
        **outcome.extras,
    }
    if central is not None:
        entry["test_loss"] = central.get("loss")
        entry["test_accuracy"] = central.get("accuracy")
    if federated is not None:
        entry["eval_loss"] = federated["eval-loss"]
        entry["eval_accuracy"] = federated["eval-accuracy"]
    entry["examples_per_node"] = {str(n): k for n, k in sorted(outcome.examples.items())}
    entry["data_plane"] = {str(n): kind for n, kind in record.planes.items()}
    entry.update(_status(record, outcome, eval_asked, eval_finished, federated))
    if sim is not None:
        entry["sim"] = sim
    if record.plan is not None:  # the planner in the loop completes it (RoundPlanning.observe_round)
        entry["plan"] = record.plan.as_record()
    return entry


def _status(record: RoundRecord, outcome: RoundOutcome, eval_asked: int, eval_finished: int,
            federated: Optional[MetricRecord]) -> dict:
    """The round's node counts and ``status``: ``error`` when no sampled node finished the
    round or every evaluation reply failed, ``warning`` when some node was dropped (or sat
    out) or some evaluation failed, else ``ok``."""
    finished = outcome.finished
    sampled = set(record.sampled) | finished
    dropped = sorted(sampled - finished)
    status: dict = {"nodes_sampled": len(sampled), "nodes_finished": len(finished), "nodes_dropped": dropped}
    eval_failed = 0
    if eval_asked:
        eval_failed = eval_asked - eval_finished
        status.update(eval_nodes_sampled=eval_asked, eval_nodes_finished=eval_finished)
    if (sampled and not finished) or (eval_failed and federated is None):
        status["status"] = "error"
    elif dropped or eval_failed:
        status["status"] = "warning"
    else:
        status["status"] = "ok"
    return status


def untrained(history: RunHistory, rounds: int, fail: bool) -> None:
    """A run in which no node finished any round: logged as an error and recorded in the
    history (saved); with ``fail``, ``RuntimeError``, so that Flower marks the run failed
    instead of completed."""
    last = history.rounds[-1]["errors"] if history.rounds else []
    reasons = "; ".join(f"node {e['node']}: {e['error']}" for e in last[:3]) or "none recorded"
    if len(last) > 3:
        reasons += f" (and {len(last) - 3} more in the history)"
    message = f"no node finished a round in {rounds} round{'s' if rounds != 1 else ''}; last errors: {reasons}"
    history.data["error"] = message
    history.save()
    log(ERROR, "[flsplit] %s", message)
    if fail:
        raise RuntimeError(message)
