"""Splitting any nn.Module from its torch.fx graph (issue 20 item 1).

Forward and backward of the split model equal the original's, whatever crosses a cut (skip
connections, several tensors); a split model trains through the real runtime as the unsplit
model trains in plain torch; cuts that cannot be made are refused naming the point and why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from flwr.app import ArrayRecord
from torch import nn

from flsplit.runtime.client import SplitClient
from flsplit.wire.codecs import get_codec
from flsplit.data.datasets import TensorData
from flsplit.model.graph_split import GraphSplitError, pack, unpack
from flsplit.planes.inprocess import InProcessGrid
from flsplit.model.profile import profile_model
from flsplit.wire.protocol import SmashedBatch, encode_batches
from flsplit.model.splitting import SplitMismatch, SplitModel, as_split_model
from flsplit.strategies import PSL, SL
from tests.helpers import client_app_of, max_abs_diff


# ------------------------------------------------------------------------------ models
class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class ResMLP(nn.Module):
    """A residual MLP: the skip of each block crosses a cut inside it."""

    def __init__(self, features: int = 30, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList([Residual(width), Residual(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.inp(x))
        for block in self.blocks:
            x = block(x)
        return self.head(F.relu(x))


class FunctionalCNN(nn.Module):
    """Functional ops in forward (pooling, activation, flatten, dropout) between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = F.dropout(torch.flatten(x, 1), p=0.2, training=self.training)
        return self.fc(x)


class TinyUNet(nn.Module):
    """A U-shaped net with a long skip: the encoder's output is concatenated after the decoder."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        e = self.enc(x)
        m = self.mid(self.down(e))
        d = self.dec(torch.cat([self.up(m), e], dim=1))
        return self.head(d.mean(dim=(2, 3)))


class Gated(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace into it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate, self.head = nn.Linear(6, 6), Gated(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.gate(self.inp(x)))


def _double(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model.double()


# ------------------------------------------------------------------------------ exactness
RESNET_STAGE_CUTS = ["layer1", "layer2", "layer3", "layer4", "avgpool"]


@pytest.mark.parametrize("cut", RESNET_STAGE_CUTS + ["layer2.0.conv2", "layer3.1.bn2"])
def test_resnet18_splits_at_stage_boundaries_and_inside_a_skip(cut):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    split = as_split_model(model, example_input=x, cuts=[cut], verify=False)
    assert split.num_blocks == 2 and split.cut_names == [cut]
    # Forward and every parameter gradient, to 1e-9 of each one's largest value (float64's
    # default; where a skip crosses, its gradient is summed in another order: equal to
    # rounding, not to the bit).
    assert split.verify(x) <= 1e-6
    with torch.no_grad():
        assert torch.equal(split.blocks.eval()(x), model.eval()(x))  # the forward is bit for bit
    crossing = split.crossing(1)
    if cut in ("layer2.0.conv2", "layer3.1.bn2"):
        assert len(crossing) == 2  # the block's input (the skip) crosses with the main path
    else:
        assert len(crossing) == 1


def test_resnet18_forward_equals_torchvision_bit_for_bit_at_every_stage():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    split = as_split_model(model, example_input=x, cuts=RESNET_STAGE_CUTS)
    with torch.no_grad():
        assert torch.equal(split.blocks.eval()(x), model(x))
    # The blocks' state dict maps back to torchvision's names.
    assert split.to_original_state_dict().keys() <= model.state_dict().keys()


def test_unet_long_skip_crosses_every_cut_between_encoder_and_decoder():
    model = _double(TinyUNet())
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    split = as_split_model(model, example_input=x, cuts=["down", "up", "dec"], verify=False)
    assert split.verify(x, rtol=1e-12, atol=1e-12) <= 1e-12
    # The encoder's output e (4 x 8 x 8 per sample) is alive at 'down' (alone) and at 'up' (with m).
    assert [c.shape for c in split.crossing(1)] == [(4, 8, 8)]
    assert sorted(c.shape for c in split.crossing(2)) == [(4, 8, 8), (8, 4, 4)]
    assert [c.shape for c in split.crossing(3)] == [(8, 8, 8)]  # after the concatenation: one tensor


def test_functional_ops_and_dropout_split_at_default_points():
    model = _double(FunctionalCNN())
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    split = as_split_model(model, example_input=x, verify=False)
    assert split.cut_names == ["conv2", "fc"]
    assert split.verify(x, rtol=1e-12, atol=1e-12) <= 1e-12  # train mode too: same dropout masks


def test_residual_mlp_default_points_are_its_top_level_modules():
    model = _double(ResMLP())
    x = torch.randn(4, 30, dtype=torch.float64)
    split = as_split_model(model, example_input=x)
    assert split.cut_names == ["blocks.0", "blocks.1", "head"]
    inside = as_split_model(model, example_input=x, cuts=["blocks.0.fc2"])
    assert [c.name for c in inside.crossing(1)] == ["relu", "relu_1"]  # the skip and the main path


def test_bytes_per_crossing_tensor_are_the_packed_payload():
    """A packed crossing sends each tensor's values once: payload bytes = batch * sum of
    per-sample sizes * bytes per value, per codec."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    split = as_split_model(model, example_input=x, cuts=["layer3.0.conv2"])
    crossing = split.crossing(1)
    per_sample = {c.name: c.elements for c in crossing}
    assert per_sample == {"layer2_1_relu_1": 128 * 4 * 4, "layer3_0_relu": 256 * 2 * 2}
    with torch.no_grad():
        smashed = split.client_part(1)(x)
    assert smashed.shape == (2, sum(per_sample.values()))
    for codec, width in (("fp32", 4), ("bf16", 2), ("fp8-e4m3", 1)):
        record = encode_batches([SmashedBatch(smashed, torch.zeros(2, dtype=torch.int64))], get_codec(codec))
        assert record["x.0"].numpy().nbytes == 2 * (128 * 16 + 256 * 4) * width
    profile = profile_model(split, (3, 32, 32))
    assert profile.cut(1).smashed_elements == 128 * 16 + 256 * 4


def test_pack_and_unpack_are_exact_and_keep_dtypes():
    a = torch.randn(3, 2, 5)
    mask = torch.rand(3, 4) > 0.5
    ids = torch.randint(0, 1000, (3, 7))
    packed = pack(a, mask, ids)
    assert packed.shape == (3, 10 + 4 + 7) and packed.dtype == torch.float32
    back = unpack(packed, ((2, 5), (4,), (7,)), (torch.float32, torch.bool, torch.int64))
    assert torch.equal(back[0], a) and torch.equal(back[1], mask) and torch.equal(back[2], ids)
    with pytest.raises(ValueError, match="21 values per sample"):
        unpack(packed[:, :20], ((2, 5), (4,), (7,)), (torch.float32, torch.bool, torch.int64))


# ------------------------------------------------------------------------------ training
def _model_fn():
    torch.manual_seed(7)
    model = ResMLP(features=30, width=16, classes=3).double()
    return as_split_model(model, example_input=torch.zeros(2, 30, dtype=torch.float64), cuts=["blocks.0.fc2", "head"])


def _data(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 30, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _run(cls, parts, **kwargs):
    clients = [SplitClient(_model_fn, d, d, salt=i) for i, d in enumerate(parts)]
    grid = InProcessGrid(client_app_of(clients), len(parts))
    strategy = cls(model_fn=_model_fn, input_shape=(30,), num_classes=3, learning_rate=0.1, shuffle=False, **kwargs)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(_model_fn().blocks.state_dict()), num_rounds=1)
    return strategy, result


def _centralized(batches: list[TensorData], lr: float) -> dict[str, torch.Tensor]:
    """Plain torch on the unsplit ResMLP, under its own names."""
    torch.manual_seed(7)
    model = ResMLP(features=30, width=16, classes=3).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for b in batches:
        opt.zero_grad()
        F.cross_entropy(model(b.x), b.y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("cut", [1, 2])
def test_graph_split_model_trains_like_the_unsplit_model_under_sl(cut):
    """SL with one client on a residual MLP cut inside a residual block (two tensors cross)
    equals plain-torch SGD of the unsplit model on the same batches."""
    data = _data(24, seed=1)
    steps, b = 4, 6
    _, result = _run(SL, [data], cut_layer=cut, batch_size=b, max_steps=steps)
    split = _model_fn()
    got = split.to_original_state_dict(result.arrays.to_torch_state_dict())
    want = _centralized([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)], 0.1)
    assert max_abs_diff(got, want) <= 1e-12


def test_graph_split_model_under_psl_equals_centralized_on_the_union():
    parts = [_data(5, seed=2), _data(7, seed=3)]
    _, result = _run(PSL, parts, cut_layer=1, batch_size=8, max_steps=1)
    union = TensorData(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    got = _model_fn().to_original_state_dict(result.arrays.to_torch_state_dict())
    assert max_abs_diff(got, _centralized([union], 0.1)) <= 1e-12


# ------------------------------------------------------------------------------ refusals
def test_cut_inside_a_data_dependent_branch_is_refused_naming_it():
    model = WithGate()
    x = torch.randn(2, 6)
    with pytest.raises(GraphSplitError, match=r"cannot cut at 'gate.b': it is inside 'gate', whose forward cannot be traced"):
        as_split_model(model, example_input=x, cuts=["gate.b"])
    split = as_split_model(model, example_input=x, cuts=["gate", "head"])  # around it is fine
    assert split.cut_names == ["gate", "head"]


def test_data_dependent_top_level_forward_is_refused():
    with pytest.raises(GraphSplitError, match="top-level forward cannot be cut"):
        as_split_model(Gated(4), example_input=torch.randn(2, 4), cuts=["b"])


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(self.mid(self.emb(x)), self.emb.weight)


def test_a_parameter_used_on_both_sides_is_refused():
    with pytest.raises(GraphSplitError, match="'emb.weight' is used in block 0 and in block 1"):
        as_split_model(Tied(), example_input=torch.randn(2, 4), cuts=["mid"])


class InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x)) + x


def test_raw_input_crossing_to_the_server_is_refused():
    with pytest.raises(GraphSplitError, match="the model's input itself is used after it"):
        as_split_model(InputSkip(), example_input=torch.randn(2, 4), cuts=["b"])


class BatchStat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        centre = h.mean(dim=0, keepdim=True)
        return self.b(h) - centre


def test_a_crossing_value_without_a_batch_dimension_is_refused():
    with pytest.raises(GraphSplitError, match=r"first dimension is not the batch"):
        as_split_model(BatchStat(), example_input=torch.randn(3, 4), cuts=["b"])


def test_unknown_and_impossible_cut_points_are_refused():
    model, x = ResMLP(), torch.randn(2, 30)
    with pytest.raises(GraphSplitError, match=r"no such module \(top-level modules: \['inp', 'blocks', 'head'\]\)"):
        as_split_model(model, example_input=x, cuts=["layer9"])
    with pytest.raises(GraphSplitError, match="first operation"):
        as_split_model(model, example_input=x, cuts=["inp"])
    with pytest.raises(GraphSplitError, match="outside the model"):
        as_split_model(model, example_input=x, cuts=[7])
    with pytest.raises(GraphSplitError, match="a module path or an index"):
        as_split_model(model, example_input=x, cuts=[2.5])


def test_a_module_that_is_not_a_layer_stack_needs_an_example_input():
    with pytest.raises(TypeError, match="pass example_input"):
        as_split_model(ResMLP())


def test_a_wrong_example_input_names_the_shape():
    with pytest.raises(GraphSplitError, match=r"example_input of shape \(2, 29\) does not run through ResMLP"):
        as_split_model(ResMLP(), example_input=torch.randn(2, 29))


class TraceTimeTraining(nn.Module):
    """fx bakes ``self.training`` in at trace time (an fx limitation): eval differs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.flag = True

    def forward(self, x):
        h = self.a(x)
        if self.flag:  # a Python attribute read at trace time
            h = h * 2
        return self.b(h)


def test_verify_fails_loudly_when_the_split_model_computes_something_else():
    model = TraceTimeTraining()
    x = torch.randn(2, 4)
    split = as_split_model(model, example_input=x, cuts=["b"])
    model.flag = False  # the traced graph still doubles
    with pytest.raises(SplitMismatch, match="eval forward output differs from the original model's"):
        split.verify(x)


def test_layer_stacks_keep_their_blocks():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert as_split_model(seq).blocks is seq
    vgg = as_split_model(torchvision.models.vgg11(num_classes=10))
    assert isinstance(vgg, SplitModel) and vgg.original is None and vgg.cut_names is None


def test_a_strategy_takes_a_plain_module_and_cuts_by_name():
    """model_fn may return the plain module (split on zeros of input_shape, as the clients
    split it on their data); a cut may be given by the module it sits before."""
    def plain():
        torch.manual_seed(7)
        return ResMLP(features=30, width=16, classes=3).double()

    parts = [_data(8, seed=4), _data(8, seed=5)]
    clients = [SplitClient(plain, d, d, salt=i) for i, d in enumerate(parts)]
    strategy = PSL(model_fn=plain, input_shape=(30,), num_classes=3, cut_layer="blocks.1", batch_size=4, max_steps=2)
    assert strategy.model.cut_names == ["blocks.0", "blocks.1", "head"]
    result = strategy.start(grid=InProcessGrid(client_app_of(clients), 2), num_rounds=1,
                            initial_arrays=ArrayRecord(strategy.model.blocks.state_dict()))
    assert strategy.cuts and set(strategy.cuts.values()) == {2} and not strategy.errors
    assert result.arrays is not None
    with pytest.raises(ValueError, match=r"'layer9' is not a cut layer: cuts are integers 1..3, or the names \['blocks.0'"):
        PSL(model_fn=plain, input_shape=(30,), num_classes=3, cut_layer="layer9")
    with pytest.raises(ValueError, match=r"input_shape \(29,\)"):
        PSL(model_fn=plain, input_shape=(29,), num_classes=3)
