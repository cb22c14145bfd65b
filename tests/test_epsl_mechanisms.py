"""EPSL's aggregation mechanisms (``ServerPart.step_epsl``'s ``mechanism`` and ``scaling``).

Every mechanism keeps EPSL's defining properties: phi = 0 and one client are PSL bit for bit,
the server back-propagates ``(1-phi)*N*b + phi*b`` rows, and the aggregated rows are one
broadcast. Each mechanism's two-client step is checked against plain torch on a tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flsplit.wire.protocol import SmashedBatch
from flsplit.runtime.server import EPSL_MECHANISMS, EPSL_SCALINGS, ServerPart
from flsplit.model.splitting import SplitModel
from flsplit.strategies import EPSL, PSL
from tests.helpers import max_abs_diff, model_fn, random_data, run_strategy

VARIANTS = [(m, s) for m in EPSL_MECHANISMS for s in EPSL_SCALINGS]


@pytest.mark.parametrize("mechanism", EPSL_MECHANISMS)
def test_phi_zero_is_psl_bit_for_bit(mechanism):
    parts = [random_data(12, seed=1), random_data(12, seed=2), random_data(10, seed=3)]
    kwargs = dict(cut_layer=3, batch_size=4, num_rounds=2, shuffle=True)
    _, psl, _ = run_strategy(PSL, parts, **kwargs)
    for scaling in EPSL_SCALINGS:
        _, epsl, _ = run_strategy(EPSL, parts, phi=0.0, mechanism=mechanism, scaling=scaling, **kwargs)
        assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0


@pytest.mark.parametrize("mechanism", EPSL_MECHANISMS)
def test_one_client_is_psl_bit_for_bit(mechanism):
    data = [random_data(16, seed=4)]
    kwargs = dict(cut_layer=5, batch_size=8, num_rounds=2)
    _, psl, _ = run_strategy(PSL, data, **kwargs)
    for scaling in EPSL_SCALINGS:
        _, epsl, _ = run_strategy(EPSL, data, phi=0.5, positions="random", mechanism=mechanism, scaling=scaling, **kwargs)
        assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0


def _digits_batches(n: int, b: int, seed: int = 0, classes: int = 10) -> list[tuple[int, SmashedBatch]]:
    g = torch.Generator().manual_seed(seed)
    return [(6, SmashedBatch(torch.randn(b, 512, dtype=torch.float64, generator=g),
                             torch.randint(0, classes, (b,), generator=g)))
            for _ in range(n)]


def _server_mm_flops(step):
    """Run ``step(part)`` on a fresh server part at cut 6 of the digits CNN (Linear, ReLU,
    Linear: forward is addmm, backward is mm); the part, the step's result and torch's mm
    FLOPs, i.e. the server's back-propagation."""
    part = ServerPart(model_fn(), 6, 0.1)
    with FlopCounterMode(display=False) as counter:
        out = step(part)
    return part, out, counter.get_flop_counts()["Global"][torch.ops.aten.mm]


@pytest.mark.parametrize("mechanism,scaling", VARIANTS)
@pytest.mark.parametrize("phi", [0.25, 0.5, 1.0])
def test_server_backward_rows_and_flops(mechanism, scaling, phi):
    """Server part = Linear, ReLU, Linear (cut 6 of the digits CNN): forward is addmm,
    backward is mm, so torch's mm FLOPs are the server's back-propagation."""
    n, b = 4, 8
    m = math.ceil(phi * b)
    batches = _digits_batches(n, b)
    _, _, psl = _server_mm_flops(lambda part: part.step_union(batches))
    part, out, epsl = _server_mm_flops(lambda part: part.step_epsl(batches, list(range(m)), mechanism=mechanism, scaling=scaling, step=3))
    assert epsl / psl == pytest.approx(((1 - phi) * n * b + phi * b) / (n * b), rel=1e-12)
    assert part.work.rows == {6: [n * b, (n - 1) * (b - m) + b]}  # (1-phi)*N*b + phi*b with m = phi*b
    assert out.broadcast.shape == (m, 512) and out.positions == [list(range(m))] * n
    assert all(u.shape == (b - m, 512) for u in out.unicast)


def _tiny_model() -> SplitModel:
    """Client: Linear(2, 2); server: Linear(2, 3), Tanh, Linear(3, 2) (cut 1), float64, fixed."""
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    return SplitModel(net.double())


# Two clients, three samples each; positions 0 and 2 aggregated. Chosen so that max-loss picks
# client 1 at position 0 and client 0 at position 2 (rotating at step 1, not at step 0), and
# the logit-gradient norms differ.
S = [torch.tensor([[1.0, -0.5], [0.3, 0.8], [-1.2, 0.4]], dtype=torch.float64),
     torch.tensor([[-0.7, 1.1], [0.9, -0.2], [0.5, 1.5]], dtype=torch.float64)]
Y = [torch.tensor([1, 1, 1]), torch.tensor([1, 0, 1])]
POSITIONS, LR = [0, 2], 0.1


def _reference(mechanism: str, scaling: str, step: int, rows: list[list[int]] | None = None):
    """The step in plain torch: new server parameters, unicast and broadcast rows. Client
    ``i`` aggregates its rows ``rows[i]`` (default ``POSITIONS`` for both), slot ``k`` of
    every client together."""
    rows = rows or [POSITIONS, POSITIONS]
    params = [p.detach().clone().requires_grad_(True) for p in list(_tiny_model().blocks.parameters())[2:]]
    w1, b1, w2, b2 = params

    def f(s):
        return torch.tanh(s @ w1.T + b1) @ w2.T + b2

    n, total = 2, 6
    grads = [torch.zeros_like(p) for p in params]
    unicast = []
    for i in range(n):
        kept = [j for j in range(3) if j not in rows[i]]
        s = S[i][kept].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(f(s), Y[i][kept], reduction="sum") / total
        d = torch.autograd.grad(loss, [s, *params])
        grads = [g + dg for g, dg in zip(grads, d[1:])]
        unicast.append(d[0] * 2)  # B / b_i
    broadcast = []
    for k in range(len(rows[0])):
        s = [S[i][rows[i][k]] for i in range(n)]
        y = [Y[i][rows[i][k]] for i in range(n)]
        with torch.no_grad():
            prob = [torch.softmax(f(si), 0) for si in s]
            g = [(prob[i] - torch.nn.functional.one_hot(y[i], 2).double()) / total for i in range(n)]
            loss = [-math.log(float(prob[i][y[i]])) for i in range(n)]
        if mechanism == "mean-activation":
            p = (s[0] + s[1]) / 2
        elif mechanism == "client-0":
            p = s[0]
        elif mechanism == "rotating":
            p = s[(step + k) % n]
        elif mechanism == "max-loss":
            p = s[0] if loss[0] >= loss[1] else s[1]
        else:
            a0, a1 = float(g[0].norm()), float(g[1].norm())
            p = (a0 * s[0] + a1 * s[1]) / (a0 + a1)
        G = g[0] + g[1] if scaling == "sum" else (g[0] + g[1]) / 2
        p = p.clone().requires_grad_(True)
        d = torch.autograd.grad((f(p) * G).sum(), [p, *params])
        grads = [gr + dg for gr, dg in zip(grads, d[1:])]
        broadcast.append(d[0] / n if scaling == "sum" else d[0])
    new = [(p - LR * g).detach() for p, g in zip(params, grads)]
    return new, unicast, torch.stack(broadcast)


@pytest.mark.parametrize("mechanism,scaling", VARIANTS)
@pytest.mark.parametrize("step", [0, 1])
def test_two_clients_against_plain_torch(mechanism, scaling, step):
    model = _tiny_model()
    part = ServerPart(model, 1, LR)
    out = part.step_epsl([(1, SmashedBatch(S[i], Y[i])) for i in (0, 1)], POSITIONS,
                         mechanism=mechanism, scaling=scaling, step=step)
    params, unicast, broadcast = _reference(mechanism, scaling, step)
    for got, want in zip(list(model.blocks.parameters())[2:], params):
        assert torch.allclose(got.detach(), want, atol=1e-15, rtol=1e-12)
    for got, want in zip(out.unicast, unicast):
        assert torch.allclose(got, want, atol=1e-15, rtol=1e-12)
    assert torch.allclose(out.broadcast, broadcast, atol=1e-15, rtol=1e-12)
    assert out.scales == [2.0, 2.0] and out.positions == [POSITIONS, POSITIONS]


def test_the_two_client_case_tells_the_mechanisms_apart():
    """The hand case is discriminating: no two mechanisms (or scalings) give the same step."""
    results = {(m, s, t): _reference(m, s, t) for m, s in VARIANTS for t in (0, 1)}
    # max-loss picks a different client at the two positions
    with torch.no_grad():
        picks = []
        for j in POSITIONS:
            losses = [float(torch.nn.functional.cross_entropy(ServerPart(_tiny_model(), 1, LR)._forward(1, S[i][j:j + 1]), Y[i][j:j + 1]))
                      for i in (0, 1)]
            picks.append(losses.index(max(losses)))
    assert picks == [1, 0]
    distinct = {(m, s) for m, s in VARIANTS}
    for a in distinct:
        for b in distinct:
            if a < b:
                pa, pb = results[(*a, 0)][0], results[(*b, 0)][0]
                assert any(not torch.allclose(x, y, atol=1e-12) for x, y in zip(pa, pb)), (a, b)


def test_rotating_moves_on_one_client_per_step_across_rounds():
    """The strategy counts its server steps across rounds and hands the count to the rule."""
    seen = []

    class Recorder:
        def step_epsl(self, batches, positions, mechanism, scaling, step):
            seen.append((mechanism, scaling, step))

    strategy = EPSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=3, batch_size=4,
                    phi=0.5, mechanism="rotating", scaling="mean")
    strategy.server = Recorder()
    batches = _digits_batches(2, 4)
    for _ in range(3):
        strategy._step(batches)
    assert seen == [("rotating", "mean", 0), ("rotating", "mean", 1), ("rotating", "mean", 2)]
    state = strategy.checkpoint_state()
    assert state["steps"] == 3
    other = EPSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=3, batch_size=4, phi=0.5)
    other.restore_state(state)
    assert other._steps == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(mechanism="median"), "mechanism must be one of"),
    (dict(scaling="max"), "scaling must be one of"),
])
def test_unknown_mechanism_or_scaling_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EPSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=3, batch_size=4, **kwargs)
    with pytest.raises(ValueError, match=message):
        ServerPart(model_fn(), 6, 0.1).step_epsl(_digits_batches(2, 4), [0], **kwargs)
