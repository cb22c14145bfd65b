"""LoRA fine-tuning of a GPT-2-style model: centralized against split PSL, plain and U-shaped.

One run, three trainings of the same model from the same start on the same batches, one after
another in one process (centralized, then plain PSL, then U-shaped PSL; not interleaved, so
load from other processes on the shared machine falls on them unevenly):

Model: the zoo's ``hf-gpt2`` (Hugging Face GPT-2, 6 layers, width 384, 6 heads, byte
vocabulary of 256, 64-token sequences; 8 blocks: embeddings, 6 layers, final norm + LM head),
LoRA rank 8, alpha 16 (``flsplit.model.lora.add_lora``), built under ``rng.seeded(0)`` so that
``model_fn`` returns an identical model every call (checked). Data: the offline ``stdlib-text``
corpus, 4 IID partitions (``load_partition("stdlib-text", i, 4, "iid")``); the test loss is the
mean next-token cross-entropy on a fixed, evenly spaced subset of ``--test-size`` test sequences.

``centralized``
    the unsplit LoRA'd model (``model_fn().blocks``), ``torch.optim.AdamW`` (torch defaults,
    lr ``--lr``) over the parameters that require grad; step ``k`` is one step on the union
    batch: the concatenation of the 4 clients' ``k``-th batches (client ``i``'s partition rows
    ``[8k, 8k + 8)``), loss = mean next-token cross-entropy over all tokens.
``psl``
    ``flsplit.strategies.PSL`` (cut 2, batch 8, AdamW, lr ``--lr``, ``shuffle=False``,
    ``max_steps=S``, ``carry_momentum=True``) through the real runtime in one process:
    ``InProcessGrid`` + ``SplitClient`` per node, ``strategy.start`` with a server-side
    ``evaluate_fn``; ``R`` rounds of ``S`` steps.
``psl-u``
    the same, U-shaped (``tail_cut=6``): the client keeps blocks 0..1 and 6..7 (the last
    transformer layer, the final norm, the LM head and the loss); the labels never leave it.

Batch order: without shuffling, the client's batch at stream position ``p`` is its rows
``[8p, 8p + 8)`` (``ClientTrainer.batch``), and the cursor position is kept in the node's
``context.state`` across rounds (``SplitClient`` restarts each round at the stored position),
so round ``r`` step ``s`` reads rows ``8(rS + s) ...``: the split runs' ``R * S`` union steps
are the centralized run's steps. The script checks every node's final cursor position is
``R * S``.

What to expect: with SGD, PSL's step equals the centralized union step exactly (the server
part takes one step on the union's mean loss; each client's head gradient is of its own mean
loss, a quarter-scaled copy of its share, and averaging the heads at round end restores the
sum). With AdamW it does not: every client's head (and, U-shaped, tail) takes AdamW steps on
its own mean loss, AdamW normalizes each client's update by that client's own second moment,
and the client parts are averaged only at round end (each client's optimizer state is its
own, carried across rounds). So the split runs are not expected to equal centralized step for
step, only to track it; the test-loss curves are the measure.

Times: the centralized step time is its own training steps (evaluation excluded); a split
step is (round ``wall_seconds`` - the round's evaluation time) / S: the round's whole
exchange (messages, encoding, the client's recomputed forward, round-end averaging). Bytes are
the history's per-round ``bytes_up``/``bytes_down``, split into the smashed data and gradients
(``split_bytes_up``/``split_bytes_down``) and the rest (the adapters and buffers sent down at
round start and up at round end; the frozen base weights never travel).

Runs on one torch thread (``torch.set_num_threads(1)``): the machine is a shared 2-core CPU.

Run: ``PYTHONPATH=. python benchmarks/bench_text_split.py [--rounds 10] [--steps 5] [--out benchmarks/plots/text_split.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord

from flsplit.data.datasets import TensorData, load_centralized, load_partition
from flsplit.model import rng
from flsplit.model.lora import add_lora
from flsplit.model.loss import loss_sum
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import build_model
from flsplit.planes.inprocess import InProcessGrid
from flsplit.runtime.client import SplitClient
from flsplit.runtime.clientapp import split_client_app
from flsplit.strategies import PSL

DATASET, CLIENTS, BATCH, SEQ, VOCAB, CUT, TAIL = "stdlib-text", 4, 8, 64, 256, 2, 6


def model_fn() -> SplitModel:
    """The LoRA'd GPT-2-style model, identical every call (built under a fixed seed)."""
    with rng.seeded(0):
        return add_lora(build_model("hf-gpt2", VOCAB, seq_len=SEQ), rank=8, alpha=16.0)


@torch.no_grad()
def test_loss(blocks: torch.nn.Module, test: TensorData, chunk: int = 64) -> float:
    """Mean next-token cross-entropy of the blocks on the test sequences."""
    was_training = blocks.training
    blocks.eval()
    total = sum(float(loss_sum(blocks(test.x[i : i + chunk]), test.y[i : i + chunk])) for i in range(0, len(test), chunk))
    blocks.train(was_training)
    return total / len(test)


def run_centralized(parts: list[TensorData], test: TensorData, rounds: int, steps: int, lr: float) -> dict:
    """AdamW on the union batches; evaluated every ``steps`` steps (at the split's round ends)."""
    blocks = model_fn().blocks
    blocks.train()
    opt = torch.optim.AdamW([q for q in blocks.parameters() if q.requires_grad], lr=lr)
    out = {"test_loss": [test_loss(blocks, test)], "train_loss": [], "step_seconds": []}
    for r in range(rounds):
        losses, seconds = [], []
        for s in range(steps):
            k = r * steps + s
            x = torch.cat([d.x[BATCH * k : BATCH * (k + 1)] for d in parts])
            y = torch.cat([d.y[BATCH * k : BATCH * (k + 1)] for d in parts])
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_sum(blocks(x), y) / len(y)
            loss.backward()
            opt.step()
            seconds.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        out["train_loss"].append(sum(losses) / len(losses))
        out["step_seconds"].append(seconds)
        out["test_loss"].append(test_loss(blocks, test))
        print(f"  centralized round {r + 1}: train {out['train_loss'][-1]:.4f} test {out['test_loss'][-1]:.4f} "
              f"step {sum(seconds) / len(seconds):.3f}s", flush=True)
    return out


def run_split(parts: list[TensorData], test: TensorData, rounds: int, steps: int, lr: float, tail_cut: int) -> dict:
    """PSL through the in-process runtime; the history's rounds and the evaluation times."""
    clients = [SplitClient(model_fn, data, None, salt=i) for i, data in enumerate(parts)]
    grid = InProcessGrid(split_client_app(lambda ctx: clients[int(ctx.node_config["partition-id"])]), CLIENTS)
    strategy = PSL(model_fn=model_fn, input_shape=(SEQ,), num_classes=VOCAB, cut_layer=CUT, tail_cut=tail_cut,
                   batch_size=BATCH, optimizer="adamw", learning_rate=lr, shuffle=False, max_steps=steps,
                   carry_momentum=True)
    eval_seconds: dict[int, float] = {}
    initial: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.perf_counter()
        model = model_fn().blocks
        model.load_state_dict(arrays.to_torch_state_dict())
        loss = test_loss(model, test)
        eval_seconds[server_round] = time.perf_counter() - t0
        if server_round == 0:
            initial.append(loss)
        else:
            print(f"  {'psl-u' if tail_cut else 'psl'} round {server_round}: test {loss:.4f} "
                  f"(eval {eval_seconds[server_round]:.1f}s)", flush=True)
        return MetricRecord({"loss": loss})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=rounds,
                   evaluate_fn=evaluate_fn)
    keys = ("train_loss", "test_loss", "bytes_up", "bytes_down", "split_bytes_up", "split_bytes_down",
            "wall_seconds", "num_examples", "errors")
    history = [{k: entry.get(k) for k in keys} for entry in strategy.history.rounds]
    positions = {}
    for node_id, ctx in grid.contexts.items():
        cursor = ctx.state.config_records.get("flsplit.client.cursor")
        positions[str(node_id)] = int(cursor["position"]) if cursor is not None else None
    for r, entry in enumerate(history, start=1):
        entry["eval_seconds"] = eval_seconds.get(r)
        entry["step_seconds"] = (entry["wall_seconds"] - eval_seconds.get(r, 0.0)) / steps
    return {"initial_test_loss": initial[0] if initial else None, "rounds": history, "final_positions": positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="steps per round (max_steps)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-size", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/plots/text_split.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)

    a, b = model_fn().blocks.state_dict(), model_fn().blocks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "model_fn is not deterministic"
    trainable = sum(q.numel() for q in model_fn().blocks.parameters() if q.requires_grad)

    parts = [load_partition(DATASET, i, CLIENTS, "iid") for i in range(CLIENTS)]
    need = BATCH * args.rounds * args.steps
    assert all(len(d) >= need for d in parts), "not enough rows for R*S steps without wrapping an epoch"
    full_test = load_centralized(DATASET, "test")
    index = torch.linspace(0, len(full_test) - 1, args.test_size).round().long()
    test = TensorData(full_test.x[index], full_test.y[index])

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"load {os.getloadavg()[0]:.2f}; hf-gpt2 6x384 LoRA r8 ({trainable} trainable), {CLIENTS} clients x "
          f"batch {BATCH} x {SEQ} tokens, AdamW lr {args.lr}, R={args.rounds} rounds x S={args.steps} steps, "
          f"test {args.test_size} seqs", flush=True)
    t_start = time.perf_counter()
    results: dict = {"settings": {**vars(args), "clients": CLIENTS, "batch": BATCH, "seq_len": SEQ, "cut": CUT,
                                  "tail_cut": TAIL, "trainable_params": trainable, "order": "sequential: centralized, psl, psl-u",
                                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                  "loadavg_before": os.getloadavg()}}
    run_t0 = time.perf_counter()
    results["centralized"] = run_centralized(parts, test, args.rounds, args.steps, args.lr)
    results["centralized"]["seconds"] = time.perf_counter() - run_t0
    for name, tail in (("psl", 0), ("psl-u", TAIL)):
        run_t0 = time.perf_counter()
        results[name] = run_split(parts, test, args.rounds, args.steps, args.lr, tail)
        results[name]["seconds"] = time.perf_counter() - run_t0
        expected = args.rounds * args.steps
        bad = {n: p for n, p in results[name]["final_positions"].items() if p != expected}
        results[name]["cursor_check"] = "ok" if not bad else f"positions {bad} != {expected}"
        print(f"  {name}: cursor check {results[name]['cursor_check']}", flush=True)
    results["settings"]["loadavg_after"] = os.getloadavg()
    results["settings"]["total_seconds"] = time.perf_counter() - t_start

    c, ps, pu = results["centralized"], results["psl"], results["psl-u"]
    print()
    print("| step | central test | PSL test | U-PSL test | central train | PSL train | U-PSL train "
          "| central s/step | PSL s/step | U-PSL s/step | PSL adapters up/down (kB) | PSL smashed up/down (kB) "
          "| U adapters up/down (kB) | U smashed up/down (kB) |")
    print("|" + "---:|" * 14)
    print(f"| 0 | {c['test_loss'][0]:.4f} | {ps['initial_test_loss']:.4f} | {pu['initial_test_loss']:.4f} "
          "| | | | | | | | | | |")
    kb = lambda v: f"{v / 1e3:,.0f}"  # noqa: E731
    for r in range(args.rounds):
        e, u = ps["rounds"][r], pu["rounds"][r]
        st = c["step_seconds"][r]
        print(f"| {(r + 1) * args.steps} | {c['test_loss'][r + 1]:.4f} | {e['test_loss']:.4f} | {u['test_loss']:.4f} "
              f"| {c['train_loss'][r]:.4f} | {e['train_loss']:.4f} | {u['train_loss']:.4f} "
              f"| {sum(st) / len(st):.3f} | {e['step_seconds']:.3f} | {u['step_seconds']:.3f} "
              f"| {kb(e['bytes_up'] - e['split_bytes_up'])} / {kb(e['bytes_down'] - e['split_bytes_down'])} "
              f"| {kb(e['split_bytes_up'])} / {kb(e['split_bytes_down'])} "
              f"| {kb(u['bytes_up'] - u['split_bytes_up'])} / {kb(u['bytes_down'] - u['split_bytes_down'])} "
              f"| {kb(u['split_bytes_up'])} / {kb(u['split_bytes_down'])} |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    c_step = mean([t for ts in c["step_seconds"] for t in ts])
    p_step, u_step = mean([e["step_seconds"] for e in ps["rounds"]]), mean([e["step_seconds"] for e in pu["rounds"]])
    print(f"\nmean s/step: centralized {c_step:.3f}, PSL {p_step:.3f} ({p_step / c_step:.2f}x), "
          f"U-PSL {u_step:.3f} ({u_step / c_step:.2f}x); total {results['settings']['total_seconds']:.0f}s; "
          f"load before {results['settings']['loadavg_before'][0]:.2f} after {results['settings']['loadavg_after'][0]:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
