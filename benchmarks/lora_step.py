"""LoRA on a split model's blocks: peft's layers (``flsplit.model.lora.add_lora``) against a
small own implementation, measured side by side; the numbers in ``flsplit/model/lora.py``'s
docstring come from this script.

1. Exactness: GPT-2 (6 layers, hidden 384, 6 heads, sequence 64, vocabulary 256), float64,
   rank 8. The reference is ``peft.get_peft_model`` on a copy of the unsplit Hugging Face model;
   both options get the reference's adapters (``lora_B`` set to the same random values, since it
   starts at zero), and are trained 3 SGD steps as split learning trains them (cut at block 2:
   client forward, the cut activation detached, server forward/loss/backward, the cut gradient
   back, client backward; one SGD optimizer per part) while the reference takes 3 plain steps.
   Printed: the largest logit difference before training and adapter difference after.
2. Step time: one training step (forward + backward + SGD step) of the LoRA'd blocks, same
   model in float32, batch 8; full fine-tuning (no adapters) for scale. Median of ``--repeats``
   repeats, the options interleaved so that load from other processes falls on all of them.
   Runs on one torch thread: the machine is a shared 2-core CPU (another developer's tests run
   beside it), so the times are noisy; compare the options with each other, not across runs.
3. Bytes: trainable (adapter) against full bytes of the client part cut at block 2 (float32).

Run: ``PYTHONPATH=. python benchmarks/lora_step.py [--repeats 9]``
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
import warnings
from collections.abc import Iterable

import peft
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from flsplit.model.hf import build_hf_model
from flsplit.model.lora import TARGETS, add_lora, trainable_keys
from flsplit.model.splitting import SplitModel

LAYERS, HIDDEN, HEADS, T, BATCH, VOCAB, RANK, ALPHA, CUT = 6, 384, 6, 64, 8, 256, 8, 16.0, 2


# ----------------------------------------------------------------------------- the own option
class OwnLoRA(nn.Module):
    """``base(x) + B(A(x)) * alpha / r`` around an ``nn.Linear`` or transformers' ``Conv1D``
    (whose weight is stored ``(in, out)``: ``transposed``). No dropout, no merging: the least
    an own implementation needs for this comparison."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, transposed: bool) -> None:
        super().__init__()
        weight = base.weight
        out_features, in_features = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
        self.base = base
        self.lora_A = nn.Parameter(weight.new_empty(rank, in_features))
        self.lora_B = nn.Parameter(weight.new_zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) draw it
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def own_lora(split: SplitModel, rank: int, alpha: float, targets: Iterable[str]) -> SplitModel:
    """Replace the target layers of every block by ``OwnLoRA`` and freeze everything else."""
    wanted = set(targets)
    for p in split.blocks.parameters():
        p.requires_grad_(False)
    for name, module in list(split.blocks.named_modules()):
        if name.rpartition(".")[2] in wanted:
            parent, _, child = name.rpartition(".")
            setattr(split.blocks.get_submodule(parent), child,
                    OwnLoRA(module, rank, alpha, transposed=isinstance(module, transformers.Conv1D)))
    return split


# ----------------------------------------------------------------------------- helpers
def build(dtype: torch.dtype) -> SplitModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's head untied for the split
        return build_hf_model("gpt2", vocab_size=VOCAB, seq_len=T, hidden=HIDDEN, layers=LAYERS, heads=HEADS,
                              dtype=dtype)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (BATCH, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]  # next-token labels


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def adapters(module: nn.Module) -> dict[str, torch.Tensor]:
    """HF module path + ``.A``/``.B`` -> adapter weight, for peft's and the own layers alike."""
    out = {}
    for key, value in module.state_dict().items():
        for tag, side in ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"), (".lora_A", "A"),
                          (".lora_B", "B")):
            if key.endswith(tag):
                path = key[: -len(tag)].removeprefix("base_model.model.")
                if path.partition(".")[0].isdigit():  # a block index in front of the HF path
                    path = path.partition(".")[2]
                out[f"{path}.{side}"] = value
                break
    return out


def set_adapters(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, tensor in adapters(module).items():
            tensor.copy_(values[key])


def split_sgd_step(split: SplitModel, x: torch.Tensor, y: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
    """One split-learning step at ``CUT``: the cut activation and its gradient cross."""
    client, server = split.client_part(CUT), split.server_part(CUT)
    smashed = client(x)
    received = smashed.detach().requires_grad_(True)
    loss_of(server(received), y).backward()
    smashed.backward(received.grad)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- 1. exactness
def exactness() -> tuple[float, dict[str, tuple[float, float, bool]]]:
    base = build(torch.float64)
    x0, _ = batch(10)
    base.blocks.eval()
    with torch.no_grad():  # without adapters: how far the split's own rounding is from the HF forward
        no_lora = float((base.blocks(x0) - base.original.model(input_ids=x0).logits).abs().max())
    base.blocks.train()
    reference_model = copy.deepcopy(base.original.model)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS["gpt2"]), fan_in_fan_out=True)
    torch.manual_seed(1)
    reference = peft.get_peft_model(reference_model, config)
    with torch.no_grad():  # lora_B starts at zero: give it values, so the adapters do something
        g = torch.Generator().manual_seed(2)
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    want_init = adapters(reference)
    options = {"peft (injected)": lambda s: add_lora(s, rank=RANK, alpha=ALPHA, seed=1),
               "own (F.linear)": lambda s: own_lora(s, RANK, ALPHA, TARGETS["gpt2"])}
    splits: dict[str, SplitModel] = {}
    same_a = {}
    for label, make in options.items():
        split = copy.deepcopy(base)
        if label.startswith("own"):
            torch.manual_seed(1)
        split = make(split)
        got = adapters(split.blocks)
        same_a[label] = all(torch.equal(got[k], want_init[k]) for k in got if k.endswith(".A"))
        set_adapters(split.blocks, want_init)
        splits[label] = split
    reference.eval()
    with torch.no_grad():
        want_logits = reference(input_ids=x0).logits
    logit_diff = {}
    for label, split in splits.items():
        split.blocks.eval()
        with torch.no_grad():
            logit_diff[label] = float((split.blocks(x0) - want_logits).abs().max())
        split.blocks.train()
    reference.train()
    ref_opt = torch.optim.SGD(trainable(reference), lr=0.1)
    opts = {label: [torch.optim.SGD(trainable(s.client_part(CUT)), lr=0.1),
                    torch.optim.SGD(trainable(s.server_part(CUT)), lr=0.1)] for label, s in splits.items()}
    for step in range(3):
        x, y = batch(20 + step)
        loss_of(reference(input_ids=x).logits, y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for label, split in splits.items():
            split_sgd_step(split, x, y, opts[label])
    want = adapters(reference)
    out = {}
    for label, split in splits.items():
        got = adapters(split.blocks)
        assert got.keys() == want.keys(), label
        out[label] = (logit_diff[label], max(float((got[k] - want[k]).abs().max()) for k in want), same_a[label])
    return no_lora, out


# ----------------------------------------------------------------------------- 2. step time
def step_times(repeats: int) -> dict[str, float]:
    variants = {"full fine-tune": build(torch.float32),
                "peft (injected)": add_lora(build(torch.float32), rank=RANK, alpha=ALPHA, seed=1),
                "own (F.linear)": own_lora(build(torch.float32), RANK, ALPHA, TARGETS["gpt2"])}
    opts = {}
    for label, split in variants.items():
        split.blocks.train()
        opts[label] = torch.optim.SGD(trainable(split.blocks), lr=0.01)
    x, y = batch(30)
    times: dict[str, list[float]] = {label: [] for label in variants}

    def step(label: str) -> float:
        blocks, opt = variants[label].blocks, opts[label]
        start = time.perf_counter()
        loss_of(blocks(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for label in variants:  # warm-up
        step(label), step(label)
    for _ in range(repeats):
        for label in variants:
            times[label].append(step(label))
    return {label: 1000 * statistics.median(ts) for label, ts in times.items()}


# ----------------------------------------------------------------------------- 3. bytes
def client_bytes() -> tuple[int, int, int]:
    split = add_lora(build(torch.float32), rank=RANK, alpha=ALPHA, seed=1)
    client = split.client_part(CUT)
    state = client.state_dict()
    keys = trainable_keys(client)
    adapter = sum(state[k].numel() * state[k].element_size() for k in keys)
    full = sum(v.numel() * v.element_size() for k, v in state.items() if "lora_" not in k)  # the pre-LoRA part
    return adapter, full, len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# GPT-2 {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, seq {T}, batch {BATCH}, vocab {VOCAB}, "
          f"rank {RANK}, alpha {ALPHA:g}; cut at block {CUT}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{platform.processor() or platform.machine()}, 1 torch thread (shared 2-core CPU: times are noisy)")

    print("\n1. exactness against peft.get_peft_model on the unsplit model (float64, 3 split SGD steps)")
    print(f"{'option':<18}{'logits max diff':>17}{'adapters max diff':>19}{'init A == peft':>16}")
    no_lora, rows = exactness()
    print(f"{'(no adapters)':<18}{no_lora:>17.3g}{'-':>19}{'-':>16}")
    for label, (logits, adapter, same) in rows.items():
        print(f"{label:<18}{logits:>17.3g}{adapter:>19.3g}{str(same):>16}")

    print(f"\n2. training step (forward + backward + SGD), float32, median of {args.repeats}")
    times = step_times(args.repeats)
    print(f"{'option':<18}{'step (ms)':>11}{'vs own':>9}")
    for label, ms in times.items():
        print(f"{label:<18}{ms:>11.1f}{ms / times['own (F.linear)']:>9.2f}")

    adapter, full, count = client_bytes()
    print(f"\n3. client part (blocks [0, {CUT}): embedding + 1 layer), float32")
    print(f"adapters: {adapter:,} bytes in {count} tensors; full part: {full:,} bytes; "
          f"ratio full/adapters {full / adapter:.1f}x")


if __name__ == "__main__":
    main()
