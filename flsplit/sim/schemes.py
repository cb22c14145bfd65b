"""Each scheme's traffic model beside its schedule's timing rule: one table keyed by scheme.

A traffic model reads a ``SchemeRound`` (per client the cut, samples, batches and async state;
the wire model, batch size and EPSL's ``phi``) and says what crosses the wire and what the
server runs (``Traffic``): which batches go up, which gradients come down, what is broadcast,
which rows the server forwards and back-propagates. ``SCHEME_MODELS`` pairs each scheme with
its model and its timing rule, the one place either is declared; ``flsplit.sim.traffic.predict_workload``
turns the traffic into a ``RoundWorkload``. A new scheme reuses a model here (or writes its own)
and adds its row with ``register_scheme`` from its own module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Protocol

from flsplit.sim.workload import Timing

__all__ = ["AsyncState", "WireModel", "SCHEME_MODELS", "SchemeModel", "SchemeRound", "Traffic", "register_scheme", "scheme_model",
           "per_client_traffic", "epsl_traffic", "sflga_traffic"]


class AsyncState(str, Enum):
    """Async SL's state of a client in a window (loss-triggered): ``A`` trains step by step
    with the server, ``B`` uploads its smashed data once (no gradient back), ``C`` sends nothing
    (the server trains on its cache). A ``str`` enum: ``AsyncState.A == "A"``."""

    A = "A"
    B = "B"
    C = "C"

    def __str__(self) -> str:  # "A" in logs and f-strings, as enum.StrEnum (Python 3.11+) prints it
        return self.value

    __format__ = str.__format__


class WireModel(Protocol):
    """Bytes on the wire of the pieces of a round (a traffic model's unit costs)."""

    def up(self, cut: int, rows: float) -> float:
        """Bytes of one batch of ``rows`` smashed samples sent up (with its labels)."""

    def down(self, cut: int, rows: float) -> float:
        """Bytes of one unicast gradient of ``rows`` samples."""

    def broadcast(self, cut: int, rows: float) -> float:
        """Bytes of one broadcast gradient of ``rows`` samples."""

    def part(self, cut: int) -> float:
        """Bytes of the client part's weights (sent down at round start and back at the end)."""


@dataclass(frozen=True)
class SchemeRound:
    """What a scheme's traffic model reads: per client the cut, samples, batches (rows) and
    async state; the wire model, the batch size and EPSL's ``phi``."""

    wire: WireModel
    cuts: list[int]
    samples: list[int]
    batches: list[list[int]]
    batch_size: Optional[int]
    phi: float
    states: dict[int, str]

    @property
    def n(self) -> int:
        return len(self.cuts)

    def steps(self):
        """Lockstep steps: per step, the clients with a batch left and their rows."""
        for t in range(max(len(b) for b in self.batches)):
            who = [i for i in range(self.n) if t < len(self.batches[i])]
            yield who, [self.batches[i][t] for i in who]


@dataclass
class Traffic:
    """A scheme's traffic model's answer: bytes per client each way, broadcast bytes, and the
    rows the server forwards / back-propagates per client (plus rows of no one client)."""

    up: list[float]
    down: list[float]
    broadcast: float
    fwd_rows: list[float]
    bwd_rows: list[float]
    extra_bwd: float = 0.0

    @classmethod
    def empty(cls, n: int) -> "Traffic":
        return cls([0.0] * n, [0.0] * n, 0.0, [0.0] * n, [0.0] * n)


def per_client_traffic(r: SchemeRound) -> Traffic:
    """SL, SFL-V1/V2, PSL, async SL: each batch goes up and its gradient comes down (async
    state ``B``: up only, ``C``: nothing sent, the server trains on its cache)."""
    t = Traffic.empty(r.n)
    for i in range(r.n):
        state = r.states.get(i, AsyncState.A)
        if state == AsyncState.A:
            for rows in r.batches[i]:
                t.up[i] += r.wire.up(r.cuts[i], rows)
                t.down[i] += r.wire.down(r.cuts[i], rows)
        elif state == AsyncState.B:
            t.up[i] = sum(r.wire.up(r.cuts[i], rows) for rows in r.batches[i])
        t.fwd_rows[i] = t.bwd_rows[i] = r.samples[i]
    return t


def _lockstep_up(r: SchemeRound, t: Traffic, who: list[int], rows: list[int]) -> None:
    """One lockstep step's uploads: every client's batch goes up and through the server."""
    for i, rw in zip(who, rows):
        t.up[i] += r.wire.up(r.cuts[i], rw)
        t.fwd_rows[i] += rw
        t.bwd_rows[i] += rw


def sflga_traffic(r: SchemeRound) -> Traffic:
    """SFL-GA: lockstep batches up; the unicast gradients are empty, their average is broadcast."""
    t = Traffic.empty(r.n)
    for who, rows in r.steps():
        _lockstep_up(r, t, who, rows)
        for i in who:
            t.down[i] += r.wire.down(r.cuts[i], 0)
        t.broadcast += r.wire.broadcast(r.cuts[who[0]], max(rows))
    return t


def epsl_traffic(r: SchemeRound) -> Traffic:
    """EPSL: lockstep batches up; per step ``m = phi b`` rows' gradients are averaged and
    broadcast, the rest come down unicast; the server back-propagates ``(1 - phi) N b + phi b``."""
    t = Traffic.empty(r.n)
    for who, rows in r.steps():
        _lockstep_up(r, t, who, rows)
        b = min(rows)
        m = (r.phi * b if r.batch_size is None else math.ceil(r.phi * b)) if len(who) > 1 else 0
        for i, rw in zip(who, rows):
            t.down[i] += r.wire.down(r.cuts[i], rw - m)
            t.bwd_rows[i] -= m  # aggregated rows are forwarded without a graph ...
        if m:
            t.broadcast += r.wire.broadcast(r.cuts[who[0]], m)
            # ... and the m mean rows are back-propagated once. Their forward pass is
            # counted with that backward, as the EPSL paper counts it (m / (N b) more
            # forward FLOPs, under phi / N): server backward (1 - phi) N b + phi b.
            t.extra_bwd += m
    return t


@dataclass(frozen=True)
class SchemeModel:
    """A scheme's traffic model and its timing rule (how its clients' chains combine into the
    round latency), declared here once: the runtime prices a measured round with this timing,
    the planners predict a round with this model and timing.

    ``per_client_states``: the traffic depends on each client's state (async SL), which a
    planner without those states cannot price.
    """

    timing: Timing
    traffic: Callable[[SchemeRound], Traffic]
    per_client_states: bool = False


# Each scheme's traffic model beside its timing rule: the one table (a scheme outside
# flsplit adds its row with register_scheme, from its own module).
SCHEME_MODELS: dict[str, SchemeModel] = {
    "sl": SchemeModel(Timing.SEQUENTIAL, per_client_traffic),
    "sflv1": SchemeModel(Timing.PARALLEL, per_client_traffic),
    "sflv2": SchemeModel(Timing.PARALLEL, per_client_traffic),
    "psl": SchemeModel(Timing.PARALLEL, per_client_traffic),
    "epsl": SchemeModel(Timing.PARALLEL, epsl_traffic),
    "sflga": SchemeModel(Timing.PARALLEL, sflga_traffic),
    "async": SchemeModel(Timing.PARALLEL, per_client_traffic, per_client_states=True),
}


def register_scheme(name: str, model: SchemeModel) -> SchemeModel:
    """Add a scheme's row to ``SCHEME_MODELS`` (once; a name may not change its model).

    Example, in a new scheme's module::

        register_scheme("myscheme", SchemeModel(Timing.PARALLEL, per_client_traffic))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a scheme's name is a non-empty string, got {name!r}")
    if not isinstance(model, SchemeModel):
        raise ValueError(f"scheme {name!r}: expected a SchemeModel, got {type(model).__name__}")
    known = SCHEME_MODELS.setdefault(name, model)
    if known != model:
        raise ValueError(f"scheme {name!r} is registered already, with another model")
    return model


def scheme_model(name: str) -> SchemeModel:
    """The registered row of scheme ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return SCHEME_MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"scheme must be one of {sorted(SCHEME_MODELS)}, got {name!r} (a new scheme adds its row "
                         "with flsplit.sim.schemes.register_scheme)") from None
