"""EPSL: parallel split learning with last-layer gradient aggregation."""

from __future__ import annotations

import math
import random

from flwr.app import RecordDict

from flsplit.dataplane import Reply
from flsplit.schedules import Lockstep
from flsplit.server import EPSL_MECHANISMS, EPSL_SCALINGS
from flsplit.strategies.psl import PSL

__all__ = ["EPSL"]


class EPSL(PSL):
    """Efficient parallel split learning (PSL plus last-layer gradient aggregation).

    In every step, at ``ceil(phi * b)`` sample positions the server back-propagates one
    aggregated gradient instead of one per client (``ServerPart.step_epsl`` documents the
    mechanisms; the default: the summed logit gradient back-propagated from the clients'
    mean smashed data, ``1/N`` of the resulting cut-layer gradient to each client). Those
    rows are the same for every client, so they are broadcast once per step. The other
    positions are plain PSL; ``phi = 0`` is PSL exactly, and so is one client with any
    ``phi``, for every mechanism.

    Parameters
    ----------
    phi : float
        Aggregation ratio in [0, 1].
    positions : {"first", "random"}
        Which positions are aggregated: the first ``ceil(phi * b)``, or a subset of that
        size drawn per step from a generator seeded with the run seed.
    mechanism : str
        Where the aggregated gradient is back-propagated (``flsplit.server.EPSL_MECHANISMS``):
        ``mean-activation`` (default), ``client-0``, ``rotating``, ``max-loss``,
        ``gradient-weighted``.
    scaling : {"sum", "mean"}
        The aggregated logit gradient is the clients' sum (default) or mean.
    **kwargs
        See ``PSL`` and ``SplitStrategy``. ``b`` is the smallest batch of the step.
    """

    scheme = "epsl"

    def __init__(self, *args, phi: float = 0.5, positions: str = "first", mechanism: str = "mean-activation",
                 scaling: str = "sum", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= phi <= 1.0 or math.isnan(phi):
            raise ValueError(f"phi must be in [0, 1], got {phi}")
        if positions not in ("first", "random"):
            raise ValueError(f"positions must be 'first' or 'random', got {positions!r}")
        if mechanism not in EPSL_MECHANISMS:
            raise ValueError(f"mechanism must be one of {EPSL_MECHANISMS}, got {mechanism!r}")
        if scaling not in EPSL_SCALINGS:
            raise ValueError(f"scaling must be one of {EPSL_SCALINGS}, got {scaling!r}")
        self.phi = phi
        self.positions = positions
        self.mechanism = mechanism
        self.scaling = scaling
        self._rng = random.Random(self.seed)
        self._steps = 0  # server steps so far, across rounds: where 'rotating' starts

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
        """Sample positions aggregated in a step whose smallest batch has ``batch_size`` samples."""
        m = math.ceil(self.phi * batch_size)
        if self.positions == "first":
            return list(range(m))
        return sorted(self._rng.sample(range(batch_size), m))

    def _step(self, batches):
        smallest = min(b.y.shape[0] for _, b in batches)
        step, self._steps = self._steps, self._steps + 1
        return self.server.step_epsl(batches, self.aggregated_positions(smallest), mechanism=self.mechanism,
                                     scaling=self.scaling, step=step)

    def _train_round(self, server_round: int, requests: dict[int, RecordDict]) -> list[Reply]:
        self.server = self.new_server_part()
        return Lockstep(self._step).run(self, server_round, requests)
