"""EPSL (last-layer gradient aggregation) and SFL-GA (gradient broadcast)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from torch.utils.flop_counter import FlopCounterMode

from flsplit.runtime.client import SplitClient
from flsplit.data.datasets import TensorData
from flsplit.planes.inprocess import InProcessGrid
from flsplit.wire.protocol import SmashedBatch
from flsplit.runtime.server import ServerPart
from flsplit.model.splitting import SplitModel
from flsplit.strategies import EPSL, PSL, SFLGA
from tests.helpers import client_app_of, max_abs_diff, model_fn, random_data, run_strategy
from tests.test_learning import run_app


def test_phi_zero_is_bit_identical_to_psl():
    parts = [random_data(12, seed=1), random_data(12, seed=2), random_data(10, seed=3)]
    kwargs = dict(cut_layer=3, batch_size=4, num_rounds=2, shuffle=True)
    _, psl, _ = run_strategy(PSL, parts, **kwargs)
    _, epsl, _ = run_strategy(EPSL, parts, phi=0.0, **kwargs)
    assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0


@pytest.mark.parametrize("phi", [0.25, 1.0])
def test_one_client_with_any_phi_is_psl(phi):
    data = [random_data(16, seed=4)]
    _, psl, _ = run_strategy(PSL, data, cut_layer=5, batch_size=8, num_rounds=2)
    _, epsl, _ = run_strategy(EPSL, data, cut_layer=5, batch_size=8, num_rounds=2, phi=phi, positions="random")
    assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0


def _tiny_model() -> SplitModel:
    """Client: x -> a*x (a = 1); server: s -> (w1*s, w2*s) logits, w = (0.5, -0.25)."""
    client, server = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        client.weight.fill_(1.0)
        server.weight.copy_(torch.tensor([[0.5], [-0.25]]))
    return SplitModel(torch.nn.Sequential(client, server).double())


def test_phi_one_two_clients_two_samples_by_hand():
    xs = {0: [1.0, 2.0], 1: [3.0, -1.0]}
    ys = {0: [0, 1], 1: [1, 0]}
    lr, w = 0.1, (0.5, -0.25)
    clients = [SplitClient(_tiny_model, TensorData(torch.tensor(xs[i]).view(2, 1), torch.tensor(ys[i]))) for i in (0, 1)]
    app = client_app_of(clients)
    strategy = EPSL(
        model_fn=_tiny_model, input_shape=(1,), num_classes=2, cut_layer=1, batch_size=2, max_steps=1,
        learning_rate=lr, shuffle=False, phi=1.0, mechanism="mean-activation",
    )
    result = strategy.start(grid=InProcessGrid(app, 2), initial_arrays=ArrayRecord(_tiny_model().blocks.state_dict()), num_rounds=1)
    got = result.arrays.to_torch_state_dict()

    # By hand. B = 4 samples in the union loss; at position j the logit gradient of client i
    # is (softmax(z_ij) - onehot(y_ij)) / B with z_ij = (w1 s, w2 s), s = x (a = 1).
    def logit_grad(s, y):
        e1, e2 = math.exp(w[0] * s), math.exp(w[1] * s)
        p = (e1 / (e1 + e2), e2 / (e1 + e2))
        return [(p[k] - (1.0 if k == y else 0.0)) / 4 for k in (0, 1)]

    dw = [0.0, 0.0]
    da = 0.0
    for j in (0, 1):
        g = [sum(logit_grad(xs[i][j], ys[i][j])[k] for i in (0, 1)) for k in (0, 1)]  # G_j
        s_mean = (xs[0][j] + xs[1][j]) / 2
        dw = [dw[k] + g[k] * s_mean for k in (0, 1)]
        cut_grad = w[0] * g[0] + w[1] * g[1]  # gradient at the mean smashed data
        # each client gets 1/N of it, scaled by B / b_i = 2 (its own mean loss): cut_grad
        # client i's weight gradient: cut_grad * x_ij; the average over both clients uses the mean x
        da += cut_grad * s_mean
    expected_w = torch.tensor([[w[0] - lr * dw[0]], [w[1] - lr * dw[1]]], dtype=torch.float64)
    assert torch.allclose(got["1.weight"], expected_w, atol=1e-15, rtol=0)
    assert got["0.weight"].item() == pytest.approx(1.0 - lr * da, abs=1e-15)
    assert strategy.data_plane.traffic.broadcast > 0  # the rows went out as one broadcast


@pytest.mark.parametrize("phi", [0.25, 0.5, 1.0])
def test_server_backward_flops_shrink_as_the_papers_say(phi):
    """Server part = Linear, ReLU, Linear (cut 6 of the digits CNN): forward is addmm,
    backward is mm, so the mm FLOPs are the server's back-propagation."""
    n, b = 4, 8
    batches = [(6, SmashedBatch(torch.randn(b, 512, dtype=torch.float64), torch.randint(0, 10, (b,)))) for _ in range(n)]

    def backward_flops(step):
        with FlopCounterMode(display=False) as counter:
            step(batches)
        return counter.get_flop_counts()["Global"][torch.ops.aten.mm]

    psl = backward_flops(ServerPart(model_fn(), 6, 0.1).step_union)
    m = math.ceil(phi * b)
    epsl = backward_flops(lambda bs: ServerPart(model_fn(), 6, 0.1).step_epsl(bs, list(range(m))))
    assert epsl / psl == pytest.approx(((1 - phi) * n * b + phi * b) / (n * b), rel=1e-12)


def test_sflga_aggregate_is_the_batch_weighted_average_by_position():
    sizes = [4, 2, 3]
    batches = [(6, SmashedBatch(torch.randn(s, 512, dtype=torch.float64), torch.randint(0, 10, (s,)))) for s in sizes]
    part = ServerPart(model_fn(), 6, 0.1)
    reference = ServerPart(model_fn(), 6, 0.1).step_union(batches)  # each client's own gradient
    out = part.step_gradient_average(batches)
    g = reference
    expected = torch.stack([
        (4 * g[0][0] + 2 * g[1][0] + 3 * g[2][0]) / 9,
        (4 * g[0][1] + 2 * g[1][1] + 3 * g[2][1]) / 9,
        (4 * g[0][2] + 3 * g[2][2]) / 7,
        g[0][3],
    ])
    assert torch.allclose(out.broadcast, expected, atol=1e-15, rtol=0)
    assert out.positions == [[0, 1, 2, 3], [0, 1], [0, 1, 2]]
    assert all(u.shape[0] == 0 for u in out.unicast)


def test_sflga_downlink_is_one_broadcast_per_step():
    parts = [random_data(16, seed=i) for i in range(4)]
    sfl, _, _ = run_strategy(PSL, parts, cut_layer=2, batch_size=8, max_steps=2)
    ga, _, _ = run_strategy(SFLGA, parts, cut_layer=2, batch_size=8, max_steps=2)
    psl_round, ga_round = sfl.history.rounds[0], ga.history.rounds[0]
    per_client_grads = psl_round["split_bytes_down"]  # 4 clients x 2 steps of unicast gradients
    assert ga_round["split_bytes_down"] < 0.01 * per_client_grads  # only empty unicast arrays left
    assert ga_round["broadcast_bytes_down"] == pytest.approx(per_client_grads / 4, rel=0.01)


@pytest.mark.parametrize("strategy", ["epsl", "sflga"])
def test_aggregating_schemes_learn_digits(tmp_path, strategy):
    history = run_app(tmp_path, strategy=strategy, **{"num-server-rounds": 10})
    assert max(r["test_accuracy"] for r in history["rounds"]) >= 0.90


def test_epsl_half_is_within_two_points_of_psl(tmp_path):
    psl = run_app(tmp_path / "psl", strategy="psl", **{"num-server-rounds": 10})
    epsl = run_app(tmp_path / "epsl", strategy="epsl", phi=0.5, **{"num-server-rounds": 10})
    best = lambda h: max(r["test_accuracy"] for r in h["rounds"])  # noqa: E731
    assert abs(best(epsl) - best(psl)) <= 0.02
