"""Adaptive split learning: a planner in the loop of any split strategy, re-planning every round.

``Adaptive`` wraps a ``SplitStrategy`` the way Flower's differential-privacy wrappers wrap a
strategy (``flwr/serverapp/strategy/dp_fixed_clipping.py``): the wrapper holds the strategy,
the strategy does not know it is wrapped. ``Adaptive.start`` runs the strategy's rounds with
itself as their ``planning`` (``flsplit.strategies.planning.RoundPlanning``): the round loop
asks it for each round's plan and hands it each round's history entry.

Each round:

1. the sampled nodes are identified before planning: a node seen for the first time answers
   one ``query.split_device`` message with its partition id, any device profile of its node
   config and its number of training samples (once per node and run);
2. the planner (``flsplit.planners.online``) plans cuts and allocation for that round's
   devices and channel (the scenario's fading for that round);
3. the strategy trains with those cuts; the round's measured workload is priced with the
   plan's allocation and the planner's server timing (``accounting.RoundPricing``);
4. the planner gets what was measured (``observe_round``: each device's energy, the training
   loss), and the history's round record gets ``plan``: per node cut and allocation, the
   planner's predicted latency and energy (the one price of its predicted workload), its
   planning time, and planner-specific fields (OPEN's budgets and queues, CCC's Q-values).

Example::

    from flsplit.planners.online import make_online_planner
    from flsplit.strategies import PSL
    from flsplit.strategies.adaptive import Adaptive

    psl = PSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, scenario=scenario)
    strategy = Adaptive(psl, make_online_planner("edgesplit", psl.profile, scenario))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=10)
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any, Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flsplit.wire import protocol as p
from flsplit.runtime.exchange import RoundExchange
from flsplit.planners.online import OnlinePlanner, RoundPlan
from flsplit.sim.scenario_files import device_from_node_config
from flsplit.strategies.base import SplitStrategy

__all__ = ["Adaptive"]


class Adaptive(Strategy):
    """A split strategy whose cuts and resources are planned every round.

    Parameters
    ----------
    strategy : SplitStrategy
        The scheme that trains (it needs a ``scenario``). Its ``cut_layer`` is ignored.
    planner : OnlinePlanner
        The per-round planner (``flsplit.planners.online.make_online_planner``); its
        ``strategies`` must include the wrapped strategy's scheme.
    """

    def __init__(self, strategy: SplitStrategy, planner: OnlinePlanner) -> None:
        if not isinstance(strategy, SplitStrategy):
            raise ValueError(f"Adaptive wraps a SplitStrategy, got {type(strategy).__name__}")
        if strategy.scenario is None:
            raise ValueError("an adaptive strategy needs a wireless scenario (cost-scenario must not be 'none')")
        if strategy.settings.tail_cut:
            raise ValueError(f"planner '{planner.name}' plans splits whose server runs to the loss; a U-shaped split "
                             f"(tail-cut {strategy.settings.tail_cut}) is not planned: use planner 'none' with it")
        if strategy.scheme not in planner.strategies:
            raise ValueError(
                f"planner '{planner.name}' plans {'/'.join(planner.strategies)} rounds, not '{strategy.scheme}': "
                f"set strategy to one of {list(planner.strategies)}"
            )
        if planner.scheme == "epsl" and abs(getattr(strategy, "phi", 0.0) - planner.phi()) > 0:
            raise ValueError(f"planner phi {planner.phi()} differs from the strategy's phi {strategy.phi}")
        self.strategy = strategy
        self.planner = planner
        self.samples: dict[int, int] = {}  # node -> training samples it reported

    def __getattr__(self, name: str) -> Any:  # settings of the wrapped strategy (min_available_nodes, ...)
        if name in ("strategy", "planner"):
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def summary(self) -> None:
        log(INFO, "\t├── Planner in the loop: %s (server timing %s)", self.planner.name, self.planner.server_timing.value)
        self.strategy.summary()

    # ------------------------------------------------------------------ RoundPlanning: what the round loop calls
    def identify(self, exchange: RoundExchange, nodes: list[int]) -> list[int]:
        """Ask nodes seen for the first time who they are (recorded in ``exchange.devices``);
        returns the nodes that answered."""
        unknown = [n for n in nodes if n not in self.samples]
        if unknown:
            replies = exchange.data_plane.exchange({n: RecordDict() for n in unknown}, p.DESCRIBE, str(exchange.server_round))
            for node, reply in replies.items():
                record = reply.content.config_records.get(p.DEVICE) if reply.content is not None else None
                if reply.error is not None or record is None:
                    exchange.reject(node, f"device query failed, node sits out: {reply.error or 'no device record'}")
                    continue
                try:
                    examples = int(record["num-train-examples"])
                    pid = int(record["partition-id"])
                    if examples < 0 or pid < 0:
                        raise ValueError("negative partition id or sample count")
                    own = device_from_node_config(record, self.strategy.scenario.device(pid))  # reads the device keys only
                except (KeyError, TypeError, ValueError) as err:
                    exchange.reject(node, f"device record refused, node sits out: {err}")
                    continue
                exchange.devices[node] = (pid, own)
                self.samples[node] = examples
        return [n for n in nodes if n in self.samples]

    def expected_samples(self, node: int) -> int:
        """Samples a node trains on in a round (``max-steps`` batches, or local epochs)."""
        s = self.strategy.train_settings
        if s["max_steps"]:
            return int(s["max_steps"]) * int(s["batch_size"])
        return int(s["local_epochs"]) * self.samples[node]

    def plan_round(self, exchange: RoundExchange, nodes: list[int]) -> RoundPlan:
        """Identify the nodes, then plan their cuts and resources for this round."""
        server_round, devices, scenario = exchange.server_round, exchange.devices, self.strategy.scenario
        nodes = [n for n in self.identify(exchange, nodes) if self.samples[n] > 0]
        if not nodes:
            raise RuntimeError(f"round {server_round}: no sampled node could be identified")
        ids = [devices[n][0] for n in nodes]
        own = {pid: prof for n, (pid, prof) in devices.items() if prof is not None and n in nodes}
        plan = self.planner.plan(server_round, ids, [self.expected_samples(n) for n in nodes],
                                 nodes=nodes, scenario=scenario.with_devices(own) if own else scenario)
        log(INFO, "[flsplit] round %d plan (%s, %.3f s): cuts %s, predicted %.3f s / %.4f J", server_round,
            plan.method, plan.planning_s, [plan.cuts[n] for n in nodes], plan.predicted.round_latency_s,
            plan.predicted.total_energy_j)
        return plan

    def observe_round(self, plan: RoundPlan, entry: dict) -> None:
        """Feed back the round's measured energies and loss; complete the history's plan record."""
        server_round = entry["round"]
        clients = (entry.get("sim") or {}).get("clients", {})
        missing = [n for n in plan.nodes if str(n) not in clients]
        if missing:  # a node that dropped out spent energy nobody measured: counted as none
            log(WARNING, "[flsplit] round %d: no measured energy for nodes %s (dropped); counted as 0", server_round, missing)
        energies = [clients[str(n)]["energy_j"] if str(n) in clients else 0.0 for n in plan.nodes]
        entry["plan"].update(self.planner.observe(server_round, plan.client_ids, energies, entry.get("train_loss")))

    def planner_config(self) -> dict:
        """The planner's settings a resumed run must share."""
        return self.planner.checkpoint_config()

    def planner_state(self) -> dict:
        """What the loop carries across rounds: the nodes identified and the planner's own state."""
        return {"samples": {str(n): k for n, k in self.samples.items()}, "planner": self.planner.checkpoint_state()}

    def restore_planner(self, state: dict) -> None:
        self.samples = {int(n): int(k) for n, k in state["samples"].items()}
        self.planner.restore_state(state["planner"])

    # ------------------------------------------------------------------ Flower Strategy API: delegated
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid, planning=self)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs):
        """Run the wrapped strategy with the planner in the loop (see ``SplitStrategy.start``)."""
        log(INFO, "[flsplit] adaptive: planner '%s' drives %s", self.planner.name, type(self.strategy).__name__)
        return self.strategy.start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
                                   planning=self, **kwargs)
