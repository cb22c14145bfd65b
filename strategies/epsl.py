"""EPSL: parallel split learning with last-layer gradient aggregation."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import RecordDict

from flsplit.planes.dataplane import Reply
from flsplit.runtime.schedules import Lockstep
from flsplit.runtime.server import EPSL_MECHANISMS, EPSL_SCALINGS
from flsplit.strategies.psl import PSL

__all__ = ["EPSL", "label_matched_positions", "POSITIONS"]

POSITIONS = ("first", "random", "matched")


class EPSL(PSL):
    """Efficient parallel split learning (PSL plus last-layer gradient aggregation).

    In every step, at ``ceil(phi * b)`` sample positions the server back-propagates one
    aggregated gradient instead of one per client (``ServerPart.step_epsl`` documents the
    mechanisms; the default: the summed logit gradient back-propagated from the clients'
    smashed data weighted by the norms of their logit gradients, ``1/N`` of the resulting
    cut-layer gradient to each client). Those
    rows are the same for every client, so they are broadcast once per step. The other
    positions are plain PSL; ``phi = 0`` is PSL exactly, and so is one client with any
    ``phi``, for every mechanism.

    Parameters
    ----------
    phi : float
        Aggregation ratio in [0, 1].
    positions : {"first", "random", "matched"}
        Which rows are aggregated: the first ``ceil(phi * b)`` of every client, a subset of
        that size drawn per step from a generator seeded with the run seed (the same rows of
        every client), or ``matched``: per client, rows chosen so that the ``N`` rows
        aggregated together share a label wherever the batches allow
        (``label_matched_positions``). The server has the labels; each client learns its
        rows from the broadcast's ``positions.k`` as with the other choices.
    mechanism : str
        Where the aggregated gradient is back-propagated (``flsplit.runtime.server.EPSL_MECHANISMS``):
        ``gradient-weighted`` (default: the best overall in ``benchmarks/RESULTS.md``
        section 12), ``mean-activation``, ``client-0``, ``rotating``, ``max-loss``.
    scaling : {"sum", "mean"}
        The aggregated logit gradient is the clients' sum (default) or mean.
    **kwargs
        See ``PSL`` and ``SplitStrategy``. ``b`` is the smallest batch of the step.
    """

    scheme = "epsl"
    u_shape_refusal = ("EPSL aggregates the clients' gradients at the server's last layer, and in a U-shaped split the "
                       "last layer, the logits and the loss are on the clients: the server has nothing to aggregate")

    def __init__(self, *args, phi: float = 0.5, positions: str = "first", mechanism: str = "gradient-weighted",
                 scaling: str = "sum", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= phi <= 1.0 or math.isnan(phi):
            raise ValueError(f"phi must be in [0, 1], got {phi}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if mechanism not in EPSL_MECHANISMS:
            raise ValueError(f"mechanism must be one of {EPSL_MECHANISMS}, got {mechanism!r}")
        if scaling not in EPSL_SCALINGS:
            raise ValueError(f"scaling must be one of {EPSL_SCALINGS}, got {scaling!r}")
        self.phi = phi
        self.positions = positions
        self.mechanism = mechanism
        self.scaling = scaling
        self._rng = random.Random(self.settings.seed)
        self._steps = 0  # server steps so far, across rounds: where 'rotating' starts

    @classmethod
    def run_config_options(cls, config: Mapping[str, Any]) -> dict:
        """``phi``, ``aggregated-positions``, ``epsl-mechanism`` and ``epsl-scaling``."""
        return {"phi": float(config["phi"]), "positions": str(config["aggregated-positions"]),
                "mechanism": str(config["epsl-mechanism"]), "scaling": str(config["epsl-scaling"])}

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "phi": self.phi, "positions": self.positions,
                "mechanism": self.mechanism, "scaling": self.scaling}

    def checkpoint_state(self) -> dict:
        version, internal, gauss = self._rng.getstate()  # random positions draw on across rounds
        return {**super().checkpoint_state(), "positions_rng": [version, list(internal), gauss], "steps": self._steps}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        version, internal, gauss = state["positions_rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._steps = int(state.get("steps", 0))  # absent in checkpoints from before the mechanisms

    def aggregated_positions(self, batch_size: int) -> list[int]:
        """Sample positions aggregated in a step whose smallest batch has ``batch_size`` samples
        (``first`` and ``random``; ``matched`` reads the labels, see ``label_matched_positions``)."""
        m = math.ceil(self.phi * batch_size)
        if self.positions == "first":
            return list(range(m))
        return sorted(self._rng.sample(range(batch_size), m))

    def _step(self, batches):
        smallest = min(b.y.shape[0] for _, b in batches)
        step, self._steps = self._steps, self._steps + 1
        if self.positions == "matched":
            rows = label_matched_positions([b.y for _, b in batches], math.ceil(self.phi * smallest))
        else:
            rows = self.aggregated_positions(smallest)
        return self.server.step_epsl(batches, rows, mechanism=self.mechanism, scaling=self.scaling, step=step)

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return Lockstep(self._step).run(self.round, requests)


def label_matched_positions(labels: list[torch.Tensor], m: int) -> list[list[int]]:
    """Per client, ``m`` rows of its batch to aggregate, slot ``k`` of every client together,
    such that the rows of a slot share a label as often as the batches allow.

    Every slot is given a label, one at a time, to the label that most clients can still
    fill (the number of agreeing rows is a sum of concave functions of the slots per label,
    so this greedy choice maximises it; ties go to the smaller label). A client fills a
    label's slots with its rows of that label in batch order, and the slots it cannot fill
    with its remaining rows in batch order. Deterministic: the same labels give the same rows.

    Parameters
    ----------
    labels : list of 1-D integer tensors
        Each client's labels, in batch order; every batch has at least ``m`` rows.
    m : int
        Aggregated rows per client.

    Returns
    -------
    list of list of int
        ``rows[i][k]``: client ``i``'s row in slot ``k``.
    """
    ys = [y.tolist() for y in labels]
    if any(len(y) < m for y in ys):
        raise ValueError(f"every batch needs at least {m} rows to aggregate, got {[len(y) for y in ys]}")
    counts = [Counter(y) for y in ys]
    slots: Counter = Counter()  # label -> slots given to it
    order: list[int | None] = []  # slot k's label (None: no client has a row left to match)
    for _ in range(m):
        gains = Counter({c: sum(cnt[c] > slots[c] for cnt in counts) for cnt in counts for c in cnt})
        best = min(gains, key=lambda c: (-gains[c], c)) if gains and max(gains.values()) > 0 else None
        order.append(best)
        if best is not None:
            slots[best] += 1
    rows = []
    for y in ys:
        by_label: dict[int, list[int]] = {}
        for j, c in enumerate(y):
            by_label.setdefault(c, []).append(j)
        chosen: list[int | None] = [by_label[c].pop(0) if c is not None and by_label.get(c) else None for c in order]
        used = set(j for j in chosen if j is not None)
        rest = iter(j for j in range(len(y)) if j not in used)
        rows.append([j if j is not None else next(rest) for j in chosen])
    return rows
