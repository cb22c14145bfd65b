"""Split training equals centralized training (float64, plain SGD) through the real runtimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flsplit.strategies import PSL, SFLV1, SL
from tests.helpers import centralized_sgd, max_abs_diff, model_fn, random_data, run_strategy

LR = 0.1


@pytest.mark.parametrize("cut", range(1, 9))
def test_sl_one_client_equals_centralized_at_every_cut(cut):
    data = random_data(40, seed=1)
    steps, b = 5, 8
    _, result, _ = run_strategy(SL, [data], cut_layer=cut, batch_size=b, max_steps=steps, learning_rate=LR)
    reference = centralized_sgd([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)], LR)
    assert max_abs_diff(result.arrays.to_torch_state_dict(), reference) <= 1e-10


def test_sl_shuffled_batches_follow_the_documented_order():
    """Batch order is ``randperm`` seeded from ``SeedSequence([seed, salt, epoch])``."""
    data = random_data(20, seed=2)
    seed, b = 7, 5
    _, result, _ = run_strategy(SL, [data], cut_layer=3, batch_size=b, local_epochs=2, seed=seed, shuffle=True, learning_rate=LR)
    batches = []
    for epoch in range(2):
        gen_seed = int(np.random.SeedSequence([seed, 0, epoch]).generate_state(1)[0])
        order = torch.randperm(20, generator=torch.Generator().manual_seed(gen_seed))
        batches += [data.subset(order[i * b : (i + 1) * b]) for i in range(4)]
    assert max_abs_diff(result.arrays.to_torch_state_dict(), centralized_sgd(batches, LR)) <= 1e-10


@pytest.mark.parametrize("cut", [2, 6])
def test_psl_one_step_equals_centralized_on_the_concatenated_batch(cut):
    """Loss normalisation: the server part steps on the mean loss over the union of all
    B samples; each client gets the gradient of its own mean loss (B / b_i times its slice
    of the union gradient), so the sample-weighted average of the client parts after one
    step equals centralized training. Unequal client batch sizes check the weighting."""
    parts = [random_data(6, seed=10), random_data(4, seed=11), random_data(9, seed=12)]
    _, result, _ = run_strategy(PSL, parts, cut_layer=cut, batch_size=16, max_steps=1, learning_rate=LR)
    union = type(parts[0])(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    assert max_abs_diff(result.arrays.to_torch_state_dict(), centralized_sgd([union], LR)) <= 1e-10


def test_psl_server_part_steps_once_on_the_union():
    """Several PSL steps: the server part takes one step per union batch (client parts kept apart)."""
    parts = [random_data(8, seed=20), random_data(8, seed=21)]
    strategy, _, _ = run_strategy(PSL, parts, cut_layer=4, batch_size=4, max_steps=2, learning_rate=LR)
    assert strategy.server_steps == 2
    assert strategy.server.stats.samples == 16


def test_sflv1_with_one_client_equals_sl():
    data = random_data(30, seed=3)
    kwargs = dict(cut_layer=3, batch_size=7, local_epochs=1, learning_rate=LR, shuffle=True, seed=5)
    _, sl, _ = run_strategy(SL, [data], num_rounds=2, **kwargs)
    _, v1, _ = run_strategy(SFLV1, [data], num_rounds=2, **kwargs)
    assert max_abs_diff(sl.arrays.to_torch_state_dict(), v1.arrays.to_torch_state_dict()) <= 1e-12


def test_steps_per_exchange_two_has_the_documented_staleness():
    """K = 2: both batches' smashed data come from the weights W0; the server steps on each
    in turn; the client recomputes batch 1 at W0, steps to W1, recomputes batch 2 at W1 and
    back-propagates the gradient the server computed for the W0 activations."""
    data = random_data(8, seed=4)
    b1, b2 = data.subset(slice(0, 4)), data.subset(slice(4, 8))
    _, result, _ = run_strategy(SL, [data], cut_layer=3, batch_size=4, max_steps=2, steps_per_exchange=2, learning_rate=LR)

    model = model_fn().blocks
    client, server = model[:3], model[3:]
    copt = torch.optim.SGD(client.parameters(), lr=LR)
    sopt = torch.optim.SGD(server.parameters(), lr=LR)
    with torch.no_grad():
        smashed = [client(b.x.double()) for b in (b1, b2)]
    grads = []
    for s, b in zip(smashed, (b1, b2)):
        s = s.clone().requires_grad_(True)
        sopt.zero_grad()
        torch.nn.functional.cross_entropy(server(s), b.y).backward()
        sopt.step()
        grads.append(s.grad)
    for g, b in zip(grads, (b1, b2)):
        copt.zero_grad()
        client(b.x.double()).backward(g)
        copt.step()
    assert max_abs_diff(result.arrays.to_torch_state_dict(), model.state_dict()) <= 1e-10


def test_momentum_survives_between_messages():
    """The client's momentum buffers live in context.state: SL with SGD momentum 0.9 and
    weight decay over several steps equals centralized training with the same optimizer."""
    data = random_data(40, seed=6)
    steps, b = 5, 8
    _, result, _ = run_strategy(
        SL, [data], cut_layer=3, batch_size=b, max_steps=steps, learning_rate=LR, momentum=0.9, weight_decay=1e-3
    )
    model = model_fn().blocks
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
    for i in range(steps):
        batch = data.subset(slice(i * b, (i + 1) * b))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch.x.double()), batch.y).backward()
        opt.step()
    assert max_abs_diff(result.arrays.to_torch_state_dict(), model.state_dict()) <= 1e-10


@pytest.mark.parametrize("carry", [True, False])
def test_carry_momentum_makes_rounds_one_optimizer_run(carry):
    """``carry_momentum``: two rounds of SL (one client, 3 batches each, the data cursor
    going on) equal one centralized run of 6 SGD-momentum steps; without it, equal two
    runs of 3 steps whose optimizer is rebuilt in between (both sides restart momentum)."""
    data = random_data(48, seed=7)
    rounds, steps, b = 2, 3, 8
    _, result, _ = run_strategy(
        SL, [data], num_rounds=rounds, cut_layer=3, batch_size=b, max_steps=steps, learning_rate=LR, momentum=0.9,
        weight_decay=1e-3, carry_momentum=carry,
    )
    model = model_fn().blocks
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
    for i in range(rounds * steps):
        if i % steps == 0 and not carry:
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
        batch = data.subset(slice(i * b, (i + 1) * b))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch.x.double()), batch.y).backward()
        opt.step()
    assert max_abs_diff(result.arrays.to_torch_state_dict(), model.state_dict()) <= 1e-10
