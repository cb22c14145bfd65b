"""Hugging Face ``transformers`` models cut at a block boundary, as ``SplitModel``s.

``hf_split_model`` turns a GPT-2 (``GPT2LMHeadModel``), a Llama-style decoder
(``LlamaForCausalLM``, and ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``,
which have the same structure: rotary position embeddings, RMSNorm) or a BERT classifier
(``BertForSequenceClassification``) into blocks: one embedding block (token ids to hidden
states), one block per transformer layer, one final block (final norm and LM head for the
decoders; pooler, dropout and classifier for BERT). Each block takes one tensor and returns one:
block 0 takes ``input_ids`` ``(B, T)`` (int64), every cut carries the hidden state
``(B, T, hidden)``, and the last block returns the logits, ``(B, T, vocab)`` for the language
models and ``(B, num_labels)`` for BERT. The blocks share the Hugging Face model's parameters.

What the unsplit model computes once and hands to every layer is recomputed inside each layer
block from the hidden state's sequence length, with Hugging Face's own functions: the attention
mask (causal for the decoders, sliding-window where the config says so; none for BERT) and the
position ids ``0 .. T-1`` (and, for the Llama-style decoders, the rotary cos/sin). This is exact
for fixed-length sequences without padding, which is what flsplit's text data are (packed
chunks). Padding masks are not carried across a cut: a batch with padding is attended as if
every token were real (a documented limitation), and ``token_type_ids`` are BERT's default
zeros.

The layer blocks build their masks from the model's own config, so they run the attention
implementation the model runs (``"eager"`` and ``"sdpa"`` both give the unsplit model's logits
and gradients bit for bit on CPU, float64); ``build_hf_model`` picks ``"eager"``, the plain
matrix products, which compute the same in the split model and the unsplit one on any device.

A language model whose LM head shares its weight with the input embedding (GPT-2, and any
model with ``tie_word_embeddings``) is untied: the embedding block is the client's and the head
block the server's, and two machines cannot share one parameter. The head gets its own copy of
the weight, ``config.tie_word_embeddings`` becomes ``False`` and a ``UserWarning`` says so; from
then on the split model is exact against this untied model (which computes what the tied one
did until the first step), and ``export_hf`` saves both weights.

``build_hf_model`` builds a small model from a config (or loads a local ``save_pretrained``
directory) and splits it; ``export_hf`` writes a split model's weights back as a Hugging Face
checkpoint that ``from_pretrained`` loads.

``transformers`` is an optional dependency (``pip install "flsplit[transformers]"``): importing
this module does not import it, calling its functions does.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Union

import torch
from torch import nn

from flsplit.extras import require
from flsplit.model.splitting import SplitModel

__all__ = ["HFLogits", "SUPPORTED", "build_hf_model", "export_hf", "hf_split_model"]

_FEATURE = "Hugging Face models (flsplit.model.hf)"

# Model class -> family. A subclass of one of these is split as its base class is.
_DECODERS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED: dict[str, str] = {"GPT2LMHeadModel": "gpt2", **dict.fromkeys(_DECODERS, "llama"),
                             "BertForSequenceClassification": "bert"}


def _transformers(module: str = "transformers") -> ModuleType:
    return require(module, "transformers", _FEATURE)


class HFLogits(nn.Module):
    """The unsplit Hugging Face model as a function of the token ids: ``forward(input_ids)``
    returns ``model(input_ids).logits`` (no cache). ``SplitModel.original`` of a split HF model,
    which ``SplitModel.verify`` compares the blocks with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _HFBlock(nn.Module):
    """A block holding submodules of a Hugging Face model at their own dotted paths, so the
    block's state-dict keys are the Hugging Face model's keys (its ``block_path`` is ``""``)."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__()
        for path in paths:
            parent: nn.Module = self
            *above, name = path.split(".")
            for part in above:  # plain containers mirror the modules above
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name, model.get_submodule(path))


class _Chain(_HFBlock):
    """Applies the modules at ``paths`` one after the other (an embedding, a head)."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__(model, paths)
        self.paths = list(paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.paths:
            x = self.get_submodule(path)(x)
        return x


class _GPT2Embedding(_HFBlock):
    """GPT-2's token and learned position embeddings (positions ``0 .. T-1``), then dropout."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, ["transformer.wte", "transformer.wpe", "transformer.drop"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return t.drop(t.wte(input_ids) + t.wpe(positions))


class _Layer(_HFBlock):
    """One transformer layer, with the mask and positions its model would hand it recomputed
    from the hidden state: ``mask`` names the ``transformers.masking_utils`` function
    (``"causal"``, ``"sliding_window_causal"`` or ``"bidirectional"``); ``rotary``, the path of
    the rotary embedding module (Llama-style), whose cos/sin the layer takes."""

    def __init__(self, model: nn.Module, path: str, mask: str, rotary: Optional[str] = None) -> None:
        super().__init__(model, [path] + ([rotary] if rotary else []))
        self.path, self.mask, self.rotary = path, mask, rotary
        self.config = model.config  # the mask follows its attention implementation

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs: dict[str, Any] = {"attention_mask": _attention_mask(self.mask, self.config, hidden, positions)}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.get_submodule(self.rotary)(hidden, position_ids=positions)
            kwargs["position_ids"] = positions
        out = self.get_submodule(self.path)(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # transformers 4 layers return tuples


def _attention_mask(kind: str, config: Any, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
    """What ``transformers.masking_utils.create_{kind}_mask`` gives a model that sees no padding
    and no cache (``None`` where the attention implementation needs no mask)."""
    fn = getattr(_transformers("transformers.masking_utils"), f"create_{kind}_mask")
    return fn(config, hidden, None, **_no_cache_kwargs(fn, hidden.shape[1], hidden.device, positions))


def _no_cache_kwargs(fn: Any, length: int, device: torch.device, positions: torch.Tensor) -> dict[str, Any]:
    """The keywords that mean "no cache, positions 0 .. T-1" to a mask function, by name:
    transformers 5 calls the cache ``cache``, transformers 4 ``past_key_values`` and wants
    ``cache_position``."""
    names = _parameters(fn)
    out: dict[str, Any] = {n: None for n in ("cache", "past_key_values") if n in names}
    if "cache_position" in names:
        out["cache_position"] = torch.arange(length, device=device)
    if "position_ids" in names:
        out["position_ids"] = positions
    return out


@functools.lru_cache(maxsize=None)
def _parameters(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _family(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    raise TypeError(f"hf_split_model cannot split {type(model).__name__}: supported are "
                    f"{', '.join(SUPPORTED)} (and their subclasses)")


def _decoder_mask(config: Any, index: int) -> str:
    """The mask of decoder layer ``index``, as its model chooses it: per layer where the config
    lists ``layer_types`` (Qwen2/3), sliding-window where it sets a ``sliding_window`` (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return "sliding_window_causal" if types[index] == "sliding_attention" else "causal"
    return "sliding_window_causal" if getattr(config, "sliding_window", None) is not None else "causal"


def _untie_head(model: nn.Module) -> None:
    """Give the LM head its own copy of a weight tied to the input embedding: the embedding
    is on the client and the head on the server, which cannot share one parameter."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False  # save_pretrained / from_pretrained keep them apart
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the tying at construction
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    warnings.warn(f"{type(model).__name__}: the LM head's weight was tied to the input embedding; split "
                  f"training unties it (the head gets its own copy, config.tie_word_embeddings=False), so the "
                  f"split model equals the untied model", UserWarning, stacklevel=3)


def hf_split_model(model: nn.Module, seq_len: Optional[int] = None) -> SplitModel:
    """Split a Hugging Face model into an embedding block, one block per layer and a head block.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ``GPT2LMHeadModel``, a Llama-style ``...ForCausalLM`` (``SUPPORTED`` lists them) or a
        ``BertForSequenceClassification``. It is changed in place where its LM head's weight
        is tied to the input embedding (untied, with a warning: see the module docstring) and
        keeps sharing its parameters with the blocks.
    seq_len : int, optional
        The sequence length ``T`` of the inputs, where known: the split model's ``input_shape``
        is ``(T,)``.

    Returns
    -------
    SplitModel
        ``num_layers + 2`` blocks; ``original`` is ``HFLogits(model)``; every block's path is
        ``""`` because each block holds its modules at their Hugging Face paths, so
        ``to_original_state_dict()`` gives the model's own state-dict keys.

    Raises
    ------
    TypeError
        For a model class that is not supported.
    """
    family = _family(model)
    blocks: list[nn.Module]
    if family == "bert":
        layers = len(model.bert.encoder.layer)
        blocks = [_Chain(model, ["bert.embeddings"])]
        blocks += [_Layer(model, f"bert.encoder.layer.{i}", "bidirectional") for i in range(layers)]
        blocks.append(_Chain(model, ["bert.pooler", "dropout", "classifier"]))
    else:
        _untie_head(model)
        if family == "gpt2":
            layers = len(model.transformer.h)
            blocks = [_GPT2Embedding(model)]
            blocks += [_Layer(model, f"transformer.h.{i}", "causal") for i in range(layers)]
            blocks.append(_Chain(model, ["transformer.ln_f", "lm_head"]))
        else:
            layers = model.config.num_hidden_layers  # the model runs this many of model.layers
            blocks = [_Chain(model, ["model.embed_tokens"])]
            blocks += [_Layer(model, f"model.layers.{i}", _decoder_mask(model.config, i), "model.rotary_emb")
                       for i in range(layers)]
            blocks.append(_Chain(model, ["model.norm", "lm_head"]))
    sequential = nn.Sequential(*blocks)
    sequential.training = model.training
    return SplitModel(sequential, [""] * len(blocks), original=HFLogits(model),
                      input_shape=None if seq_len is None else (seq_len,), input_dtype=torch.int64)


_KINDS = ("gpt2", "llama", "bert")


def build_hf_model(kind: Optional[str], *, vocab_size: int = 256, seq_len: int = 64, num_labels: int = 2, hidden: int = 64,
                   layers: int = 2, heads: int = 4, path: Optional[Union[str, Path]] = None,
                   dtype: Optional[torch.dtype] = None, attn_implementation: str = "eager") -> SplitModel:
    """A small Hugging Face model, built from a config (or loaded from ``path``), split by
    ``hf_split_model``.

    Parameters
    ----------
    kind : {"gpt2", "llama", "bert"} or None
        GPT-2 (``GPT2LMHeadModel``), Llama (``LlamaForCausalLM``) or a BERT classifier
        (``BertForSequenceClassification``); ``None`` only with ``path``.
    vocab_size, seq_len, num_labels, hidden, layers, heads : int
        The config: vocabulary (byte tokens: 256), sequence length ``T`` (the position
        embeddings cover it), BERT's classes, hidden width, transformer layers, attention
        heads. The feed-forward width is ``4 * hidden``; Llama has as many key/value heads as
        heads. Dropout is off (probability 0): split training is checked against the unsplit
        model step for step, which dropout would only make harder to read (it works:
        ``SplitModel.verify`` seeds it alike).
    path : str or Path, optional
        A local ``save_pretrained`` directory to load instead (``AutoModelForCausalLM``, or
        ``AutoModelForSequenceClassification`` for ``bert``); the config arguments are then
        unused except ``seq_len``, and ``kind`` may be ``None``: the saved config's
        ``model_type`` then says which (``"bert"``: a classifier; any other: a causal LM).
    dtype : torch.dtype, optional
        Cast the model to it (e.g. ``torch.float64`` for exactness checks).
    attn_implementation : str
        The attention implementation. ``"eager"`` (the default) computes the same in the
        split model and the unsplit one, on every device; ``"sdpa"`` does too where both run
        the same kernel.

    Notes
    -----
    Construction draws the initial weights from torch's global generator: a caller that wants
    the same model on every node builds it under a fixed seed (``torch.manual_seed``).
    """
    transformers = _transformers()
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"unknown Hugging Face model kind {kind!r}; choose one of {list(_KINDS)}")
    if path is not None:
        if kind is None:
            kind = "bert" if transformers.AutoConfig.from_pretrained(path).model_type == "bert" else None
        auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, attn_implementation=attn_implementation)
    elif kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=seq_len, n_embd=hidden, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
            tie_word_embeddings=False)  # built for a split: the head is its own (no untying warning)
        model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn_implementation)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq_len,
            attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    elif kind == "bert":
        config = transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=seq_len, num_labels=num_labels,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=None)
        model = transformers.BertForSequenceClassification._from_config(config, attn_implementation=attn_implementation)
    else:
        raise ValueError("build_hf_model needs a kind (gpt2, llama, bert) unless it loads a path")
    if dtype is not None:
        model = model.to(dtype)
    return hf_split_model(model, seq_len=seq_len)


def export_hf(split: SplitModel, directory: Union[str, Path],
              state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write a split Hugging Face model as a ``save_pretrained`` checkpoint.

    The weights are the blocks' current ones, or ``state`` (a blocks state dict, keys
    ``"<block>.<name>"``), mapped to the Hugging Face keys by ``to_original_state_dict``;
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` (BERT:
    ``AutoModelForSequenceClassification``) loads them with the model's config. A tied LM head
    was untied by ``hf_split_model``, and is saved untied. A model with LoRA adapters
    (``flsplit.model.lora.add_lora``) is refused: export its ``merge_lora`` copy. Returns the
    directory.
    """
    if not isinstance(split.original, HFLogits):
        raise TypeError("export_hf takes a split Hugging Face model (from hf_split_model or build_hf_model)")
    model = split.original.model
    weights = split.to_original_state_dict(state)
    if any(".lora_" in key or ".base_layer." in key for key in weights):
        # the model carries them too (its modules are the blocks'), so the key check below would pass
        raise ValueError("the blocks have LoRA adapters: merge them into the weights first "
                         "(flsplit.model.lora.merge_lora), then export the merged model")
    expected = set(model.state_dict())
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"the blocks' state does not map onto {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    directory = Path(directory)
    # safetensors wants contiguous tensors that share no memory; the blocks' own may do either
    model.save_pretrained(directory, state_dict={k: v.detach().contiguous() for k, v in weights.items()})
    return directory
