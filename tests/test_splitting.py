"""Splitting: client part then server part is the unsplit model, at every cut.

References are computed without the code under test: the unsplit ``nn.Sequential`` / the
original torchvision model's own ``forward``, and block counts and shapes worked out by hand
from the architectures.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from flsplit.model.splitting import SplitModel, as_split_model, block_output_shapes, flatten_torchvision
from flsplit.model.zoo import MODELS, build_model



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _filled(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every float parameter/buffer with cheap, reproducible, non-degenerate values.

    Random init of torchvision's VGG (133M parameters) takes seconds on a small CPU; tiling
    one short random vector (of prime length, so rows do not repeat) costs a memory copy.
    Batch-norm variances are kept positive.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(100_003, generator=g) * 2 - 1
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                t.zero_()
                continue
            flat = t.view(-1)
            reps = math.ceil(flat.numel() / base.numel())
            flat.copy_(base.repeat(reps)[: flat.numel()])
            if t.dim() > 1:  # weights: about the scale of the default init
                t.mul_(1.7 * t[0].numel() ** -0.5)
            else:  # biases, batch-norm affine and statistics
                t.mul_(0.1)
                if name.endswith("running_var") or name.endswith("weight"):
                    t.add_(1.0)
    return model


def fast_torchvision(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A torchvision model built by torchvision's own constructor (on meta) with fast values."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return _filled(model.to_empty(device="cpu"), seed)


def split_forward(split: SplitModel, cut: int, x: torch.Tensor) -> torch.Tensor:
    smashed = split.client_part(cut)(x)
    return split.server_part(cut)(smashed)


def assert_partition(split: SplitModel, cut: int) -> None:
    """Client part is blocks [0, cut), server part [cut, L): the same module objects."""
    client, server = split.client_part(cut), split.server_part(cut)
    assert len(client) == cut
    assert len(server) == split.num_blocks - cut
    assert all(a is b for a, b in zip(list(client) + list(server), split.blocks, strict=True))


# --- the built-in zoo ----------------------------------------------------------------------

# name, kwargs, number of blocks counted by hand from the architecture, cuts to run numerically
# (None: all). VGG: 3 blocks per conv (conv, BN, ReLU) + 5 pools + Flatten + Linear.
ZOO = [
    ("digits-cnn", dict(in_channels=1, image_size=8), 9, None),
    ("lenet", dict(in_channels=1, image_size=28), 12, None),
    ("lenet", dict(in_channels=3, image_size=32), 12, [1, 6, 7, 11]),
    ("vgg11", dict(in_channels=3, image_size=32), 8 * 3 + 5 + 2, [1, 2, 3, 15, 29, 30]),
    ("vgg13", dict(in_channels=3, image_size=32), 10 * 3 + 5 + 2, [1, 18, 35, 36]),
    ("vgg16", dict(in_channels=3, image_size=32), 13 * 3 + 5 + 2, [1, 2, 23, 44, 45]),
    # CIFAR ResNet18 has adaptive pooling, so a small image keeps it fast: 3 stem + 8 + 3.
    ("resnet18", dict(in_channels=3, image_size=8), 3 + 8 + 3, None),
]


@pytest.mark.parametrize("name, kwargs, num_blocks, cuts", ZOO, ids=[f"{z[0]}-{z[1]['image_size']}" for z in ZOO])
def test_zoo_split_equals_unsplit(name, kwargs, num_blocks, cuts):
    torch.manual_seed(0)
    original = MODELS[name](num_classes=7, **kwargs)
    assert isinstance(original, nn.Sequential)
    original.eval()
    batch = 2 if name in ("digits-cnn", "lenet", "resnet18") else 1
    x = torch.randn(batch, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        reference = original(x)
    assert reference.shape == (batch, 7)

    split = as_split_model(original)
    assert split.num_blocks == num_blocks
    for cut in range(1, num_blocks):
        assert_partition(split, cut)
    with torch.no_grad():
        for cut in cuts or range(1, num_blocks):
            assert torch.equal(split_forward(split, cut, x), reference), f"cut {cut}"


@pytest.mark.parametrize("name, kwargs, num_blocks, cuts", ZOO[:2] + ZOO[-1:], ids=["digits", "lenet", "resnet18"])
def test_build_model_matches_zoo_constructor(name, kwargs, num_blocks, cuts):
    torch.manual_seed(3)
    split = build_model(name, num_classes=5, **kwargs)
    torch.manual_seed(3)
    original = MODELS[name](num_classes=5, **kwargs).eval()
    assert isinstance(split, SplitModel) and split.num_blocks == num_blocks
    assert split.blocks.state_dict().keys() == original.state_dict().keys()
    split.blocks.eval()
    x = torch.randn(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        reference = original(x)
        for cut in range(1, num_blocks):
            assert torch.equal(split_forward(split, cut, x), reference)


def test_build_model_rejects_unknown_and_too_small():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg19")
    for name in ("vgg11", "vgg13", "vgg16", "torchvision-vgg11"):
        with pytest.raises(ValueError, match="32x32"):
            build_model(name, in_channels=3, image_size=8)
    with pytest.raises(ValueError, match="16x16"):
        build_model("lenet", in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="3 input channels"):
        build_model("torchvision-resnet18", in_channels=1, image_size=32)


def test_lenet_other_image_sizes():
    # 16x16: 5x5 conv -> 12, pool -> 6, 5x5 conv -> 2, pool -> 1: classifier input 16*1*1.
    model = MODELS["lenet"](num_classes=3, in_channels=1, image_size=16)
    assert model[7].in_features == 16
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    # 28x28 is padded by 2, so it matches 32x32: 16 * 5 * 5.
    assert MODELS["lenet"](image_size=28)[7].in_features == MODELS["lenet"](image_size=32)[7].in_features == 400


def test_digits_cnn_block_output_shapes_by_hand():
    torch.manual_seed(0)
    split = build_model("digits-cnn", num_classes=10, in_channels=1, image_size=8)
    expected = [
        (16, 8, 8),  # conv 3x3 pad 1 keeps 8x8
        (16, 8, 8),
        (32, 8, 8),
        (32, 8, 8),
        (32, 4, 4),  # 2x2 pool
        (32 * 4 * 4,),
        (64,),
        (64,),
        (10,),
    ]
    assert block_output_shapes(split, (1, 8, 8)) == expected
    x = torch.randn(3, 1, 8, 8)
    for cut in range(1, split.num_blocks):
        assert split.client_part(cut)(x).shape == (3, *expected[cut - 1])


def test_block_output_shapes_leave_batch_norm_and_mode_alone():
    torch.manual_seed(0)
    split = build_model("resnet18", num_classes=10, in_channels=3, image_size=8)
    split.blocks.train()
    before = {k: v.clone() for k, v in split.blocks.state_dict().items()}
    shapes = block_output_shapes(split, (3, 8, 8))
    # stem keeps 8x8 with 64 channels; layer2..4 halve the side: 4, 2, 1.
    assert shapes[:5] == [(64, 8, 8)] * 5
    assert shapes[5:11] == [(128, 4, 4)] * 2 + [(256, 2, 2)] * 2 + [(512, 1, 1)] * 2
    assert shapes[11:] == [(512, 1, 1), (512,), (10,)]
    assert all(m.training for m in split.blocks.modules())
    after = split.blocks.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- any nn.Sequential -----------------------------------------------------------------------


def custom_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),  # first block of the server part at cut 2
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.Tanh()),  # a nested block stays whole
        nn.Flatten(1),
        nn.Dropout(0.5),
        nn.Linear(4 * 3 * 3, 6),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Linear(6, 3),
    ).double()


def test_any_sequential_forward_and_backward_match_unsplit():
    torch.manual_seed(0)
    model = custom_sequential()
    split = as_split_model(model)
    assert split.num_blocks == 9 and split.blocks is model
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))

    model.eval()
    with torch.no_grad():
        reference = model(x)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    for cut in range(1, split.num_blocks):
        with torch.no_grad():
            assert torch.equal(split_forward(split, cut, x), reference)
        # Split training: the server gets a leaf that requires grad, returns its gradient.
        model.zero_grad()
        smashed = split.client_part(cut)(x)
        received = smashed.detach().requires_grad_(True)
        nn.functional.cross_entropy(split.server_part(cut)(received), y).backward()
        smashed.backward(received.grad)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference_grads[n], rtol=1e-12, atol=1e-12, msg=f"cut {cut} {n}")


def test_sequential_state_dict_keys_are_its_own():
    model = custom_sequential()
    split = as_split_model(model)
    original = split.to_original_state_dict()
    assert list(original) == list(model.state_dict())
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [0, -1, 9, 10, 1.5, 2.0, "2", None, True])
def test_invalid_cuts_name_the_valid_range(bad):
    split = as_split_model(custom_sequential())  # 9 blocks: cuts 1..8
    for method in (split.check_cut, split.client_part, split.server_part):
        with pytest.raises(ValueError, match=r"valid cuts are 1\.\.8"):
            method(bad)


def test_valid_cuts_are_returned():
    split = as_split_model(custom_sequential())
    assert [split.check_cut(k) for k in range(1, 9)] == list(range(1, 9))


def test_split_model_rejects_inconsistent_paths_and_pathless_state():
    with pytest.raises(ValueError, match="one path per block"):
        SplitModel(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["0"])
    with pytest.raises(ValueError, match="no original path"):
        SplitModel(nn.Sequential(nn.Linear(2, 2)), [None]).to_original_state_dict()


def test_flatten_torchvision_rejects_other_models():
    with pytest.raises(TypeError, match="cannot flatten"):
        flatten_torchvision(nn.Linear(3, 3))


# --- torchvision VGG and ResNet --------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_vgg11():
    return fast_torchvision("vgg11", num_classes=10, seed=1).eval()


def test_torchvision_vgg11_split_equals_original(tv_vgg11):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = tv_vgg11(x)  # torchvision's own forward, before flattening
    split = flatten_torchvision(tv_vgg11)
    # features: 8 conv + 8 ReLU + 5 pool = 21; avgpool, Flatten; classifier: 3 Linear, 2 ReLU, 2 Dropout.
    assert split.num_blocks == 21 + 2 + 7 == 30
    assert split.block_paths[:3] == ["features.0", "features.1", "features.2"]
    assert split.block_paths[20:24] == ["features.20", "avgpool", None, "classifier.0"]
    assert split.block_paths[-1] == "classifier.6"
    for cut in range(1, 30):
        assert_partition(split, cut)
    # First and last cuts, the features/avgpool/Flatten/classifier seams, and cuts whose server
    # part starts with one of torchvision's in-place ReLUs (1, 24).
    with torch.no_grad():
        for cut in (1, 2, 11, 21, 22, 23, 24, 29):
            assert torch.equal(split_forward(split, cut, x), reference), f"cut {cut}"
        assert torch.equal(tv_vgg11(x), reference)  # flattening did not change the original


def test_torchvision_vgg11_state_dict_round_trip(tv_vgg11):
    split = flatten_torchvision(tv_vgg11)
    with torch.no_grad():
        for p in split.blocks.parameters():  # make the blocks' weights differ from the original init
            p.mul_(0.9)
    with torch.device("meta"):
        fresh = torchvision.models.vgg11(weights=None, num_classes=10)
    fresh = fresh.to_empty(device="cpu")  # every value must come from the state dict
    state = split.to_original_state_dict()
    assert list(state) == list(fresh.state_dict())
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), split.blocks(x))
        assert torch.equal(fresh(x), split_forward(split, 21, x))


def test_torchvision_resnet18_split_equals_original():
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None, num_classes=10)
    _train_batch_norm(original)
    original.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = original(x)
    split = flatten_torchvision(original)
    # conv1, bn1, relu, maxpool, 2 blocks in each of 4 layers, avgpool, Flatten, fc.
    assert split.num_blocks == 4 + 8 + 3 == 15
    assert split.block_paths == (
        ["conv1", "bn1", "relu", "maxpool"]
        + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        + ["avgpool", None, "fc"]
    )
    assert block_output_shapes(split, (3, 32, 32))[:5] == [(64, 16, 16)] * 3 + [(64, 8, 8)] * 2
    with torch.no_grad():
        for cut in range(1, split.num_blocks):
            assert_partition(split, cut)
            assert torch.equal(split_forward(split, cut, x), reference), f"cut {cut}"


def _train_batch_norm(model: nn.Module) -> None:
    """A few train-mode forwards so running stats are not the init values."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.5)


def test_torchvision_resnet18_server_backward_after_in_place_relu():
    """Cut 2: the server part starts with torchvision's ``ReLU(inplace=True)`` on a grad leaf."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None, num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    original.eval()  # eval: the two passes see the same batch-norm statistics
    nn.functional.cross_entropy(original(x), y).backward()
    reference = {n: p.grad.clone() for n, p in original.named_parameters()}
    original.zero_grad()

    split = flatten_torchvision(original)
    smashed = split.client_part(2)(x)
    received = smashed.detach().requires_grad_(True)
    nn.functional.cross_entropy(split.server_part(2)(received), y).backward()
    smashed.backward(received.grad)
    for n, p in original.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=1e-4, atol=1e-6, msg=n)


def test_build_model_torchvision_resnet18_round_trip():
    torch.manual_seed(0)
    split = build_model("torchvision-resnet18", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(split, SplitModel) and split.num_blocks == 15
    _train_batch_norm(split.blocks)
    fresh = torchvision.models.resnet18(weights=None, num_classes=10)
    state = split.to_original_state_dict()
    assert list(state) == list(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    split.blocks.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = fresh(x)
        for cut in (1, 4, 8, 14):
            assert torch.equal(split_forward(split, cut, x), reference)

    # A server's partial state (blocks [cut, L)) maps onto the matching original names.
    cut = 8
    partial = {k: v for k, v in split.blocks.state_dict().items() if int(k.split(".", 1)[0]) >= cut}
    mapped = split.to_original_state_dict(partial)
    assert set(mapped) == {k for k in state if k.split(".")[0] in ("layer3", "layer4", "fc")}
    assert all(torch.equal(mapped[k], state[k]) for k in mapped)
