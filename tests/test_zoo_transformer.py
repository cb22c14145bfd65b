"""The zoo's vision transformer (``vit-tiny``: ``torch.nn.TransformerEncoderLayer`` blocks) split
at its block boundaries: what crosses is the hidden state, and split training equals the unsplit
model's SGD (float64, to 1e-10) at every cut, one client (SL) and three (PSL)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from flsplit.data.datasets import TensorData
from flsplit.model.profile import profile_model
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import build_model, vit_tiny
from flsplit.planes.inprocess import InProcessGrid
from flsplit.runtime.client import SplitClient
from flsplit.strategies import PSL, SL
from tests.helpers import centralized_sgd, client_app_of, max_abs_diff, random_data

LR = 0.05
DIM, DEPTH, HEADS, PATCH = 16, 2, 2, 2  # 16 tokens of 16 for an 8x8 digit: small enough for CI


def vit_fn() -> SplitModel:
    torch.manual_seed(4321)
    return SplitModel(vit_tiny(num_classes=10, in_channels=1, image_size=8, dim=DIM, depth=DEPTH, heads=HEADS,
                               patch=PATCH).double())


def run(cls, parts: list[TensorData], **settings):
    grid = InProcessGrid(client_app_of([SplitClient(vit_fn, d, d, salt=i) for i, d in enumerate(parts)]), len(parts))
    strategy = cls(model_fn=vit_fn, input_shape=(1, 8, 8), num_classes=10, learning_rate=LR, shuffle=False, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(vit_fn().blocks.state_dict()), num_rounds=1)
    return result.arrays.to_torch_state_dict()


def test_every_cut_carries_the_hidden_state():
    model = build_model("vit-tiny", 10, 1, 8)  # the zoo's default size: 64-wide, 4 layers, 2x2 patches
    assert model.num_blocks == 6
    profile = profile_model(model, (1, 8, 8))
    tokens, dim = (8 // 2) ** 2, 64
    assert [profile.cut(k).smashed_elements for k in range(1, 6)] == [tokens * dim] * 5
    assert model.verify(torch.rand(3, 1, 8, 8)) <= 1e-4  # float32: outputs and gradients as the unsplit model's


@pytest.mark.parametrize("cut", range(1, DEPTH + 2))
def test_sl_equals_unsplit_sgd_at_every_cut(cut):
    data, steps, b = random_data(24, seed=3), 3, 8
    got = run(SL, [data], cut_layer=cut, batch_size=b, max_steps=steps)
    reference = centralized_sgd([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)], LR, vit_fn)
    assert max_abs_diff(got, reference) <= 1e-10


def test_psl_step_equals_unsplit_sgd_on_the_union():
    parts = [random_data(6, seed=20), random_data(4, seed=21), random_data(5, seed=22)]
    got = run(PSL, parts, cut_layer=2, batch_size=16, max_steps=1)
    union = TensorData(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    assert max_abs_diff(got, centralized_sgd([union], LR, vit_fn)) <= 1e-10


def test_a_patch_that_does_not_tile_the_image_is_refused():
    with pytest.raises(ValueError, match="divisible by its patch"):
        vit_tiny(image_size=10, patch=4)
