"""EPSL with label-matched aggregation (``aggregated-positions = "matched"``).

The server picks, per client, which rows are aggregated together so that the ``N`` rows of a
slot share a label wherever the batches allow; ``step_epsl`` then aggregates client ``i``'s
row ``positions[i][k]`` in slot ``k`` and each client learns its rows from the broadcast's
``positions.k``. Checked here: the choice is optimal (against a brute force), the step equals
plain torch for every mechanism with per-client rows, the papers' backward-row count holds,
phi = 0 and one client are PSL bit for bit, and a two-client run through the real message
path equals a by-hand computation.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from flwr.app import ArrayRecord

from flsplit.runtime.client import SplitClient
from flsplit.data.datasets import TensorData
from flsplit.planes.inprocess import InProcessGrid
from flsplit.wire.protocol import SmashedBatch
from flsplit.runtime.server import EPSL_MECHANISMS, EPSL_SCALINGS, ServerPart
from flsplit.strategies import EPSL, PSL
from flsplit.strategies.epsl import label_matched_positions
from tests.helpers import client_app_of, max_abs_diff, random_data, run_strategy
from tests.test_epsl_mechanisms import LR, S, Y, _digits_batches, _reference, _server_mm_flops, _tiny_model
from tests.test_epsl_sflga import _tiny_model as _linear_model

VARIANTS = [(m, s) for m in EPSL_MECHANISMS for s in EPSL_SCALINGS]


def _agreement(labels: list[list[int]], rows: list[list[int]]) -> int:
    """Rows that carry their slot's most common label, summed over slots."""
    total = 0
    for k in range(len(rows[0])):
        slot = [labels[i][rows[i][k]] for i in range(len(labels))]
        total += max(slot.count(c) for c in set(slot))
    return total


def _best_agreement(labels: list[list[int]], m: int, classes: int) -> int:
    """Brute force: the most agreeing rows any assignment can reach. A slot labelled ``c``
    can hold at most one row of ``c`` per client, so with ``t_c`` slots per label the bound
    is ``sum_c sum_i min(count_i(c), t_c)``, and it is reached; maximise over every ``t``."""
    best = 0
    for t in itertools.product(range(m + 1), repeat=classes):
        if sum(t) <= m:
            best = max(best, sum(min(y.count(c), t[c]) for y in labels for c in range(classes)))
    return best


def test_matched_rows_reach_the_best_agreement_a_brute_force_finds():
    rng = random.Random(0)
    for _ in range(300):
        n, classes = rng.randint(2, 4), rng.randint(1, 3)
        sizes = [rng.randint(2, 6) for _ in range(n)]
        m = rng.randint(1, min(sizes))
        labels = [[rng.randrange(classes) for _ in range(s)] for s in sizes]
        rows = label_matched_positions([torch.tensor(y) for y in labels], m)
        assert len(rows) == n and all(len(r) == m for r in rows)
        assert all(len(set(r)) == m and all(0 <= j < s for j in r) for r, s in zip(rows, sizes))
        assert _agreement(labels, rows) == _best_agreement(labels, m, classes), (labels, m, rows)
        assert rows == label_matched_positions([torch.tensor(y) for y in labels], m)  # deterministic


def test_batches_with_the_same_labels_in_another_order_match_completely():
    labels = [[3, 1, 4, 1, 5, 9, 2, 6], [1, 1, 2, 3, 4, 5, 6, 9], [9, 6, 5, 4, 3, 2, 1, 1]]
    rows = label_matched_positions([torch.tensor(y) for y in labels], 8)
    for k in range(8):
        assert len({labels[i][rows[i][k]] for i in range(3)}) == 1


def test_a_batch_shorter_than_the_slots_is_refused():
    with pytest.raises(ValueError, match="at least 3 rows"):
        label_matched_positions([torch.tensor([0, 1, 2]), torch.tensor([0, 1])], 3)


@pytest.mark.parametrize("positions,message", [
    ([[0, 1], [0]], "one list of one length per client"),
    ([[0, 0], [0, 1]], "client 0's aggregated positions"),
    ([[0, 1], [0, 5]], "client 1's aggregated positions"),
    ([[0, 1]], "one list of one length per client"),
])
def test_bad_per_client_positions_are_refused(positions, message):
    batches = [(1, SmashedBatch(S[i], Y[i])) for i in (0, 1)]
    with pytest.raises(ValueError, match=message):
        ServerPart(_tiny_model(), 1, LR).step_epsl(batches, positions)


ROWS = [[0, 2], [2, 1]]  # client 0 aggregates rows 0, 2; client 1 rows 2, 1 (slot 0: rows 0 and 2)


@pytest.mark.parametrize("mechanism,scaling", VARIANTS)
@pytest.mark.parametrize("step", [0, 1])
def test_per_client_rows_against_plain_torch(mechanism, scaling, step):
    model = _tiny_model()
    out = ServerPart(model, 1, LR).step_epsl([(1, SmashedBatch(S[i], Y[i])) for i in (0, 1)], ROWS,
                                             mechanism=mechanism, scaling=scaling, step=step)
    params, unicast, broadcast = _reference(mechanism, scaling, step, ROWS)
    for got, want in zip(list(model.blocks.parameters())[2:], params):
        assert torch.allclose(got.detach(), want, atol=1e-15, rtol=1e-12)
    for got, want in zip(out.unicast, unicast):
        assert torch.allclose(got, want, atol=1e-15, rtol=1e-12)
    assert torch.allclose(out.broadcast, broadcast, atol=1e-15, rtol=1e-12)
    assert out.positions == ROWS and out.scales == [2.0, 2.0]


@pytest.mark.parametrize("mechanism", EPSL_MECHANISMS)
@pytest.mark.parametrize("phi", [0.25, 0.5, 1.0])
def test_matched_rows_keep_the_papers_backward_flops(mechanism, phi):
    """Server part = Linear, ReLU, Linear (cut 6 of the digits CNN): forward is addmm,
    backward is mm, so torch's mm FLOPs are the server's back-propagation."""
    n, b = 4, 8
    m = math.ceil(phi * b)
    batches = _digits_batches(n, b, seed=5, classes=3)  # few labels: most slots match
    rows = label_matched_positions([bt.y for _, bt in batches], m)
    _, _, psl = _server_mm_flops(lambda part: part.step_union(batches))
    part, out, epsl = _server_mm_flops(lambda part: part.step_epsl(batches, rows, mechanism=mechanism))
    assert epsl / psl == pytest.approx(((1 - phi) * n * b + phi * b) / (n * b), rel=1e-12)
    assert part.work.rows == {6: [n * b, (n - 1) * (b - m) + b]}
    assert out.broadcast.shape == (m, 512) and out.positions == rows


@pytest.mark.parametrize("mechanism", EPSL_MECHANISMS)
def test_matched_phi_zero_and_one_client_are_psl_bit_for_bit(mechanism):
    parts = [random_data(12, seed=1), random_data(12, seed=2), random_data(10, seed=3)]
    kwargs = dict(cut_layer=3, batch_size=4, num_rounds=2, shuffle=True)
    _, psl, _ = run_strategy(PSL, parts, **kwargs)
    _, epsl, _ = run_strategy(EPSL, parts, phi=0.0, positions="matched", mechanism=mechanism, **kwargs)
    assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0
    one = [random_data(16, seed=4)]
    _, psl, _ = run_strategy(PSL, one, cut_layer=5, batch_size=8, num_rounds=2)
    _, epsl, _ = run_strategy(EPSL, one, cut_layer=5, batch_size=8, num_rounds=2, phi=0.5, positions="matched",
                              mechanism=mechanism)
    assert max_abs_diff(psl.arrays.to_torch_state_dict(), epsl.arrays.to_torch_state_dict()) == 0.0


def test_two_clients_matched_over_the_message_path_by_hand():
    """The mean-activation reading. Client 0 has labels (0, 1), client 1 (1, 0); phi 0.5
    aggregates one slot. Both labels can be matched by both clients; the tie goes to label 0,
    so the slot holds client 0's row 0 and client 1's row 1, and each client must apply the
    broadcast row at its own row."""
    xs = {0: [1.0, 2.0], 1: [3.0, -2.0]}
    ys = {0: [0, 1], 1: [1, 0]}
    lr, w = 0.1, (0.5, -0.25)
    clients = [SplitClient(_linear_model, TensorData(torch.tensor(xs[i]).view(2, 1), torch.tensor(ys[i]))) for i in (0, 1)]
    app = client_app_of(clients)
    strategy = EPSL(model_fn=_linear_model, input_shape=(1,), num_classes=2, cut_layer=1, batch_size=2, max_steps=1,
                    learning_rate=lr, shuffle=False, phi=0.5, positions="matched", mechanism="mean-activation")
    result = strategy.start(grid=InProcessGrid(app, 2), initial_arrays=ArrayRecord(_linear_model().blocks.state_dict()),
                            num_rounds=1)
    got = result.arrays.to_torch_state_dict()

    # By hand: B = 4; logits z = (w1 s, w2 s) with s = x (a = 1); the logit gradient of a
    # sample is (softmax(z) - onehot(y)) / B; the cut-layer gradient of a logit gradient g
    # is w1 g1 + w2 g2; a client's own rows are scaled by B / b_i = 2, and the broadcast row
    # is 1/N of the slot's cut-layer gradient, times B / b_i = 2.
    def logit_grad(s, y):
        e1, e2 = math.exp(w[0] * s), math.exp(w[1] * s)
        p = (e1 / (e1 + e2), e2 / (e1 + e2))
        return [(p[k] - (1.0 if k == y else 0.0)) / 4 for k in (0, 1)]

    kept = [(xs[0][1], ys[0][1]), (xs[1][0], ys[1][0])]  # client 0's row 1, client 1's row 0
    slot = [(xs[0][0], ys[0][0]), (xs[1][1], ys[1][1])]  # both label 0
    dw = [sum(logit_grad(s, y)[k] * s for s, y in kept) for k in (0, 1)]
    G = [sum(logit_grad(s, y)[k] for s, y in slot) for k in (0, 1)]
    s_mean = (slot[0][0] + slot[1][0]) / 2
    dw = [dw[k] + G[k] * s_mean for k in (0, 1)]
    own = [2 * (w[0] * logit_grad(s, y)[0] + w[1] * logit_grad(s, y)[1]) for s, y in kept]
    shared = (w[0] * G[0] + w[1] * G[1]) / 2 * 2
    # client i's weight gradient: its rows' cut-layer gradients times its inputs; the
    # averaged client part (equal weights) steps by the mean of the two
    da = [own[0] * kept[0][0] + shared * slot[0][0], own[1] * kept[1][0] + shared * slot[1][0]]
    expected_a = 1.0 - lr * (da[0] + da[1]) / 2
    expected_w = torch.tensor([[w[0] - lr * dw[0]], [w[1] - lr * dw[1]]], dtype=torch.float64)
    assert torch.allclose(got["1.weight"], expected_w, atol=1e-15, rtol=0)
    assert got["0.weight"].item() == pytest.approx(expected_a, abs=1e-15)
    # the same run with the first rows aggregated (labels 0 and 1 in one slot) differs
    first = EPSL(model_fn=_linear_model, input_shape=(1,), num_classes=2, cut_layer=1, batch_size=2, max_steps=1,
                 learning_rate=lr, shuffle=False, phi=0.5, positions="first", mechanism="mean-activation")
    other = first.start(grid=InProcessGrid(app, 2), initial_arrays=ArrayRecord(_linear_model().blocks.state_dict()),
                        num_rounds=1).arrays.to_torch_state_dict()
    assert not torch.allclose(other["0.weight"], got["0.weight"], atol=1e-12)
