"""Loss-triggered asynchronous split learning with FP8 (Chen, Li, Chakrabarti 2021).

Each client is in one of three states, re-evaluated at the end of each window (one round:
``local_epochs`` epochs, or ``max_steps`` batches when that is set):

A
    normal split training: smashed data up, gradients down, both parts train (SFL-V2
    style: the shared server part steps once per client batch).
B
    the client part is frozen; the client computes its smashed data for the whole window
    and sends it one way in one reply (``train.split_upload``): no per-step round trips,
    no gradient back. The server trains on it and caches it.
C
    the server sends that client nothing and the client does no work; the server trains on
    the client's cached smashed data.

Rule (``next_state``): ``delta = |reference loss - window's average loss|``;
``delta >= threshold`` -> A, otherwise A -> B, B -> C, C -> C. The reference loss is the
average loss of the client's most recent window in state A (refreshed only in A; before the
first one there is none, and the client goes to A). The loss of a window is what the server
measured on that client's samples (fresh in A and B, cached in C). A client in C therefore
stays there until its loss moves by ``threshold`` from the reference; with a reference loss
below the threshold only a rise can bring it back (on MNIST with lenet and threshold 0.2 every
client stays in C from its fifth window: ``benchmarks/RESULTS.md`` section 13).

The cache keeps every B upload *as received*, i.e. encoded (fp8 takes one byte per value),
up to ``cache_max_mb`` in total. Past that bound the least recently used other caches
are evicted; a client whose cache is gone, or did not fit, is moved from C back to B (it
uploads again) instead of training the server on nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from logging import WARNING
from typing import Any, Optional

from flwr.app import ArrayRecord, RecordDict
from flwr.common.logger import log

from flsplit.wire import protocol as p
from flsplit.planes.dataplane import Reply, payload_bytes
from flsplit.runtime.exchange import RoundRecord
from flsplit.runtime.schedules import PerNode, UploadOnly
from flsplit.runtime.server import StepStats
from flsplit.sim.schemes import AsyncState
from flsplit.strategies.base import RoundOutcome, SplitStrategy

__all__ = ["AsyncSL", "next_state"]

_DEMOTE = {AsyncState.A: AsyncState.B, AsyncState.B: AsyncState.C, AsyncState.C: AsyncState.C}


def next_state(state: str, reference_loss: Optional[float], loss: float, threshold: float) -> AsyncState:
    """The state after a window: A if the loss moved by ``threshold`` or more, else one step down."""
    if state not in _DEMOTE:
        raise ValueError(f"unknown state {state!r}")
    if reference_loss is None or abs(reference_loss - loss) >= threshold:
        return AsyncState.A
    return _DEMOTE[AsyncState(state)]


class AsyncSL(SplitStrategy):
    """Loss-triggered asynchronous split learning (states A/B/C per client).

    Parameters
    ----------
    loss_threshold : float
        The ``threshold`` of ``next_state``.
    cache_max_mb : float
        Bound on the server's cache of encoded smashed data (MB, 10^6 bytes).
    codec_up, codec_down : str
        Default to FP8: ``fp8-e4m3`` for smashed data, ``fp8-e5m2`` for gradients.
    **kwargs
        See ``SplitStrategy``. All clients start in A.
    """

    scheme = "async"
    u_shape_refusal = ("its state B trains the server part on uploaded smashed data alone, which needs the labels and "
                       "the loss on the server")
    schedule = PerNode  # state A; state B uploads (UploadOnly) on the same parallel timing

    def __init__(
        self,
        *args,
        loss_threshold: float = 0.05,
        cache_max_mb: float = 1024.0,
        codec_up: str = "fp8-e4m3",
        codec_down: str = "fp8-e5m2",
        **kwargs,
    ) -> None:
        super().__init__(*args, codec_up=codec_up, codec_down=codec_down, **kwargs)
        if not loss_threshold >= 0:
            raise ValueError(f"loss-threshold must be >= 0, got {loss_threshold}")
        if not cache_max_mb > 0:
            raise ValueError(f"cache-max-mb must be > 0, got {cache_max_mb}")
        self.loss_threshold = loss_threshold
        self.cache_max_bytes = int(cache_max_mb * 1e6)
        self.states: dict[int, str] = {}
        self.reference_loss: dict[int, Optional[float]] = {}
        self.cache: OrderedDict[int, tuple[int, ArrayRecord]] = OrderedDict()  # node -> (cut, encoded)
        self.transitions: dict[str, dict] = {}

    @classmethod
    def run_config_options(cls, config: Mapping[str, Any]) -> dict:
        """``loss-threshold``, ``cache-max-mb``, and ``state-window``: ``epoch``, or a number of
        steps N (one round of N batches: ``max_steps``)."""
        options = {"loss_threshold": float(config["loss-threshold"]), "cache_max_mb": float(config["cache-max-mb"])}
        window = str(config["state-window"])
        if window != "epoch":
            if not window.isdigit() or int(window) < 1:
                raise ValueError(f"state-window must be 'epoch' or a number of steps, got {window!r}")
            options["max_steps"] = int(window)
        return options

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "loss_threshold": self.loss_threshold,
                "cache_max_bytes": self.cache_max_bytes}

    def checkpoint_state(self) -> dict:
        return {
            **super().checkpoint_state(),
            "states": {str(n): s for n, s in self.states.items()},
            "reference_loss": {str(n): loss for n, loss in self.reference_loss.items()},
            "cache": [[n, cut, record] for n, (cut, record) in self.cache.items()],  # least recently used first
        }

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self.states = {int(n): str(s) for n, s in state["states"].items()}
        if not set(self.states.values()) <= set(_DEMOTE):
            raise ValueError(f"unknown async states {sorted(set(self.states.values()) - set(_DEMOTE))}")
        self.reference_loss = {int(n): loss for n, loss in state["reference_loss"].items()}
        self.cache = OrderedDict((int(n), (int(cut), record)) for n, cut, record in state["cache"])

    # ------------------------------------------------------------------ cache
    def cache_bytes(self) -> int:
        return sum(payload_bytes(RecordDict({p.SMASHED: rec})) for _, rec in self.cache.values())

    def _store(self, node: int, cut: int, record: ArrayRecord) -> None:
        """Cache an upload as received; evict the oldest other caches past the bound."""
        self.cache.pop(node, None)
        size = payload_bytes(RecordDict({p.SMASHED: record}))
        if size > self.cache_max_bytes:
            log(WARNING, "[flsplit] node %s: upload of %d bytes exceeds the cache bound; not cached", node, size)
            return
        while self.cache and self.cache_bytes() + size > self.cache_max_bytes:
            evicted, _ = self.cache.popitem(last=False)
            log(WARNING, "[flsplit] node %s: cache evicted (bound %d bytes)", evicted, self.cache_max_bytes)
        self.cache[node] = (cut, record)

    # ------------------------------------------------------------------ round
    def _server_for(self, node: int):
        self.server.stats = self.node_stats[node]  # per-client losses drive the state rule
        return self.server

    def _train_server_only(self, node: int, batches: list[p.SmashedBatch]) -> None:
        self._server_for(node).step_each([(self.cuts[node], b) for b in batches], input_grad=False)
        self.round.server_steps += len(batches)

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        self.node_stats = {n: StepStats() for n in requests}
        self.upload_examples: dict[int, int] = {}
        window = {n: self.states.get(n, AsyncState.A) for n in requests}
        for n, state in window.items():
            if state == AsyncState.C and (n not in self.cache or self.cache[n][0] != self.cuts[n]):
                window[n] = AsyncState.B  # nothing (usable) cached: upload again
        self.window = window
        # Taken now: this round's uploads may evict caches, which then count from next round.
        cached = {n: self.cache[n] for n, s in window.items() if s == AsyncState.C}

        uploads = {n: RecordDict({p.CONFIG: self.round.configs[n]}) for n, s in window.items() if s == AsyncState.B}
        max_steps = self.train_settings["max_steps"]  # a window is one round's batches
        UploadOnly(self._on_upload, max_steps or None).run(self.round, uploads)
        done = PerNode(self._server_for).run(self.round, {n: c for n, c in requests.items() if window[n] == AsyncState.A})

        for node, (cut, record) in cached.items():
            if node in self.cache:
                self.cache.move_to_end(node)
            batches = p.decode_smashed(record, self._shapes[cut - 1], self.server_dtype, self.settings.num_classes,
                                       self.codec_up, self.gate.label_shape)
            self._train_server_only(node, batches)

        self._update_states(window)
        return done

    def _on_upload(self, node: int, batches: list[p.SmashedBatch], record: ArrayRecord) -> None:
        """A B upload: the server trains on it and caches it as received."""
        self.upload_examples[node] = sum(int(b.y.shape[0]) for b in batches)
        self._store(node, self.cuts[node], record)
        self._train_server_only(node, batches)

    def _update_states(self, window: dict[int, str]) -> None:
        self.transitions = {}
        for node, state in window.items():
            stats = self.node_stats[node]
            if stats.samples == 0:  # nothing measured (errors): keep the state ...
                if state == AsyncState.B and node not in self.upload_examples:
                    # ... unless the upload failed: the client may have lost the frozen part it
                    # uploads with (a restarted SuperNode, a resumed run's fresh clients)
                    self.states[node] = AsyncState.A
                continue
            reference = self.reference_loss.get(node)
            new = next_state(state, reference, stats.loss, self.loss_threshold)
            if state == AsyncState.A:
                self.reference_loss[node] = stats.loss
            self.states[node] = new
            self.transitions[str(node)] = {"state": state, "next": new, "loss": stats.loss, "reference_loss": reference}

    def round_outcome(self, record: RoundRecord) -> RoundOutcome:
        """Finished: A clients that ended their round, B clients whose upload was trained on, and
        C clients (the server trained on their cache: no message). Samples: A clients' trained
        ones plus B clients' uploaded ones (C clients processed none). In B the frozen client
        only runs its forward pass; in C the server trains on cached smashed data."""
        replied = super().round_outcome(record)
        cached = {n for n, s in self.window.items() if s == AsyncState.C}
        return RoundOutcome(
            finished=replied.finished | set(self.upload_examples) | cached,
            examples={**replied.examples, **self.upload_examples},
            forward_only={n for n, s in self.window.items() if s == AsyncState.B},
            extra_server_flops=self._cached_server_flops() if self.profile is not None else 0.0,
            extras={"async": dict(self.transitions), "cache_bytes": self.cache_bytes()},
        )

    def _cached_server_flops(self) -> float:
        """The server's training on cached smashed data of the C clients."""
        total = 0.0
        for node, state in self.window.items():
            if state == AsyncState.C:
                cut = self.profile.cut(self.cuts[node])
                total += self.node_stats[node].samples * (cut.server_forward_flops + cut.server_backward_flops)
        return total

    def train_stats(self) -> StepStats:
        return StepStats.merged(self.node_stats.values())
