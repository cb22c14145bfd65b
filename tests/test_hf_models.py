"""Hugging Face models cut at a block (flsplit/model/hf.py): GPT-2, Llama (and the Llama-style
Qwen2, Qwen3, Mistral) and a BERT classifier, tiny and in float64. The blocks compute the Hugging
Face model's logits and every parameter gradient exactly, the hidden state crosses every cut, the
decoders stay causal, the blocks' state maps onto the Hugging Face keys, and ``export_hf`` writes
a checkpoint that ``from_pretrained`` loads with the blocks' current weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flsplit.model.hf import HFLogits, build_hf_model, export_hf, hf_split_model  # noqa: E402
from flsplit.model.splitting import SplitMismatch, SplitModel, block_output_shapes  # noqa: E402

KINDS = ["gpt2", "llama", "bert"]
DECODERS = ["gpt2", "llama"]
T, HIDDEN, LAYERS, HEADS, VOCAB, LABELS = 16, 32, 3, 4, 256, 3


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one thread is as fast."""


def build(kind: str, dtype=torch.float64, seed: int = 0, **kw) -> SplitModel:
    """A tiny split model (GPT-2's untying warning, which one test checks, silenced)."""
    settings = dict(vocab_size=VOCAB, seq_len=T, num_labels=LABELS, hidden=HIDDEN, layers=LAYERS, heads=HEADS)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_hf_model(kind, dtype=dtype, **{**settings, **kw})


def tokens(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(split: SplitModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The Hugging Face model's own forward, not through flsplit's wrapper."""
    with torch.no_grad():
        return split.original.model(input_ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_blocks_equal_the_unsplit_model_forward_and_backward(kind, attn):
    split = build(kind, attn_implementation=attn)
    assert split.original.model.config._attn_implementation == attn
    assert split.verify(tokens(), rtol=1e-9) <= 1e-12  # eval and train mode, outputs and every gradient


@pytest.mark.parametrize("kind", DECODERS)
def test_verify_sees_a_layer_block_that_drops_the_causal_mask(kind):
    """The check can fail: a decoder layer block attending both ways is not the model."""
    split = build(kind)
    split.blocks[2].mask = "bidirectional"
    with pytest.raises(SplitMismatch, match="eval forward output differs"):
        split.verify(tokens())


@pytest.mark.parametrize("kind", KINDS)
def test_one_block_per_layer_and_the_hidden_state_crosses_every_cut(kind):
    split = build(kind)
    assert split.num_blocks == LAYERS + 2 and split.input_shape == (T,) and split.input_dtype == torch.int64
    last = (T, VOCAB) if kind in DECODERS else (LABELS,)
    assert block_output_shapes(split, (T,)) == [(T, HIDDEN)] * (LAYERS + 1) + [last]


@pytest.mark.parametrize("kind", KINDS)
def test_split_forward_is_the_models_logits(kind):
    split, x = build(kind), tokens()
    split.blocks.eval()
    with torch.no_grad():
        got = split.blocks(x)
    want = hf_logits(split, x)
    assert got.shape == ((3, T, VOCAB) if kind in DECODERS else (3, LABELS))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_share_the_models_parameters(kind):
    split = build(kind)
    model_params = {id(p) for p in split.original.model.parameters()}
    block_params = [id(p) for p in split.blocks.parameters()]
    assert len(block_params) == len(model_params) and set(block_params) == model_params


@pytest.mark.parametrize("kind", DECODERS)
def test_decoders_are_causal(kind):
    split, x = build(kind), tokens(batch=2)
    split.blocks.eval()
    with torch.no_grad():
        before = split.blocks(x)
        for t in (0, 5, T - 1):
            changed = x.clone()
            changed[:, t] = (changed[:, t] + 1) % VOCAB
            after = split.blocks(changed)
            assert torch.equal(after[:, :t], before[:, :t]), f"token {t} changed an earlier logit"
            assert not torch.equal(after[:, t], before[:, t])


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_state_maps_onto_the_hugging_face_keys(kind):
    split = build(kind)
    model_state = split.original.model.state_dict()
    mapped = split.to_original_state_dict()
    assert list(mapped) == list(model_state)  # the same keys, in the same order
    assert all(torch.equal(mapped[k], model_state[k]) for k in model_state)


def _sgd_step(split: SplitModel, x: torch.Tensor, lr: float = 0.5) -> None:
    """One SGD step on the blocks (so an export that ignored the blocks' weights would show)."""
    split.blocks.train()
    split.blocks(x).float().square().mean().backward()
    with torch.no_grad():
        for p in split.blocks.parameters():
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_loads_the_current_weights(kind, tmp_path):
    split, x = build(kind, dtype=None), tokens()
    before = hf_logits(split, x)
    _sgd_step(split, x)
    split.blocks.eval()
    with torch.no_grad():
        current = split.blocks(x)
    assert not torch.allclose(current, before)
    assert export_hf(split, tmp_path / "hf") == tmp_path / "hf"
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, current, rtol=1e-6, atol=1e-6)
    # and flsplit loads it back as a split model, with its family named or read from the config
    for named in (kind, None):
        again = build_hf_model(named, path=tmp_path / "hf", seq_len=T)
        assert type(again.original.model) is type(split.original.model) and again.input_shape == (T,)
        again.blocks.eval()
        with torch.no_grad():
            assert torch.allclose(again.blocks(x), current, rtol=1e-6, atol=1e-6)


def test_export_writes_a_given_blocks_state(tmp_path):
    split, x = build("llama", dtype=None), tokens()
    other = build("llama", dtype=None, seed=7)
    export_hf(split, tmp_path, state=other.blocks.state_dict())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, hf_logits(other, x), rtol=1e-6, atol=1e-6)


def test_gpt2_head_is_untied_with_a_warning():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=HIDDEN, n_layer=2, n_head=HEADS, bos_token_id=None, eos_token_id=None))
    embedding, head = model.transformer.wte.weight, model.lm_head.weight
    assert head is embedding
    with pytest.warns(UserWarning, match="untie"):
        split = hf_split_model(model)
    assert model.lm_head.weight is not embedding and model.transformer.wte.weight is embedding
    assert model.lm_head.weight.data_ptr() != embedding.data_ptr()
    assert torch.equal(model.lm_head.weight, embedding)  # a copy: the untied model computes the same
    assert model.config.tie_word_embeddings is False
    client, server = split.client_part(1), split.server_part(1)
    assert not {id(p) for p in client.parameters()} & {id(p) for p in server.parameters()}


def test_llama_untied_by_default_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        build_hf_model("llama", vocab_size=VOCAB, seq_len=T, hidden=HIDDEN, layers=1, heads=HEADS)


def test_gpt2_with_its_default_dropout_verifies_in_train_mode():
    """Dropout (GPT-2's default 0.1 everywhere) draws the same masks in the blocks as in the
    unsplit model: ``verify`` seeds both alike, and checks train mode as well as eval."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=HIDDEN, n_layer=2, n_head=HEADS,
                                     bos_token_id=None, eos_token_id=None)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        split = hf_split_model(model, seq_len=T)
    assert split.verify(tokens(), rtol=1e-9) <= 1e-12
    split.blocks.train()
    with torch.no_grad():
        assert not torch.equal(split.blocks(tokens()), split.blocks(tokens()))  # dropout is on


@pytest.mark.parametrize("kind", KINDS)
def test_client_part_then_server_part_is_the_full_model(kind):
    split, x = build(kind), tokens()
    cut = split.num_blocks // 2
    split.blocks.eval()
    with torch.no_grad():
        smashed = split.client_part(cut)(x)
        assert smashed.shape == (3, T, HIDDEN)
        assert torch.equal(split.server_part(cut)(smashed), split.blocks(x))


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_llama_style_decoders_with_sliding_windows(name):
    """Qwen2 (a sliding-window layer after a full one) and Mistral (a 4-token window): each
    layer block rebuilds its own layer's mask."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=T)
    if name == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.MistralConfig(sliding_window=4, **common)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    split = hf_split_model(cls._from_config(config, attn_implementation="eager").double(), seq_len=T)
    x = tokens(batch=2)
    assert split.verify(x, rtol=1e-9) <= 1e-12
    split.blocks.eval()
    with torch.no_grad():
        assert torch.equal(split.blocks(x), hf_logits(split, x))
        changed = x.clone()
        changed[:, 0] = (changed[:, 0] + 1) % VOCAB
        reach = (split.blocks(changed) - split.blocks(x)).abs().amax(dim=(0, 2))
    # Mistral: two 4-token windows reach 6 tokens on; Qwen2's full first layer reaches every token.
    assert (reach[T - 1] == 0) == (name == "mistral")


@pytest.mark.parametrize("model", [
    lambda: transformers.GPT2Model(transformers.GPT2Config(n_embd=HIDDEN, n_layer=1, n_head=2, vocab_size=VOCAB)),
    lambda: torch.nn.Linear(2, 2),
], ids=["GPT2Model", "Linear"])
def test_an_unsupported_model_is_refused_by_name(model):
    with pytest.raises(TypeError, match=r"cannot split (GPT2Model|Linear): supported are GPT2LMHeadModel, "
                                        r"LlamaForCausalLM, .*BertForSequenceClassification"):
        hf_split_model(model())


def test_unknown_kind_and_foreign_split_models_are_refused():
    with pytest.raises(ValueError, match="unknown Hugging Face model kind 't5'"):
        build_hf_model("t5")
    with pytest.raises(TypeError, match="export_hf takes a split Hugging Face model"):
        export_hf(SplitModel(torch.nn.Sequential(torch.nn.Linear(2, 2))), "unused")


def test_importing_the_module_does_not_import_transformers():
    root = Path(__file__).resolve().parents[1]
    code = ("import json, sys, flsplit, flsplit.model.hf; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_original_is_the_logits_of_the_model():
    split, x = build("bert"), tokens()
    assert isinstance(split.original, HFLogits)
    split.original.eval()
    with torch.no_grad():
        assert torch.equal(split.original(x), hf_logits(split, x))
