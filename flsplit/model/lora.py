"""LoRA adapters on a split model's blocks (the model side of SplitLoRA).

``add_lora`` puts low-rank adapters on the target linear layers of every block of a
``SplitModel`` and freezes the rest, so the client part (``client_part(cut)``) trains only its
adapters and the server part its adapters (and, where chosen, the head); ``trainable_keys``
names the state-dict entries that change, which is what a client sends and a server
averages; ``freeze`` freezes a whole part (SplitFrozen: a frozen client); ``merge_lora``
folds the adapters into the base weights, after which ``flsplit.model.hf.export_hf`` writes a
plain Hugging Face checkpoint.

The adapters are ``peft``'s own LoRA layers, injected into the blocks with
``peft.inject_adapter_in_model``. A Hugging Face split model's blocks hold the Hugging Face
model's modules, so the layers peft replaces are replaced in the Hugging Face model too: the
split model stays its blocks, ``split.original`` (and ``SplitModel.verify``) see the adapters.
The blocks' state-dict keys become peft's (``...c_attn.base_layer.weight``,
``...c_attn.lora_A.default.weight``, ``...c_attn.lora_B.default.weight``), which are the keys of
``peft.get_peft_model`` on the unsplit model without its ``base_model.model.`` prefix.

Why peft, and not a small own implementation (measured; ``benchmarks/lora_step.py``)
-----------------------------------------------------------------------------------
Both options were built and run on the same model: peft's layers as ``add_lora`` injects them,
and an own ``base(x) + B(A(x)) * alpha / r`` wrapper around ``nn.Linear``/``Conv1D`` (in the
benchmark script, about 30 lines). Command: ``PYTHONPATH=. python benchmarks/lora_step.py
--repeats 9``, on a shared 2-core x86_64 CPU (another developer's tests running beside it), one
torch thread, torch 2.14.1, transformers 5.24.0, peft 0.22.0; GPT-2, 6 layers, hidden 384, 6
heads, sequence 64, vocabulary 256, rank 8, alpha 16, cut at block 2.

(a) Exactness against ``peft.get_peft_model`` on the unsplit Hugging Face model (float64; both
    options given the reference's adapters, ``lora_B`` set to the same random values since it
    starts at zero; then 3 SGD steps, the options trained as split learning trains them: client
    forward, the cut activation detached, server forward/loss/backward, the cut gradient back,
    one SGD optimizer per part; the reference 3 plain steps):

    ================  ===============  ===================  =====================
    option            logits max diff  adapters after 3     initial ``lora_A``
                                       steps, max diff      equals peft's (seed)
    ================  ===============  ===================  =====================
    (no adapters)     2.8e-15          -                    -
    peft (injected)   2.4e-15          2.8e-17              yes
    own (F.linear)    2.4e-15          2.8e-17              no
    ================  ===============  ===================  =====================

    Both compute ``base(x) + B(A(dropout(x))) * alpha / r`` in the same order; the logit
    difference is the split model's own float64 rounding against the Hugging Face forward (the
    same without adapters). Exactness does not decide. Only peft draws the same initial
    adapters as ``get_peft_model`` under the same seed (it draws ``nn.Linear`` weights, then
    re-draws ``lora_A``): an own implementation would have to copy that draw order.

(b) One training step (forward + backward + SGD step over the trainable tensors) of the
    LoRA'd blocks, float32, batch 8, median of 9 repeats with the options interleaved; two
    runs, the same command:

    ================  ==========  ==========
    option            run 1 (ms)  run 2 (ms)
    ================  ==========  ==========
    full fine-tune    512.1       557.1
    peft (injected)   445.5       451.8
    own (F.linear)    442.7       459.1
    ================  ==========  ==========

    peft and the own wrapper differ by 1-2 %, in either direction from run to run: within the
    noise of the shared CPU. peft's per-call Python (adapter dicts, dtype checks) does not show
    beside the matrix products at this size. (LoRA saves only ~15-20 % of the step against
    full fine-tuning here: the backward still runs through every frozen weight to reach the
    adapters below it; the saving is in the optimizer state and in what crosses the network.)

(c) Coverage. peft adapts ``nn.Linear`` (Llama, BERT, the zoo's ``linear1``/``linear2``),
    transformers' ``Conv1D`` (GPT-2; ``fan_in_fan_out=True``, set here per family), and, as a
    documented work-around, ``nn.MultiheadAttention`` (``lora.MultiheadAttention`` merges the
    adapter into ``in_proj_weight``/``out_proj.weight`` before each forward and unmerges
    after, since the attention reads those tensors directly and never calls
    ``out_proj.forward``); also embeddings, convolutions, DoRA, rsLoRA, dropout, merging. The
    own wrapper covers ``nn.Linear`` and ``Conv1D`` and nothing that reads its weights directly:
    on the zoo's gpt-tiny it can take ``linear1``/``linear2`` only. Both share one trap, found
    by the tests: in eval mode with frozen base weights ``nn.TransformerEncoderLayer`` runs
    its fused kernel, which reads ``linear1.weight`` etc. directly: with peft's layers (whose
    ``.weight`` is the base weight) the adapters are silently skipped, with the own wrapper
    (no ``.weight``) it fails. ``add_lora`` keeps such layers off the fused path (a no-op
    forward pre-hook, which the fast path's checks refuse); ``merge_lora`` removes it again.
    The zoo's gpt-tiny gets ``linear1``/``linear2`` by default; with peft a caller may add
    ``targets=["linear1", "linear2", "self_attn"]`` (tested: ``merge_lora`` gives the adapted
    outputs; peft's merge-before-forward path is slower).

Decision: peft. It is as exact as the own code (both equal ``get_peft_model`` to float64
rounding), as fast within the measurement's noise, draws the same initial adapters as
``get_peft_model``, and covers more layer types with less code of ours to keep.

Choices
-------
- Targets per family: GPT-2 ``c_attn``, ``c_proj``, ``c_fc``; Llama-style ``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``; BERT ``query``, ``key``,
  ``value``, ``dense`` in the layer blocks; a model of ``nn.TransformerEncoderLayer`` blocks
  (the zoo's gpt-tiny) ``linear1``, ``linear2``. Other models name their ``targets``.
- The head (the final block) is trained in full for BERT, whose classifier is new for the
  task and would otherwise stay random (peft's ``task_type="SEQ_CLS"`` likewise trains the
  classifier in full; here the whole final block, pooler included), and frozen for the
  language models (as peft leaves a causal LM's head: an LM head is ``vocab x hidden``,
  larger than every adapter together, and already trained); the ``train_head`` argument
  overrides it. A head trained in full gets no adapters. The embedding block has no default
  target and is frozen, so a client part's trainable tensors are its adapters alone.
- Adapters are drawn from torch's global generator in the blocks' module order (``lora_A``
  Kaiming-uniform, ``lora_B`` zeros: the adapted model starts as the base model); under the
  same seed every process gets the same adapters, and, because the blocks list the Hugging Face
  model's modules in its own order, the same ones ``peft.get_peft_model`` draws on the unsplit
  model. ``seed`` draws them from a generator seeded with it and leaves the global stream as it
  was.
- ``merge_lora`` returns a new ``SplitModel`` (a deep copy; the adapted one is unchanged and
  can keep training).

``peft`` and ``transformers`` are optional (``pip install "flsplit[transformers]"``): importing
this module imports neither; ``add_lora`` and ``merge_lora`` import peft.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from types import ModuleType
from typing import Optional

from torch import nn

from flsplit.extras import require
from flsplit.model import rng
from flsplit.model.hf import SUPPORTED, HFLogits
from flsplit.model.splitting import SplitModel

__all__ = ["TARGETS", "add_lora", "freeze", "lora_family", "merge_lora", "trainable_keys"]

_FEATURE = "LoRA adapters (flsplit.model.lora)"

# The layers each family adapts by default (the last component of a module's path).
TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": ("query", "key", "value", "dense"),
    "encoder": ("linear1", "linear2"),
}


def _peft() -> ModuleType:
    return require("peft", "transformers", _FEATURE)


def lora_family(split: SplitModel) -> Optional[str]:
    """The family whose default targets a split model gets: ``"gpt2"``, ``"llama"``, ``"bert"``
    (a split Hugging Face model), ``"encoder"`` (blocks of ``nn.TransformerEncoderLayer``, the
    zoo's gpt-tiny), or ``None`` (the caller names the targets)."""
    if isinstance(split.original, HFLogits):
        for cls in type(split.original.model).__mro__:
            if cls.__name__ in SUPPORTED:
                return SUPPORTED[cls.__name__]
    if any(isinstance(m, nn.TransformerEncoderLayer) for m in split.blocks.modules()):
        return "encoder"
    return None


def add_lora(split: SplitModel, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Optional[Sequence[str]] = None, train_head: Optional[bool] = None,
             seed: Optional[int] = None) -> SplitModel:
    """Put LoRA adapters on the target layers of every block, and freeze the base weights.

    Parameters
    ----------
    split : SplitModel
        Changed in place: its target layers become peft LoRA layers (inside the blocks, and
        so inside ``split.original`` where the blocks share its modules). ``blocks`` stays an
        ``nn.Sequential`` of the same blocks, so ``client_part``/``server_part`` still cut it.
    rank, alpha, dropout : int, float, float
        LoRA's rank ``r``, scale ``alpha`` (the update is ``B A x * alpha / r``) and the dropout
        on the adapter's input.
    targets : sequence of str, optional
        The last component of the module paths to adapt (e.g. ``["c_attn"]``); by default the
        family's (``TARGETS``, see ``lora_family``).
    train_head : bool, optional
        Train the final block in full (no adapters on it). By default: yes for a BERT
        classifier, no for a language model (see the module docstring).
    seed : int, optional
        Draw the adapters from a generator seeded with it (torch's global stream is left as
        it was); by default from torch's global generator, which the caller seeds.

    Returns
    -------
    SplitModel
        ``split`` itself. Base weights do not require grad; adapters (and a head trained in
        full) do; the blocks' state dict holds the adapters (``trainable_keys``).

    Raises
    ------
    ValueError
        Without ``targets`` for a model of no known family, or when no block has a target.
    """
    peft = _peft()
    family = lora_family(split)
    if targets is None:
        if family is None:
            raise ValueError("add_lora cannot tell which layers to adapt in this model: name them, e.g. "
                             "targets=['fc1', 'fc2'] (the last component of their module paths)")
        targets = TARGETS[family]
    if train_head is None:
        train_head = family == "bert"
    wanted = set(targets)
    adapted = range(split.num_blocks - 1) if train_head else range(split.num_blocks)
    # Full paths, so a name that also occurs in the head (BERT's pooler.dense) is not adapted there.
    names = [name for i in adapted for name, _ in split.blocks[i].named_modules(prefix=str(i))
             if name.rpartition(".")[2] in wanted]
    if not names:
        raise ValueError(f"add_lora found none of the targets {sorted(wanted)} in the blocks")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                             fan_in_fan_out=family == "gpt2", bias="none")  # GPT-2's Conv1D stores W transposed
    with rng.seeded(seed) if seed is not None else nullcontext():
        peft.inject_adapter_in_model(config, split.blocks)
    tuner = require("peft.tuners.tuners_utils", "transformers", _FEATURE).BaseTunerLayer
    for module in split.blocks.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(isinstance(m, tuner) for m in module.modules()):
            # In eval mode with frozen base weights the layer would run its fused kernel, which
            # reads linear1/linear2/in_proj weights directly and so skips every adapter; a
            # forward pre-hook is one of the things that rule that fast path out.
            module.register_forward_pre_hook(_no_fused_fast_path)
    # peft froze every non-adapter parameter of the blocks; the head may train in full.
    if train_head:
        for p in split.blocks[-1].parameters():
            p.requires_grad_(True)
    return split


def _no_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer``
    off its fused inference path (which would ignore LoRA layers)."""
    return None


def trainable_keys(module: nn.Module) -> list[str]:
    """The state-dict keys of ``module``'s parameters that require grad, in state-dict order:
    what a client sends and a server averages (adapters, and a head trained in full)."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    # keep_vars: the state dict's values are then the parameters themselves, comparable by id
    return [k for k, v in module.state_dict(keep_vars=True).items() if id(v) in trainable]


def freeze(module: nn.Module) -> None:
    """Freeze every parameter of ``module`` (a client part that does not train: SplitFrozen)."""
    for p in module.parameters():
        p.requires_grad_(False)


def merge_lora(split: SplitModel) -> SplitModel:
    """A copy of ``split`` with every adapter merged into its base weight and the LoRA layers
    replaced by their base layers.

    The copy's blocks have exactly the pre-LoRA state-dict keys, in their order (so
    ``export_hf`` writes a checkpoint that ``from_pretrained`` loads), and compute what the
    adapted blocks compute, up to float rounding. (One exception in order, not in keys: after
    LoRA on an ``nn.MultiheadAttention``, peft's unloading registers its ``in_proj_weight``
    after ``in_proj_bias``.) ``split`` is left as it is. The copy's parameters all require grad
    again, as a freshly built model's do.
    """
    base_tuner = require("peft.tuners.tuners_utils", "transformers", _FEATURE).BaseTunerLayer
    merged = copy.deepcopy(split)  # one memo: the copied blocks and copied original keep sharing modules
    blocks = merged.blocks
    # The outermost LoRA layers only: a LoRA MultiheadAttention unloads the LoRA out_proj inside it.
    tuners = {name for name, m in blocks.named_modules() if isinstance(m, base_tuner)}
    outer = [name for name in tuners if not any(name.startswith(t + ".") for t in tuners)]
    for name in outer:
        layer = blocks.get_submodule(name)
        if hasattr(layer, "unload_and_optionally_merge_module"):
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
        else:
            layer.merge()
            base = layer.get_base_layer()
        parent, _, child = name.rpartition(".")
        setattr(blocks.get_submodule(parent), child, base)
    for module in blocks.modules():  # plain layers again: the fused fast path is right for them
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _no_fused_fast_path:
                del module._forward_pre_hooks[key]
    for p in blocks.parameters():
        p.requires_grad_(True)
    for owner in (blocks, getattr(merged.original, "model", None)):
        if owner is not None and hasattr(owner, "peft_config"):
            del owner.peft_config  # inject_adapter_in_model records its config on the module
    return merged
