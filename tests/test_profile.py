"""Per-cut profiles against FLOPs, smashed sizes and parameter bytes worked out by hand.

Conventions checked (those of ``torch.utils.flop_counter`` that ``flsplit.model.profile`` documents):
a ``(b x n) @ (n x m)`` matmul is ``2*b*n*m`` FLOPs, a convolution is
``2*Cin*Cout*kh*kw*Hout*Wout`` per sample, element-wise ops, pooling and batch norm count 0.
Backward of a block that receives smashed data (every block but the first) computes the
input gradient and the weight gradient, each as costly as the forward: 2x forward. The first
block's input is raw data, so only its weight gradient: 1x forward. Expected values below are
arithmetic on layer sizes, never numbers read off the code under test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytest
import torch
import torchvision
from torch import nn

from flsplit.model.profile import BlockProfile, CutProfile, profile_model
from flsplit.model.splitting import as_split_model, flatten_torchvision
from flsplit.model.zoo import MODELS, build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- hand-written literal cases ------------------------------------------------------------


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("batch_size", [2, 5])
@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.float64, 8)])
def test_tiny_mlp_by_hand(batch_size, dtype, nbytes):
    torch.manual_seed(0)
    profile = profile_model(mlp().to(dtype), (4,), batch_size=batch_size)
    # Linear(4,3): forward 2*4*3 = 24; first block, so backward is the weight gradient only: 24.
    # ReLU: 0. Linear(3,2): forward 2*3*2 = 12; backward grad-input + grad-weight = 2*12 = 24.
    assert profile.blocks == [
        BlockProfile(forward_flops=24, backward_flops=24, output_elements=3, param_bytes=(4 * 3 + 3) * nbytes),
        BlockProfile(forward_flops=0, backward_flops=0, output_elements=3, param_bytes=0),
        BlockProfile(forward_flops=12, backward_flops=24, output_elements=2, param_bytes=(3 * 2 + 2) * nbytes),
    ]
    client_bytes, server_bytes = 15 * nbytes, 8 * nbytes
    assert profile.cuts == [
        CutProfile(1, 24, 24, 12, 24, 3, client_bytes, server_bytes),
        CutProfile(2, 24, 24, 12, 24, 3, client_bytes, server_bytes),
    ]
    assert profile.as_dicts() == [asdict(c) for c in profile.cuts]
    assert profile.as_dicts()[0] == dict(
        cut=1,
        client_forward_flops=24,
        client_backward_flops=24,
        server_forward_flops=12,
        server_backward_flops=24,
        smashed_elements=3,
        client_param_bytes=client_bytes,
        server_param_bytes=server_bytes,
    )


def test_deeper_mlp_backward_is_four_n_m_after_the_first_block():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Linear(6, 3))
    profile = profile_model(model, (5,), batch_size=3)
    assert [b.forward_flops for b in profile.blocks] == [2 * 5 * 7, 0, 2 * 7 * 6, 2 * 6 * 3]
    assert [b.backward_flops for b in profile.blocks] == [2 * 5 * 7, 0, 4 * 7 * 6, 4 * 6 * 3]
    assert [b.param_bytes for b in profile.blocks] == [4 * (35 + 7), 0, 4 * 42, 4 * (18 + 3)]
    c = profile.cut(3)
    assert (c.client_forward_flops, c.server_forward_flops) == (70 + 84, 36)
    assert (c.client_backward_flops, c.server_backward_flops) == (70 + 168, 72)
    assert c.smashed_elements == 6


def test_conv_net_by_hand():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # 6x6 -> 6x6
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False),  # (6 + 2 - 3) // 2 + 1 = 3
        nn.Flatten(1),
        nn.Linear(3 * 3 * 3, 5),
    )
    profile = profile_model(model, (2, 6, 6))
    conv1 = 2 * 2 * 4 * 3 * 3 * 6 * 6  # 2*Cin*Cout*kh*kw*Hout*Wout = 5184
    conv2 = 2 * 4 * 3 * 3 * 3 * 3 * 3  # = 1944
    fc = 2 * 27 * 5
    assert [b.forward_flops for b in profile.blocks] == [conv1, 0, conv2, 0, fc]
    assert [b.backward_flops for b in profile.blocks] == [conv1, 0, 2 * conv2, 0, 2 * fc]
    assert [b.output_elements for b in profile.blocks] == [4 * 36, 4 * 36, 27, 27, 5]
    assert [b.param_bytes for b in profile.blocks] == [4 * (2 * 4 * 9 + 4), 0, 4 * 4 * 3 * 9, 0, 4 * (27 * 5 + 5)]
    assert profile.cut(2) == CutProfile(2, conv1, conv1, conv2 + fc, 2 * conv2 + 2 * fc, 144, 4 * 76, 4 * (108 + 140))
    assert profile.cut(3) == CutProfile(3, conv1 + conv2, conv1 + 2 * conv2, fc, 2 * fc, 27, 4 * (76 + 108), 4 * 140)


def test_first_block_without_parameters():
    """Raw data through a pool: nothing to differentiate there, but the Linear after it needs dx."""
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(1), nn.Linear(1 * 2 * 2, 3))
    profile = profile_model(model, (1, 4, 4))
    assert [b.forward_flops for b in profile.blocks] == [0, 0, 2 * 4 * 3]
    assert [b.backward_flops for b in profile.blocks] == [0, 0, 4 * 4 * 3]
    assert profile.cut(1) == CutProfile(1, 0, 0, 24, 48, 4, 0, 4 * 15)


def test_invalid_profile_cuts_name_the_range():
    profile = profile_model(mlp(), (4,))
    assert [c.cut for c in profile.cuts] == [1, 2]
    for bad in (0, 3, -1, 1.5, True, "1", None):
        with pytest.raises(ValueError, match=r"valid cuts are 1\.\.2"):
            profile.cut(bad)


# --- leaving the model alone -----------------------------------------------------------------


def test_profile_leaves_weights_stats_grads_modes_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Flatten(1),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )
    model.train()
    model[6].eval()  # a frozen batch norm inside a training model
    with torch.no_grad():  # non-default running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[6].running_var.uniform_(0.5, 2)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    model[7].bias.grad = None  # a mix of accumulated and absent gradients

    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    profile = profile_model(model, (1, 8, 8), batch_size=4)
    assert profile.blocks[1].forward_flops == 0 and profile.blocks[0].forward_flops == 2 * 1 * 4 * 9 * 36

    after = model.state_dict()
    assert after.keys() == state.keys()
    for k in state:  # weights, running mean/var and num_batches_tracked
        assert torch.equal(after[k], state[k]), k
    for n, p in model.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_profile_of_eval_model_keeps_it_in_eval():
    torch.manual_seed(0)
    split = build_model("digits-cnn", in_channels=1, image_size=8)
    split.blocks.eval()
    before = {k: v.clone() for k, v in split.blocks.state_dict().items()}
    profile_model(split, (1, 8, 8))
    assert not any(m.training for m in split.blocks.modules())
    assert all(torch.equal(before[k], v) for k, v in split.blocks.state_dict().items())


# --- the zoo and torchvision, from per-layer arithmetic ---------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer's hand-computed cost per sample: forward FLOPs, parameters, output elements."""

    fwd: int
    params: int
    out: int


def conv(cin: int, cout: int, k: int, side_out: int, bias: bool = True) -> Layer:
    return Layer(2 * cin * cout * k * k * side_out * side_out, cin * cout * k * k + (cout if bias else 0), cout * side_out**2)


def linear(n: int, m: int) -> Layer:
    return Layer(2 * n * m, n * m + m, m)


def bn(c: int, side: int) -> Layer:
    return Layer(0, 2 * c, c * side * side)  # weight and bias; running stats are buffers


def free(out: int) -> Layer:
    """Activation, pooling, flatten, dropout: no counted FLOPs, no parameters."""
    return Layer(0, 0, out)


def block(*layers: Layer) -> Layer:
    return Layer(sum(l.fwd for l in layers), sum(l.params for l in layers), layers[-1].out)


def basic_block(cin: int, planes: int, stride: int, side_out: int) -> Layer:
    """ResNet basic block: two 3x3 convs with BN, a 1x1 conv + BN shortcut when the shape changes."""
    layers = [conv(cin, planes, 3, side_out, False), bn(planes, side_out)]
    layers += [conv(planes, planes, 3, side_out, False), bn(planes, side_out)]
    if stride != 1 or cin != planes:
        layers += [conv(cin, planes, 1, side_out, False), bn(planes, side_out)]
    return block(*layers)


def resnet_body(side: int) -> list[Layer]:
    """layer1..layer4 of ResNet18 from a ``side`` x ``side`` 64-channel map."""
    blocks, cin = [], 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        side = (side + 2 - 3) // stride + 1  # 3x3 conv, padding 1
        blocks += [basic_block(cin, planes, stride, side), basic_block(planes, planes, 1, side)]
        cin = planes
    return blocks


VGG_CFG = {  # Simonyan & Zisserman, configurations A, B, D
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def spec_digits_cnn() -> list[Layer]:
    return [
        conv(1, 16, 3, 8),
        free(16 * 64),
        conv(16, 32, 3, 8),
        free(32 * 64),
        free(32 * 16),  # 2x2 pool: 4x4
        free(512),
        linear(512, 64),
        free(64),
        linear(64, 10),
    ]


def spec_lenet(in_channels: int) -> list[Layer]:
    # 28x28 padded by 2 (or 32x32 unpadded): 5x5 conv -> 28, pool -> 14, 5x5 conv -> 10, pool -> 5.
    return [
        conv(in_channels, 6, 5, 28),
        free(6 * 28 * 28),
        free(6 * 14 * 14),
        conv(6, 16, 5, 10),
        free(16 * 100),
        free(16 * 25),
        free(400),
        linear(400, 120),
        free(120),
        linear(120, 84),
        free(84),
        linear(84, 10),
    ]


def spec_cifar_vgg(name: str, channels: int = 3) -> list[Layer]:
    blocks, c, side = [], channels, 32  # 28x28 inputs: the first conv pads them to 32x32
    for v in VGG_CFG[name]:
        if v == "M":
            side //= 2
            blocks.append(free(c * side * side))
        else:
            blocks += [conv(c, v, 3, side), bn(v, side), free(v * side * side)]
            c = v
    return blocks + [free(512), linear(512, 10)]


def spec_cifar_resnet18(side: int) -> list[Layer]:
    return [conv(3, 64, 3, side, False), bn(64, side), free(64 * side * side)] + resnet_body(side) + [
        free(512),
        free(512),
        linear(512, 10),
    ]


def spec_torchvision_resnet18(side: int) -> list[Layer]:
    s1 = (side + 2 * 3 - 7) // 2 + 1  # 7x7 conv, stride 2, padding 3
    s2 = (s1 + 2 * 1 - 3) // 2 + 1  # 3x3 max pool, stride 2, padding 1
    stem = [conv(3, 64, 7, s1, False), bn(64, s1), free(64 * s1 * s1), free(64 * s2 * s2)]
    return stem + resnet_body(s2) + [free(512), free(512), linear(512, 10)]


def spec_torchvision_vgg11(side: int) -> list[Layer]:
    blocks, c = [], 3
    for v in VGG_CFG["vgg11"]:
        if v == "M":
            side //= 2
            blocks.append(free(c * side * side))
        else:
            blocks += [conv(c, v, 3, side), free(v * side * side)]
            c = v
    n = 512 * 7 * 7  # adaptive average pooling to 7x7, then flatten
    blocks += [free(n), free(n)]
    return blocks + [linear(n, 4096), free(4096), free(4096), linear(4096, 4096), free(4096), free(4096), linear(4096, 10)]


def assert_profile_matches(profile, spec: list[Layer], nbytes: int = 4) -> None:
    """Every block and every cut against the hand-computed layers (first block: 1x backward)."""
    backward = [spec[0].fwd] + [2 * l.fwd for l in spec[1:]]
    expected_blocks = [
        BlockProfile(forward_flops=l.fwd, backward_flops=b, output_elements=l.out, param_bytes=l.params * nbytes)
        for l, b in zip(spec, backward)
    ]
    assert len(profile.blocks) == len(spec)
    for i, (got, want) in enumerate(zip(profile.blocks, expected_blocks)):
        assert got == want, f"block {i}"
    total_fwd, total_bwd = sum(l.fwd for l in spec), sum(backward)
    total_bytes = nbytes * sum(l.params for l in spec)
    assert [c.cut for c in profile.cuts] == list(range(1, len(spec)))
    for c in profile.cuts:
        k = c.cut
        assert c.client_forward_flops == sum(l.fwd for l in spec[:k])
        assert c.client_backward_flops == sum(backward[:k])
        assert c.smashed_elements == spec[k - 1].out
        assert c.client_param_bytes == nbytes * sum(l.params for l in spec[:k])
        # client + server totals are the same at every cut
        assert c.client_forward_flops + c.server_forward_flops == total_fwd
        assert c.client_backward_flops + c.server_backward_flops == total_bwd
        assert c.client_param_bytes + c.server_param_bytes == total_bytes


def _profile_unchanged(model: nn.Module, input_shape, **kw):
    """Profile, asserting the model's state dict (weights, BN statistics) is bit-identical after."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile = profile_model(model, input_shape, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return profile


ZOO = [
    ("digits-cnn", 1, 8, spec_digits_cnn),
    ("lenet", 1, 28, lambda: spec_lenet(1)),
    ("lenet", 3, 32, lambda: spec_lenet(3)),
    ("vgg11", 3, 32, lambda: spec_cifar_vgg("vgg11")),
    ("vgg11", 1, 28, lambda: spec_cifar_vgg("vgg11", 1)),
    ("vgg13", 3, 32, lambda: spec_cifar_vgg("vgg13")),
    ("vgg16", 3, 32, lambda: spec_cifar_vgg("vgg16")),
    ("resnet18", 3, 8, lambda: spec_cifar_resnet18(8)),
]


@pytest.mark.parametrize("name, channels, side, spec", ZOO, ids=[f"{z[0]}-{z[2]}" for z in ZOO])
def test_zoo_profiles(name, channels, side, spec):
    torch.manual_seed(0)
    split = build_model(name, num_classes=10, in_channels=channels, image_size=side)
    profile = _profile_unchanged(split.blocks, (channels, side, side))
    assert_profile_matches(profile, spec())


def test_zoo_parameter_totals_match_published_counts():
    # CIFAR ResNet18 with 10 classes has 11,173,962 parameters (the commonly quoted figure).
    assert sum(l.params for l in spec_cifar_resnet18(32)) == 11_173_962
    assert sum(p.numel() for p in MODELS["resnet18"]().parameters()) == 11_173_962


def test_float64_doubles_bytes_not_flops():
    torch.manual_seed(0)
    model = MODELS["digits-cnn"]().double()
    assert_profile_matches(_profile_unchanged(model, (1, 8, 8)), spec_digits_cnn(), nbytes=8)


def test_torchvision_resnet18_profile():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    spec = spec_torchvision_resnet18(32)
    # torchvision documents 11,689,512 parameters with 1000 classes; fc is 512*c + c.
    assert sum(l.params for l in spec) == 11_689_512 - 513 * 1000 + 513 * 10
    profile = _profile_unchanged(model, (3, 32, 32))  # a plain torchvision model is flattened
    assert_profile_matches(profile, spec)


def test_torchvision_vgg11_profile():
    """Also the in-place ReLU case: every ReLU block gets a leaf that requires grad."""
    with torch.device("meta"):  # torchvision's constructor without its slow random init
        model = torchvision.models.vgg11(weights=None, num_classes=10)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.001)
    spec = spec_torchvision_vgg11(32)
    # torchvision documents 132,863,336 parameters with 1000 classes; the last Linear is 4096*c + c.
    assert sum(l.params for l in spec) == 132_863_336 - 4097 * 1000 + 4097 * 10
    split = flatten_torchvision(model)
    profile = profile_model(split, (3, 32, 32))
    assert_profile_matches(profile, spec)
    assert all(bool((p == 0.001).all()) and p.grad is None for p in model.parameters())
    # Largest smashed data: the first conv's 64x32x32 map; the avgpool/flatten cut: 25088.
    assert max(c.smashed_elements for c in profile.cuts) == 64 * 32 * 32
    assert profile.cut(22).smashed_elements == profile.cut(23).smashed_elements == 25088


def test_profile_accepts_split_models_and_sequentials_alike():
    torch.manual_seed(0)
    model = MODELS["digits-cnn"]()
    assert profile_model(model, (1, 8, 8)) == profile_model(as_split_model(model), (1, 8, 8))
    assert math.isclose(
        profile_model(model, (1, 8, 8)).cut(1).client_forward_flops, 2 * 1 * 16 * 9 * 64
    )
