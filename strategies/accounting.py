"""What a round cost: its measured workload priced once, and its history record.

``RoundAccounting`` gives a ``SplitStrategy`` the round's bookkeeping: the samples each client
processed, the FLOPs it executed, the measured ``RoundWorkload`` priced by ``flsplit.sim.price``
(with a planned round's allocation and server timing), and the history entry.
"""

from __future__ import annotations

import time

from flsplit import protocol as p
from flsplit.sim.workload import client_flops
from flsplit.dataplane import Reply, Traffic
from flsplit.exchange import RoundRecord
from flsplit.profile import CutProfile
from flsplit.sim import ServerTiming, measured_workload, price

__all__ = ["RoundAccounting"]


class RoundAccounting:
    """Mixin of ``SplitStrategy``: samples, FLOPs, the priced workload, the history entry."""

    def finished_nodes(self, done: list[Reply]) -> set[int]:
        """The nodes that finished their round (the others were dropped or sat out)."""
        return {r.node_id for r in done}

    def round_examples(self, done: list[Reply]) -> dict[int, int]:
        """Samples each client processed this round (from the replies that ended its round)."""
        return {r.node_id: int(r.content.metric_records[p.METRICS]["num-examples"]) for r in done}

    def client_flops_executed(self, node_id: int, cut: CutProfile, samples: int) -> float:
        """Simulated client FLOPs of a node this round (forward and backward per sample)."""
        return client_flops(cut, samples)

    def extra_server_flops(self) -> float:
        """Of the server's FLOPs this round, those on data no client sent this round (none here)."""
        return 0.0

    def measured_workload(self, traffic: Traffic, examples: dict[int, int]):
        """The round's ``RoundWorkload`` from what was measured: bytes serialized, FLOPs run."""
        nodes = sorted(examples)
        ids = [self.devices.get(n, (i, None))[0] for i, n in enumerate(nodes)]
        cuts = [self.cuts[n] for n in nodes]
        return measured_workload(
            self.scheme or type(self).__name__.lower(),
            self.profile,
            client_ids=ids,
            cuts=cuts,
            client_flops=[self.client_flops_executed(n, self.profile.cut(c), examples[n]) for n, c in zip(nodes, cuts)],
            uplink_bytes=[traffic.up.get(n, 0) for n in nodes],
            downlink_bytes=[traffic.down.get(n, 0) for n in nodes],
            samples=[examples[n] for n in nodes],
            server_flops=self.server_work.flops(self.profile),
            unattributed_server_flops=self.extra_server_flops(),
            broadcast_bytes=traffic.broadcast,
            timing=self.schedule.timing,
        )

    def simulate_round(self, server_round: int, traffic: Traffic, examples: dict[int, int]) -> dict:
        """Simulated latency and energy of the round: its measured workload, priced once
        (``flsplit.sim.price``) with the round plan's allocation if the round was planned; the
        ``RoundCost`` is also kept as ``self.round_cost``."""
        nodes = sorted(examples)
        own = {pid: prof for n, (pid, prof) in self.devices.items() if prof is not None and n in examples}
        scenario = self.scenario.with_devices(own) if own else self.scenario
        plan = self.round_plan
        cost = price(
            self.measured_workload(traffic, examples),
            scenario,
            plan.allocation(nodes) if plan is not None else None,
            server_round=server_round,
            server_timing=plan.server_timing if plan is not None else ServerTiming.AFTER_CLIENTS,
        )
        self.round_cost = cost
        record = cost.as_dict()
        record["energy_j"] = record.pop("total_energy_j")
        record["clients"] = {str(n): c for n, c in zip(nodes, record["clients"])}
        return record

    def round_extras(self) -> dict:
        """Scheme-specific fields of the round's history entry (none here)."""
        return {}

    def round_entry(self, record: RoundRecord, t0: float, train_metrics, central, federated, eval_asked: int) -> dict:
        """The history entry of a round (its plan is added by the loop when it has one)."""
        traffic, cuts = record.traffic, record.cuts
        up, down = traffic.totals()
        stats = self.train_stats()
        entry = {
            "round": record.server_round,
            "scheme": type(self).__name__,
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
            "wall_seconds": time.perf_counter() - t0,
            **self.round_extras(),
        }
        if central is not None:
            entry["test_loss"] = central.get("loss")
            entry["test_accuracy"] = central.get("accuracy")
        if federated is not None:
            entry["eval_loss"] = federated["eval-loss"]
            entry["eval_accuracy"] = federated["eval-accuracy"]
        examples = self.round_examples(record.done)
        entry["examples_per_node"] = {str(n): k for n, k in sorted(examples.items())}
        entry["data_plane"] = {str(n): kind for n, kind in record.planes.items()}
        entry.update(self.round_status(record, eval_asked, federated))
        if self.scenario is not None:
            entry["sim"] = self.simulate_round(record.server_round, traffic, examples)
        return entry
