"""LoRA adapters on a split model's blocks (flsplit/model/lora.py): GPT-2 and Llama with
adapters, trained as split learning trains them, equal ``peft.get_peft_model`` on the unsplit
Hugging Face model (float64); only the adapters (and a head trained in full) change; a client
part's trainable tensors are its adapters; ``merge_lora`` gives the pre-LoRA keys and the
adapted logits, and ``export_hf`` writes it loadable by ``from_pretrained``; the zoo's gpt-tiny
takes adapters on ``linear1``/``linear2``; ``freeze`` freezes a part."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flsplit.model.hf import build_hf_model, export_hf  # noqa: E402
from flsplit.model.lora import TARGETS, add_lora, freeze, lora_family, merge_lora, trainable_keys  # noqa: E402
from flsplit.model.splitting import SplitModel, as_split_model  # noqa: E402
from flsplit.model.zoo import gpt_tiny  # noqa: E402

T, HIDDEN, LAYERS, HEADS, VOCAB, RANK, ALPHA, CUT = 8, 32, 2, 4, 64, 4, 8.0, 2
DECODERS = ["gpt2", "llama"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one thread is as fast."""


def build(kind: str, dtype=torch.float64, seed: int = 0) -> SplitModel:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's head untied for the split
        return build_hf_model(kind, vocab_size=VOCAB, seq_len=T, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                              num_labels=3, dtype=dtype)


def batch(seed: int, size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (size, T + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]  # tokens, next-token labels


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def peft_reference(split: SplitModel, kind: str) -> torch.nn.Module:
    """``peft.get_peft_model`` on a copy of the unsplit Hugging Face model, same LoRA settings."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS[kind]), fan_in_fan_out=kind == "gpt2")
    return peft.get_peft_model(copy.deepcopy(split.original.model), config)


def peft_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v for k, v in reference.state_dict().items()}


def randomize_lora_b(module: torch.nn.Module, seed: int = 5) -> None:
    """lora_B starts at zero (the adapted model is the base model): give it values to show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def split_step(split: SplitModel, x: torch.Tensor, y: torch.Tensor, optimizers: list) -> None:
    """One split-learning step at CUT: client forward, the activation crosses detached, server
    forward/loss/backward, the cut gradient crosses back, client backward, each part steps."""
    smashed = split.client_part(CUT)(x)
    received = smashed.detach().requires_grad_(True)
    loss_of(split.server_part(CUT)(received), y).backward()
    smashed.backward(received.grad)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def sgd(module: torch.nn.Module, lr: float = 0.5) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)


@pytest.mark.parametrize("kind", DECODERS)
def test_split_lora_training_equals_peft_on_the_unsplit_model(kind):
    split = build(kind)
    torch.manual_seed(1)
    reference = peft_reference(split, kind)
    torch.manual_seed(1)
    add_lora(split, rank=RANK, alpha=ALPHA)
    # the blocks' state is peft's, key for key, and the same seed drew the same adapters
    ours, want = split.to_original_state_dict(), peft_state(reference)
    assert list(ours) == list(want)
    assert all(torch.equal(ours[k], want[k]) for k in want)
    randomize_lora_b(reference)
    randomize_lora_b(split.blocks)
    x0, _ = batch(0)
    split.blocks.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(split.blocks(x0), reference(input_ids=x0).logits, rtol=0, atol=1e-12)
    split.blocks.train(), reference.train()
    ref_opt, opts = sgd(reference), [sgd(split.client_part(CUT)), sgd(split.server_part(CUT))]
    for step in range(3):
        x, y = batch(10 + step)
        loss_of(reference(input_ids=x).logits, y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        split_step(split, x, y, opts)
    ours, want = split.to_original_state_dict(), peft_state(reference)
    lora = [k for k in want if "lora_" in k]
    assert lora and max(float((ours[k] - want[k]).abs().max()) for k in lora) <= 1e-10
    assert all(torch.equal(ours[k], want[k]) for k in want if k not in lora)  # both left the base alone


@pytest.mark.parametrize("kind", DECODERS)
def test_training_changes_only_the_trainable_keys(kind):
    split = add_lora(build(kind), rank=RANK, alpha=ALPHA, seed=0)
    before = {k: v.clone() for k, v in split.blocks.state_dict().items()}
    keys = trainable_keys(split.blocks)
    assert keys and all("lora_" in k for k in keys)
    assert all(not p.requires_grad for n, p in split.blocks.named_parameters() if "lora_" not in n)
    assert split.verify(batch(0)[0]) <= 1e-12  # the unsplit model (sharing the modules) has the adapters too
    opts = [sgd(split.client_part(CUT)), sgd(split.server_part(CUT))]
    for step in range(2):  # lora_B moves in step 1, lora_A (whose gradient is B-weighted) in step 2
        split_step(split, *batch(step), opts)
    after = split.blocks.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(keys)


def test_trainable_keys_of_the_parts_and_their_size():
    split = add_lora(build("gpt2"), rank=2, alpha=4.0, seed=0)
    client, server = split.client_part(CUT), split.server_part(CUT)
    client_keys, state = trainable_keys(client), client.state_dict()
    # the client sends its adapters alone: the embedding is frozen
    assert client_keys == [k for k in state if "lora_" in k] and len(client_keys) == 8  # 4 layers x (A, B)
    assert trainable_keys(server) == [k for k in server.state_dict() if "lora_" in k]  # the LM head is frozen
    sent = sum(state[k].numel() for k in client_keys)
    full = sum(v.numel() for k, v in state.items() if "lora_" not in k)
    assert sent / full < 0.1
    server_state = server.state_dict()
    server_sent = sum(server_state[k].numel() for k in trainable_keys(server))
    assert server_sent / sum(v.numel() for k, v in server_state.items() if "lora_" not in k) < 0.1
    # keys are in state-dict order and name the parameters themselves
    assert trainable_keys(split.blocks) == [k for k in split.blocks.state_dict() if "lora_" in k]


def test_a_head_trained_in_full_is_trainable_and_gets_no_adapters():
    split = add_lora(build("gpt2"), rank=RANK, alpha=ALPHA, train_head=True, seed=0)
    server = split.server_part(split.num_blocks - 1)  # the head block alone, keys "3.…"
    head = trainable_keys(server)
    assert head == list(server.state_dict()) and head and not any("lora_" in k for k in head)
    # BERT's classifier is new for the task: trained in full by default, and the pooler's
    # "dense" (a target name) is not adapted there
    bert = add_lora(build("bert"), rank=RANK, alpha=ALPHA, seed=0)
    assert lora_family(bert) == "bert"
    head = trainable_keys(bert.blocks[-1])
    assert {"bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= set(head)
    assert not any("lora_" in k for k in head)
    assert all("lora_" in k for k in trainable_keys(bert.blocks[:-1]))
    layer = set(trainable_keys(bert.blocks[1]))
    for target in ("query", "key", "value", "attention.output.dense", "intermediate.dense", "0.output.dense"):
        assert any(f"{target}.lora_A" in k for k in layer), target


def test_adapters_are_deterministic_and_a_seed_leaves_the_global_stream():
    first = add_lora(build("llama"), rank=RANK, alpha=ALPHA, seed=7)
    second = build("llama")
    stream = torch.get_rng_state()
    add_lora(second, rank=RANK, alpha=ALPHA, seed=7)
    assert torch.equal(torch.get_rng_state(), stream)  # seed: nothing drawn from the global generator
    a, b = first.blocks.state_dict(), second.blocks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ADAPTER_DIGEST = """
import hashlib, sys, warnings
import torch
sys.path.insert(0, "tests")
from test_lora import build
from flsplit.model.lora import add_lora, trainable_keys
split = build("gpt2")
torch.manual_seed(11)  # the caller seeds; every process draws the same adapters
add_lora(split, rank=4, alpha=8.0)
state = split.blocks.state_dict()
print(hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in trainable_keys(split.blocks))).hexdigest())
"""


def test_every_process_draws_the_same_adapters():
    split = build("gpt2")
    torch.manual_seed(11)
    add_lora(split, rank=RANK, alpha=ALPHA)
    state = split.blocks.state_dict()
    here = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in trainable_keys(split.blocks))).hexdigest()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", ADAPTER_DIGEST], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == here


@pytest.mark.parametrize("kind", DECODERS)
def test_merge_gives_the_original_keys_and_the_adapted_logits(kind):
    split = build(kind)
    original_keys = list(split.original.model.state_dict())
    add_lora(split, rank=RANK, alpha=ALPHA, seed=0)
    randomize_lora_b(split.blocks)
    x, _ = batch(3)
    split.blocks.eval()
    merged = merge_lora(split)
    with torch.no_grad():
        adapted, got = split.blocks(x), merged.blocks(x)
    assert list(merged.to_original_state_dict()) == original_keys
    assert list(merged.original.model.state_dict()) == original_keys
    assert torch.allclose(got, adapted, rtol=0, atol=1e-10)
    assert not torch.allclose(adapted, build(kind).blocks.eval()(x))  # the adapters did change the model
    assert any("lora_" in k for k in split.blocks.state_dict())  # the adapted model is left as it was


@pytest.mark.parametrize("kind", DECODERS)
def test_merged_model_exports_and_loads_with_from_pretrained(kind, tmp_path):
    split = add_lora(build(kind, dtype=None), rank=RANK, alpha=ALPHA, seed=0)
    split.blocks.train()
    split_step(split, *batch(1), [sgd(split.blocks, lr=0.1)])
    split_step(split, *batch(2), [sgd(split.blocks, lr=0.1)])
    merged = merge_lora(split)
    merged.blocks.eval()
    x, _ = batch(4)
    with torch.no_grad():
        want = merged.blocks(x)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(export_hf(merged, tmp_path / "hf")).eval()
        got = loaded(input_ids=x).logits
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="merge_lora"):  # unmerged, the keys are peft's
        export_hf(split, tmp_path / "unmerged")


def tiny_gpt(seed: int = 0) -> SplitModel:
    torch.manual_seed(seed)
    return as_split_model(gpt_tiny(VOCAB, T, dim=HIDDEN, depth=LAYERS, heads=HEADS).double())


def test_gpt_tiny_adapters_on_the_feed_forward_train_and_the_base_stays():
    split = add_lora(tiny_gpt(), rank=RANK, alpha=ALPHA, seed=0)
    assert lora_family(split) == "encoder"
    keys = trainable_keys(split.blocks)
    assert len(keys) == 2 * 2 * LAYERS and all(".linear1.lora_" in k or ".linear2.lora_" in k for k in keys)
    before = {k: v.clone() for k, v in split.blocks.state_dict().items()}
    opts = [sgd(split.client_part(CUT)), sgd(split.server_part(CUT))]
    split.blocks.train()
    for step in range(2):
        split_step(split, *batch(step), opts)
    after = split.blocks.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(keys)


@pytest.mark.parametrize("targets", [None, ["linear1", "linear2", "self_attn"]])
def test_gpt_tiny_merge_equals_the_adapted_model_in_train_and_eval(targets):
    """Also in eval under no_grad, where nn.TransformerEncoderLayer may take its fused fast path,
    which reads linear1/linear2's weights directly and would skip an adapter; and with peft's
    merge-before-forward LoRA on nn.MultiheadAttention."""
    split = add_lora(tiny_gpt(), rank=RANK, alpha=ALPHA, targets=targets, seed=0)
    randomize_lora_b(split.blocks)
    merged = merge_lora(split)
    keys, want = list(merged.blocks.state_dict()), list(tiny_gpt().blocks.state_dict())
    # peft's MultiheadAttention unloading registers in_proj_weight after in_proj_bias: same keys
    assert keys == want if targets is None else sorted(keys) == sorted(want)
    x, _ = batch(2)
    base = tiny_gpt().blocks
    for train in (True, False):
        split.blocks.train(train), merged.blocks.train(train), base.train(train)
        with torch.no_grad():
            adapted, got = split.blocks(x), merged.blocks(x)
            assert torch.allclose(got, adapted, rtol=0, atol=1e-10)
            assert not torch.allclose(adapted, base(x))


def test_freeze_leaves_nothing_trainable():
    split = add_lora(build("gpt2"), rank=RANK, alpha=ALPHA, seed=0)
    client = split.client_part(CUT)
    freeze(client)
    assert not any(p.requires_grad for p in client.parameters()) and trainable_keys(client) == []
    assert trainable_keys(split.server_part(CUT))  # the server part keeps training


def test_targets_must_be_named_or_found():
    plain = as_split_model(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="name them"):
        add_lora(plain)
    with pytest.raises(ValueError, match="found none"):
        add_lora(plain, targets=["q_proj"])
    add_lora(plain, targets=["0", "2"], rank=2, seed=0)  # a Sequential's layers are named by index
    assert trainable_keys(plain.blocks) == ["0.lora_A.default.weight", "0.lora_B.default.weight",
                                            "2.lora_A.default.weight", "2.lora_B.default.weight"]
