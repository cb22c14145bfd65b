"""Server runtime: the server part of a split model and the server-step rules.

A *server step* takes the smashed batches of the clients in this step and returns, per
client, the gradient of its smashed data. The scheme picks the rule:

``step_each``
    Every batch on its own: forward, loss (mean over that batch), backward, one optimizer
    step per batch, in the given order. SL, SFL-V2 (shared part, arrival order) and SFL-V1
    (each client on its own copy) use it.
``step_union``
    PSL: one forward/backward over the union of all batches with one loss (mean over all
    ``B = sum b_i`` samples) and one optimizer step, exactly what centralized training on the
    concatenated batch does. Client ``i`` receives the gradient of *its own* mean loss,
    i.e. the union gradient of its slice times ``B / b_i``: each client then takes the step
    it would take training alone, and the sample-weighted average of the client parts after
    one step equals centralized training on the concatenated batch.
``step_epsl``
    EPSL: PSL, but at an aggregated sample position ``j`` the clients' logit gradients
    ``g_ij`` are aggregated into ``G_j`` and back-propagated once, from one *linearisation
    point* ``p_j``; the cut-layer rows found there are broadcast. The ``mechanism``
    (``EPSL_MECHANISMS``) picks ``p_j`` from the clients' smashed rows ``s_ij``:

    ``mean-activation``
        ``p_j = (1/N) sum_i s_ij``, the clients' mean smashed data (the gradient of
        the surrogate ``<G_j, f(p_j)>``; each client's input gets ``1/N`` of it).
    ``client-0``
        ``p_j = s_0j``, the first client's smashed data.
    ``rotating``
        ``p_j = s_rj`` with ``r = (step + k) mod N`` for the ``k``-th aggregated
        position: each client represents ``1/N`` of the positions, and the
        assignment moves on by one client per step.
    ``max-loss``
        ``p_j = s_rj`` with ``r`` the client whose sample at ``j`` has the largest
        loss (the first such client on a tie).
    ``gradient-weighted`` (the default)
        ``p_j = sum_i w_ij s_ij`` with ``w_ij = |g_ij| / sum_k |g_kj|`` (the mean when
        every ``g_ij`` is zero). For a last linear layer ``sum_i g_ij h_ij^T`` is
        then exact whenever the clients' logit gradients are parallel.
``step_gradient_average``
    SFL-GA: one PSL step, then one broadcast of the position-wise average gradient.

Clients may enter the server part at different cuts (heterogeneous cuts): the server holds
all blocks from the shallowest cut on and runs a client's smashed data from its own cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from flsplit.model import rng
from flsplit.model.loss import correct, loss_sum, sample_losses
from flsplit.wire.protocol import SmashedBatch
from flsplit.model.splitting import SplitModel
from flsplit.runtime.optim import build_optimizer, load_state_tensors, state_tensors

__all__ = ["EPSL_MECHANISMS", "EPSL_SCALINGS", "ServerPart", "StepGrads", "StepStats", "evaluate_smashed", "gradient_average"]

# Where EPSL back-propagates an aggregated logit gradient (ServerPart.step_epsl), and how it scales it.
EPSL_MECHANISMS = ("mean-activation", "client-0", "rotating", "max-loss", "gradient-weighted")
EPSL_SCALINGS = ("sum", "mean")


@dataclass
class StepStats:
    """Running training loss and accuracy seen by the server."""

    loss_sum: float = 0.0
    correct: float = 0.0  # samples predicted right (a sequence counts its fraction of right positions)
    samples: int = 0
    per_cut_samples: dict[int, int] = field(default_factory=dict)

    def add(self, loss_sum: float, logits: torch.Tensor, y: torch.Tensor, cut: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct(logits, y)
        self.samples += int(y.shape[0])
        self.per_cut_samples[cut] = self.per_cut_samples.get(cut, 0) + int(y.shape[0])

    def add_reported(self, loss_sum: float, correct: float, rows: int, cut: int) -> None:
        """A U-shaped split's batch, whose loss the client computed and reported."""
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += rows
        self.per_cut_samples[cut] = self.per_cut_samples.get(cut, 0) + rows

    @classmethod
    def merged(cls, parts: "Iterable[StepStats]") -> "StepStats":
        """The statistics of several trainers (server copies, clients) pooled."""
        out = cls()
        for part in parts:
            out.loss_sum += part.loss_sum
            out.correct += part.correct
            out.samples += part.samples
            for cut, n in part.per_cut_samples.items():
                out.per_cut_samples[cut] = out.per_cut_samples.get(cut, 0) + n
        return out

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


@dataclass
class ServerWork:
    """Sample rows the server forwarded and back-propagated, per entry cut (the FLOPs it ran).

    EPSL counts as its paper does: an aggregated position's ``N`` rows are forwarded (without
    a graph) and its one mean row is back-propagated (its forward counted with it).
    """

    rows: dict[int, list[int]] = field(default_factory=dict)  # cut -> [forward, backward]
    end: Optional[int] = None  # a U-shaped split's tail cut: the rows ran blocks [cut, end) only

    def add(self, cut: int, forward: int, backward: int) -> None:
        entry = self.rows.setdefault(int(cut), [0, 0])
        entry[0] += int(forward)
        entry[1] += int(backward)

    def flops(self, profile) -> float:
        """FLOPs of these rows under ``profile`` (a ``flsplit.model.profile.ModelProfile``)."""
        tail = profile.cut(self.end) if self.end else None  # the client's blocks, not run here
        total = 0.0
        for cut, (fwd, bwd) in sorted(self.rows.items()):
            cp = profile.cut(cut)
            total += fwd * cp.server_forward_flops + bwd * cp.server_backward_flops
            if tail is not None:
                total -= fwd * tail.server_forward_flops + bwd * tail.server_backward_flops
        return total


@dataclass
class StepGrads:
    """What one lockstep server step sends back.

    ``unicast[i]`` are the gradient rows client ``i`` gets alone. If ``broadcast`` is set,
    it goes to every client; client ``i`` puts its first ``len(positions[i])`` rows at the
    sample positions ``positions[i]`` (multiplied by ``scales[i]``), and ``unicast[i]`` holds
    its other rows, in order.
    """

    unicast: list[torch.Tensor]
    broadcast: Optional[torch.Tensor] = None
    positions: list[list[int]] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


def resolve_device(spec: str | torch.device) -> torch.device:
    """The server part's device from ``server-device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    or ``"auto"`` (the first CUDA device when torch sees one, else the CPU).

    Raises ``ValueError`` naming the key for anything else, and for a CUDA device torch
    cannot see.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"server-device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"server-device {spec!r}: torch sees {count} CUDA device(s) on this machine "
                             "(use 'auto' to fall back to the CPU)")
    return device


class ServerPart:
    """Blocks ``[entry, L)`` of a split model with their optimizer (``[entry, end)`` in a
    U-shaped split, whose later blocks and loss are the client's).

    Parameters
    ----------
    model : SplitModel
        The model; this object trains its blocks from ``entry`` on (the blocks before
        ``entry`` are never touched here).
    entry : int
        Shallowest cut served: clients with cut ``c >= entry`` enter at block ``c``.
    end : int, optional
        A U-shaped split's tail cut: the part runs blocks up to it and hands its output to the
        client (``forward_middle``, ``backward_middle``); ``None``: to the last block and the loss.
    work : ServerWork, optional
        Where the rows this part runs are counted (shared by a round's server copies).
    learning_rate, momentum, weight_decay : float
        SGD settings.

    The part runs on its model's device (``server-device``): smashed batches arrive on the
    CPU, as decoded, and are moved there; the gradients it returns are on the CPU again.
    """

    def __init__(
        self,
        model: SplitModel,
        entry: int,
        learning_rate: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        work: Optional[ServerWork] = None,
        optimizer: str = "sgd",
        end: Optional[int] = None,
    ) -> None:
        self.model = model
        self.work = work if work is not None else ServerWork()
        self.entry = model.check_cut(entry)
        self.end = model.check_cut(end) if end else None
        if self.end is not None and self.end <= self.entry:
            raise ValueError(f"a U-shaped server part needs its end {end} after its entry {entry}")
        if self.end is not None:
            self.work.end = self.end
        self.loss_fn = loss_sum  # summed over the samples (flsplit.model.loss: classes or sequences)
        trained = [q for q in model.blocks[entry : self.end].parameters() if q.requires_grad]  # not LoRA's base weights
        self.optimizer = build_optimizer(trained, optimizer, learning_rate, momentum, weight_decay)
        self.stats = StepStats()
        self._middle: Optional[tuple[list[tuple[int, int]], list[torch.Tensor], list[torch.Tensor]]] = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.blocks.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.blocks.parameters()).device

    def _on_device(self, batches: list[tuple[int, SmashedBatch]]) -> list[tuple[int, SmashedBatch]]:
        device = self.device  # .to() of a tensor already there is the tensor itself: no copy on the CPU
        return [(cut, SmashedBatch(b.x.to(device), None if b.y is None else b.y.to(device))) for cut, b in batches]

    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        end = self.end or self.model.num_blocks
        return {name: param for name, param in self.model.blocks.named_parameters()
                if self.entry <= int(name.split(".", 1)[0]) < end and param.requires_grad}

    def momentum_state(self) -> dict[str, torch.Tensor]:
        """The optimizer's state by parameter name (SGD's momentum buffers, AdamW's moments
        and step counts: ``flsplit.runtime.optim.state_tensors``)."""
        return state_tensors(self.optimizer, self._named_parameters())

    def load_momentum(self, state: dict[str, torch.Tensor]) -> None:
        """Start from this optimizer state (``carry-momentum``); a parameter this part does not
        train, or one whose shape changed, starts fresh."""
        load_state_tensors(self.optimizer, self._named_parameters(), state, copy=True)  # the strategy keeps ``state``

    def _forward(self, cut: int, x: torch.Tensor) -> torch.Tensor:
        if cut < self.entry:
            raise ValueError(f"cut {cut} is shallower than this server part's entry {self.entry}")
        with rng.shared():  # dropout masks not interleaved with a client thread's (flsplit.model.rng)
            return self.model.blocks[cut : self.end](x)

    # ------------------------------------------------------------------ U-shaped splits
    def forward_middle(self, batches: list[tuple[int, SmashedBatch]]) -> list[torch.Tensor]:
        """A U-shaped step's first half: this part's output for each ``(cut, batch)`` (one
        forward over the batches of each cut, as ``step_union``), kept with its graph until
        ``backward_middle``; the outputs returned are detached, on the CPU."""
        if self.end is None:
            raise ValueError("forward_middle is a U-shaped split's: this server part runs to the loss")
        if self._middle is not None:
            raise RuntimeError("a U-shaped step is already in flight on this server part")
        on_device = self._on_device(batches)
        self.model.blocks.train()
        xs = [b.x.detach().requires_grad_(True) for _, b in on_device]
        outs: list[Optional[torch.Tensor]] = [None] * len(batches)
        for cut in sorted({c for c, _ in batches}):
            idx = [i for i, (c, _) in enumerate(batches) if c == cut]
            out = self._forward(cut, torch.cat([xs[i] for i in idx]))
            for i, chunk in zip(idx, out.split([xs[i].shape[0] for i in idx])):
                outs[i] = chunk
        self._middle = ([(c, b.rows) for c, b in batches], xs, outs)
        return [o.detach().cpu() for o in outs]

    def backward_middle(self, tail_grads: list[torch.Tensor], reported: list[tuple[float, float]],
                        union: bool = False) -> list[torch.Tensor]:
        """A U-shaped step's second half: back-propagate the clients' gradients at this part's
        output (each of its client's mean loss), step, and return each batch's cut-layer
        gradient (of its client's mean loss). With ``union`` (PSL) the step is one over the
        union of the batches: the loss is the mean over all their samples, as in ``step_union``.
        A ``None`` gradient is a client that dropped between the step's two exchanges: the step
        is the one over the other batches, and its entry in the result is ``None``."""
        if self._middle is None:
            raise RuntimeError("backward_middle without a forward_middle in flight")
        (cuts_rows, xs, outs), self._middle = self._middle, None
        kept = [i for i, g in enumerate(tail_grads) if g is not None]  # None: that client dropped mid-step
        if not kept:
            return [None] * len(tail_grads)
        total = sum(cuts_rows[i][1] for i in kept)
        shares = {i: cuts_rows[i][1] / total if union else 1.0 for i in kept}
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([outs[i] for i in kept], [tail_grads[i].to(outs[i].device) * shares[i] for i in kept])
        self.optimizer.step()
        for i in kept:
            (cut, rows), (loss, right) = cuts_rows[i], reported[i]
            self.stats.add_reported(loss, right, rows, cut)
            self.work.add(cut, rows, rows)
        return [(xs[i].grad / shares[i]).cpu() if i in shares else None for i in range(len(xs))]

    def abandon_middle(self) -> None:
        """Forget a U-shaped step in flight (its client dropped): nothing is stepped."""
        self._middle = None

    def step_each(self, batches: list[tuple[int, SmashedBatch]], input_grad: bool = True) -> list[torch.Tensor]:
        """Train on each ``(cut, batch)`` in turn; return each batch's smashed-data gradient
        (``None`` with ``input_grad=False``, when no client needs it)."""
        self.model.blocks.train()
        grads = []
        for cut, batch in self._on_device(batches):
            x = batch.x.detach().requires_grad_(input_grad)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self._forward(cut, x)
            loss_sum = self.loss_fn(logits, batch.y)
            (loss_sum / batch.y.shape[0]).backward()
            self.optimizer.step()
            self.stats.add(float(loss_sum.detach()), logits.detach(), batch.y, cut)
            self.work.add(cut, batch.y.shape[0], batch.y.shape[0])
            grads.append(x.grad.cpu() if x.grad is not None else None)
        return grads

    def step_union(self, batches: list[tuple[int, SmashedBatch]]) -> list[torch.Tensor]:
        """One PSL step over the union of ``(cut, batch)``; gradients of each client's own mean loss."""
        batches = self._on_device(batches)
        self.model.blocks.train()
        self.optimizer.zero_grad(set_to_none=True)
        xs = [b.x.detach().requires_grad_(True) for _, b in batches]
        total = sum(b.y.shape[0] for _, b in batches)
        # Same-cut batches are concatenated so the server runs one forward per cut.
        logits: list[torch.Tensor | None] = [None] * len(batches)
        for cut in sorted({c for c, _ in batches}):
            idx = [i for i, (c, _) in enumerate(batches) if c == cut]
            out = self._forward(cut, torch.cat([xs[i] for i in idx]))
            for i, chunk in zip(idx, out.split([batches[i][1].y.shape[0] for i in idx])):
                logits[i] = chunk
        all_logits = torch.cat(logits)
        all_y = torch.cat([b.y for _, b in batches])
        loss_sum = self.loss_fn(all_logits, all_y)
        (loss_sum / total).backward()
        self.optimizer.step()
        for (cut, b), lg in zip(batches, logits):
            self.stats.add(float(self.loss_fn(lg.detach(), b.y)), lg.detach(), b.y, cut)
            self.work.add(cut, b.y.shape[0], b.y.shape[0])
        return [(x.grad * (total / b.y.shape[0])).cpu() for x, (_, b) in zip(xs, batches)]

    def step_epsl(self, batches: list[tuple[int, SmashedBatch]], positions: list[int] | list[list[int]],
                  mechanism: str = "gradient-weighted", scaling: str = "sum", step: int = 0) -> StepGrads:
        """EPSL: PSL with last-layer gradient aggregation at the sample ``positions``.

        At an aggregated position ``j`` the server does not back-propagate the ``N`` clients'
        samples one by one. It computes each client's logit gradient ``g_ij = dL/dz_ij`` (a
        forward pass without graph), aggregates them into ``G_j``, forwards one *linearisation
        point* ``p_j`` through the server part and back-propagates ``G_j`` once from there: the
        server's parameters get ``J_theta(p_j)^T G_j`` and every client the same cut-layer rows
        ``J_s(p_j)^T G_j / N`` (``sum`` scaling) or ``J_s(p_j)^T G_j`` (``mean`` scaling), so
        they are broadcast. The other positions are plain PSL. Server back-propagation shrinks
        from ``N*b`` to ``(N - 1)*(b - m) + b`` samples for ``m = len(positions)`` (the papers'
        ``(1-phi)*N*b + phi*b``) whatever the mechanism.

        Parameters
        ----------
        batches : list of (cut, SmashedBatch)
            One batch per client, in client order (client ``0`` first).
        positions : list of int, or one list of int per client
            Aggregated sample positions: the same rows of every client, or client ``i``'s
            rows ``positions[i]`` (all of one length ``m``, distinct, inside its batch). The
            ``k``-th aggregated row of every client is aggregated together; this is how
            ``EPSL(positions="matched")`` aggregates rows that share a label.
        mechanism : str
            The linearisation point ``p_j``, one of ``EPSL_MECHANISMS`` (the module's
            docstring says how each picks it); ``gradient-weighted`` by default.
        scaling : {"sum", "mean"}
            ``sum``: ``G_j = sum_i g_ij`` (the server's parameters get the weight of ``N``
            samples at ``j``, as in PSL), each client ``1/N`` of the cut-layer gradient.
            ``mean``: ``G_j = (1/N) sum_i g_ij`` (the aggregated position counts as one
            sample for the server's parameters); the clients' rows are the same as with
            ``sum``.
        step : int
            The step counter ``rotating`` reads.

        The loss is PSL's (mean over all ``B`` samples); each client's rows are scaled by
        ``B / b_i`` as in ``step_union`` (the broadcast rows through ``scales``). All clients
        must share one cut. With one client or no positions this is exactly ``step_union``,
        for every mechanism and scaling.
        """
        if mechanism not in EPSL_MECHANISMS:
            raise ValueError(f"EPSL mechanism must be one of {EPSL_MECHANISMS}, got {mechanism!r}")
        if scaling not in EPSL_SCALINGS:
            raise ValueError(f"EPSL scaling must be one of {EPSL_SCALINGS}, got {scaling!r}")
        per_client = bool(positions) and not isinstance(positions[0], int)
        if not positions or (per_client and not any(positions)) or len(batches) == 1:
            return StepGrads(self.step_union(batches))
        cut = _one_cut(batches, "EPSL aggregation")
        sizes = [b.y.shape[0] for _, b in batches]
        rows = _per_client_positions(positions, sizes)
        total = sum(sizes)
        batches, device = self._on_device(batches), self.device
        self.model.blocks.train()
        self.optimizer.zero_grad(set_to_none=True)
        aggs = [torch.tensor(r, device=device) for r in rows]
        keep = [torch.ones(s, dtype=torch.bool, device=device).index_fill_(0, a, False) for s, a in zip(sizes, aggs)]
        xs, logits = self._epsl_plain_rows(cut, batches, keep, total)
        agg_logits, broadcast = self._epsl_aggregated_rows(cut, batches, aggs, total, mechanism, scaling, step)
        self.optimizer.step()
        self._epsl_record(cut, batches, keep, aggs, logits, agg_logits)
        return StepGrads(
            unicast=[(x.grad * (total / s)).cpu() for x, s in zip(xs, sizes)],
            broadcast=broadcast.cpu(),
            positions=[list(r) for r in rows],
            scales=[total / s for s in sizes],
        )

    def _epsl_plain_rows(self, cut: int, batches: list[tuple[int, SmashedBatch]], keep: list[torch.Tensor],
                         total: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``step_epsl``'s plain PSL part: the ``keep`` rows of every client, one forward and
        backward (loss over ``total`` samples); the leaf inputs (their ``.grad`` set) and the logits."""
        xs = [b.x[k].detach().requires_grad_(True) for (_, b), k in zip(batches, keep)]
        ys = [b.y[k] for (_, b), k in zip(batches, keep)]
        logits = self._forward(cut, torch.cat(xs))
        loss_sum = self.loss_fn(logits, torch.cat(ys))
        (loss_sum / total).backward()
        return xs, logits

    def _epsl_aggregated_rows(self, cut: int, batches: list[tuple[int, SmashedBatch]], aggs: list[torch.Tensor],
                              total: int, mechanism: str, scaling: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``step_epsl``'s aggregated part: per-client logit gradients at the ``aggs`` rows,
        aggregated and back-propagated once from the linearisation points; the ``(N*m, C)``
        logits and the broadcast cut-layer rows."""
        with torch.no_grad():
            agg_x = torch.stack([b.x[a] for (_, b), a in zip(batches, aggs)])  # (N, m, ...)
            agg_y = torch.stack([b.y[a] for (_, b), a in zip(batches, aggs)])
            agg_logits = self._forward(cut, agg_x.flatten(0, 1))
        n, m = agg_x.shape[:2]
        z = agg_logits.detach().requires_grad_(True)
        agg_loss = self.loss_fn(z, agg_y.flatten(0, 1))
        (agg_loss / total).backward()
        per_client = z.grad.unflatten(0, (n, m))  # g_ij
        summed = per_client.sum(0)
        point = self._epsl_point(mechanism, agg_x, agg_logits.unflatten(0, (n, m)), agg_y, per_client, step)
        point.requires_grad_(True)
        if scaling == "sum":
            self._forward(cut, point).backward(summed)
            broadcast = point.grad / n
        else:
            self._forward(cut, point).backward(summed / n)
            broadcast = point.grad
        return agg_logits, broadcast

    def _epsl_record(self, cut: int, batches: list[tuple[int, SmashedBatch]], keep: list[torch.Tensor],
                     aggs: list[torch.Tensor], logits: torch.Tensor, agg_logits: torch.Tensor) -> None:
        """Count ``step_epsl``'s statistics (each client's logits put back in batch order) and rows."""
        n, m = len(batches), len(aggs[0])
        total = sum(b.y.shape[0] for _, b in batches)
        for i, ((c, b), k) in enumerate(zip(batches, keep)):
            lg = torch.empty(b.y.shape[0], *logits.shape[1:], dtype=logits.dtype, device=logits.device)
            lg[k] = logits.detach().split([int(kk.sum()) for kk in keep])[i]
            lg[aggs[i]] = agg_logits.unflatten(0, (n, m))[i]
            self.stats.add(float(self.loss_fn(lg, b.y)), lg, b.y, c)
        # Rows run: every sample forwarded once; the kept rows and the m aggregated rows backward.
        self.work.add(cut, total, total - n * m + m)

    @staticmethod
    def _epsl_point(mechanism: str, agg_x: torch.Tensor, agg_logits: torch.Tensor, agg_y: torch.Tensor,
                    per_client: torch.Tensor, step: int) -> torch.Tensor:
        """The ``(m, ...)`` linearisation points of ``step_epsl`` from the ``(N, m, ...)``
        smashed rows, logits, labels and logit gradients at the aggregated positions (a new
        tensor, detached)."""
        n, m = agg_x.shape[:2]
        cols = torch.arange(m, device=agg_x.device)
        if mechanism == "mean-activation":
            return agg_x.mean(0)
        if mechanism == "client-0":
            return agg_x[0].clone()
        if mechanism == "rotating":
            return agg_x[(cols + step) % n, cols]
        if mechanism == "max-loss":
            losses = sample_losses(agg_logits.flatten(0, 1), agg_y.flatten(0, 1))
            return agg_x[losses.view(n, m).argmax(0), cols]  # argmax: the first maximum on a tie
        # gradient-weighted
        norms = per_client.flatten(2).norm(dim=2)  # (N, m)
        weights = norms / norms.sum(0)
        weights = torch.where(norms.sum(0) > 0, weights, torch.full_like(weights, 1.0 / n))
        return (weights.view(n, m, *([1] * (agg_x.dim() - 2))).to(agg_x.dtype) * agg_x).sum(0)

    def step_gradient_average(self, batches: list[tuple[int, SmashedBatch]]) -> StepGrads:
        """SFL-GA: one PSL step, then one broadcast of the position-wise average gradient.

        Each client's cut-layer gradient (of its own mean loss, as in ``step_union``) is
        averaged position by position, weighted by batch share: row ``j`` of the aggregate is
        ``sum_i b_i g_i[j] / sum_i b_i`` over the clients whose batch has a row ``j``. With
        unequal batch sizes the aggregate has ``max b_i`` rows and a client uses the first
        ``b_i`` (a client with a short last batch reads the rows it has). All clients must
        share one cut (the gradients must have one shape).
        """
        _one_cut(batches, "gradient aggregation")
        return gradient_average(self.step_union(batches))


def gradient_average(grads: list[torch.Tensor]) -> StepGrads:
    """SFL-GA's broadcast: the clients' cut-layer gradients averaged position by position,
    weighted by batch share (``ServerPart.step_gradient_average``; also a U-shaped SFL-GA step's,
    on the gradients ``backward_middle`` returns)."""
    if len({tuple(g.shape[1:]) for g in grads}) > 1:
        raise ValueError("gradient aggregation needs one cut for all clients (one smashed shape)")
    rows = max(g.shape[0] for g in grads)
    weighted = torch.zeros((rows, *grads[0].shape[1:]), dtype=grads[0].dtype)
    weights = torch.zeros(rows, dtype=grads[0].dtype)
    for g in grads:
        weighted[: g.shape[0]] += g.shape[0] * g
        weights[: g.shape[0]] += g.shape[0]
    aggregate = weighted / weights.view(-1, *([1] * (weighted.dim() - 1)))
    return StepGrads(
        unicast=[g[:0] for g in grads],
        broadcast=aggregate,
        positions=[list(range(g.shape[0])) for g in grads],
        scales=[1.0] * len(grads),
    )


@torch.no_grad()
def evaluate_smashed(model: SplitModel, cut: int, batches: list[SmashedBatch]) -> tuple[float, float, int]:
    """Finish the forward pass of smashed evaluation batches (eval mode).

    Returns the summed loss, the samples predicted right and the samples (``flsplit.model.loss``).
    """
    server = model.blocks[model.check_cut(cut) :]
    device = next(model.blocks.parameters()).device
    was_training = server.training
    server.eval()
    total, right, n = 0.0, 0.0, 0
    for b in batches:
        x, y = b.x.to(device), b.y.to(device)
        logits = server(x)
        total += float(loss_sum(logits, y))
        right += correct(logits, y)
        n += int(b.y.shape[0])
    server.train(was_training)
    return total, right, n


def _one_cut(batches: list[tuple[int, SmashedBatch]], rule: str) -> int:
    """The one cut all ``batches`` share, or a ``ValueError`` naming the ``rule`` that needs it."""
    cuts = {c for c, _ in batches}
    if len(cuts) != 1:
        raise ValueError(f"{rule} needs one cut for all clients, got {sorted(cuts)}")
    return next(iter(cuts))


def _per_client_positions(positions: list[int] | list[list[int]], sizes: list[int]) -> list[list[int]]:
    """``step_epsl``'s aggregated rows as one list per client, checked (``ValueError``)."""
    if all(isinstance(p, int) for p in positions):
        if max(positions) >= min(sizes):
            raise ValueError(f"aggregated position {max(positions)} outside the smallest batch ({min(sizes)})")
        return [list(positions)] * len(sizes)
    rows = [list(p) for p in positions]
    if len(rows) != len(sizes) or len({len(r) for r in rows}) != 1:
        raise ValueError(f"per-client aggregated positions need one list of one length per client "
                         f"({len(sizes)} clients), got lengths {[len(r) for r in rows]}")
    for i, (r, size) in enumerate(zip(rows, sizes)):
        if len(set(r)) != len(r) or not all(isinstance(j, int) and 0 <= j < size for j in r):
            raise ValueError(f"client {i}'s aggregated positions {r} are not distinct rows of its batch of {size}")
    return rows
