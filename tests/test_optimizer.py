"""AdamW on both sides of the cut (``optimizer="adamw"``): its moments and step counts live in
the client's ``context.state`` between messages (and across rounds with ``carry_momentum``), so
split training equals torch's AdamW on the unsplit model, float64, to 1e-10."""

from __future__ import annotations

import pytest
import torch

from flsplit.runtime.optim import build_optimizer, load_state_tensors, state_fits, state_tensors
from flsplit.strategies import PSL, SL
from flsplit.wire.protocol import SplitConfig
from tests.helpers import max_abs_diff, model_fn, random_data, run_strategy

LR, WD = 1e-2, 1e-2


def unsplit_adamw(batches, restart_every: int = 0) -> dict[str, torch.Tensor]:
    model = model_fn().blocks
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    for i, batch in enumerate(batches):
        if restart_every and i and i % restart_every == 0:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch.x.double()), batch.y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_sl_with_adamw_equals_unsplit_adamw(cut):
    data, steps, b = random_data(40, seed=6), 5, 8
    _, result, _ = run_strategy(SL, [data], cut_layer=cut, batch_size=b, max_steps=steps, learning_rate=LR,
                                weight_decay=WD, optimizer="adamw")
    reference = unsplit_adamw([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)])
    assert max_abs_diff(result.arrays.to_torch_state_dict(), reference) <= 1e-10


@pytest.mark.parametrize("carry", [True, False])
def test_carry_momentum_carries_adamws_moments_and_steps(carry):
    data, rounds, steps, b = random_data(48, seed=7), 2, 3, 8
    _, result, _ = run_strategy(SL, [data], num_rounds=rounds, cut_layer=3, batch_size=b, max_steps=steps,
                                learning_rate=LR, weight_decay=WD, optimizer="adamw", carry_momentum=carry)
    batches = [data.subset(slice(i * b, (i + 1) * b)) for i in range(rounds * steps)]
    reference = unsplit_adamw(batches, restart_every=0 if carry else steps)
    assert max_abs_diff(result.arrays.to_torch_state_dict(), reference) <= 1e-10


def test_psl_with_adamw_one_step_equals_unsplit_on_the_union():
    parts = [random_data(6, seed=10), random_data(4, seed=11), random_data(9, seed=12)]
    _, result, _ = run_strategy(PSL, parts, cut_layer=2, batch_size=16, max_steps=1, learning_rate=LR,
                                weight_decay=WD, optimizer="adamw")
    union = type(parts[0])(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    # One step: the server part steps on the union's mean loss; each client part on its own
    # mean loss, and AdamW's first step is sign-like (m / sqrt(v)), so the client blocks'
    # average differs from the union's step: only the server blocks are compared.
    server = {k: v for k, v in result.arrays.to_torch_state_dict().items() if int(k.split(".")[0]) >= 2}
    reference = {k: v for k, v in unsplit_adamw([union]).items() if int(k.split(".")[0]) >= 2}
    assert max_abs_diff(server, reference) <= 1e-10


def test_the_state_round_trips_and_a_misfit_starts_fresh():
    model = model_fn().blocks
    params = {str(i): p for i, p in enumerate(model.parameters())}
    opt = build_optimizer(params.values(), "adamw", LR)
    model(torch.rand(4, 1, 8, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    state = state_tensors(opt, params)
    assert {k.split(".", 1)[1] for k in state} == {"step", "exp_avg", "exp_avg_sq"}
    fresh = build_optimizer(params.values(), "adamw", LR)
    load_state_tensors(fresh, params, state)
    assert all(torch.equal(state_tensors(fresh, params)[k], v) for k, v in state.items())
    assert state_fits(state, params) and not state_fits({"0.exp_avg": torch.zeros(3)}, params)


def test_bad_optimizer_settings_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"optimizer must be one of \['sgd', 'adamw'\], got 'adam'"):
        SplitConfig(server_round=1, cut=1, optimizer="adam")
    with pytest.raises(ValueError, match="momentum applies to optimizer 'sgd' only"):
        SplitConfig(server_round=1, cut=1, optimizer="adamw", momentum=0.9)
    record = SplitConfig(server_round=1, cut=1).to_record()
    assert "optimizer" not in record  # an SGD round's record is the one it always was
    assert SplitConfig.from_record(SplitConfig(server_round=1, cut=1, optimizer="adamw").to_record()).optimizer == "adamw"
