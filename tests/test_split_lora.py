"""LoRA and frozen client parts in split training: only what trains travels and is averaged.

A LoRA'd model (``flsplit.model.lora.add_lora``) split and trained by the runtime equals the
unsplit LoRA'd model's SGD on the same batches (float64, 1e-10); the client part that travels
is its adapters (and buffers), never the frozen base weights, which stay bit for bit; a frozen
client part (SplitFrozen) sends no weights and gets no gradients.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp

from flsplit.data.datasets import TensorData
from flsplit.model.lora import add_lora, freeze, trainable_keys
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import gpt_tiny
from flsplit.planes.inprocess import InProcessGrid
from flsplit.runtime.client import SplitClient
from flsplit.strategies import EPSL, PSL, SFLGA, SL
from flsplit.wire import protocol as p
from tests.helpers import client_app_of, max_abs_diff
from tests.test_text_models import DEPTH, DIM, HEADS, LR, T, VOCAB, token_data

pytest.importorskip("peft")


def lora_fn() -> SplitModel:
    torch.manual_seed(7)
    split = SplitModel(gpt_tiny(num_classes=VOCAB, seq_len=T, dim=DIM, depth=DEPTH, heads=HEADS).double())
    add_lora(split, rank=2, alpha=4.0)
    with torch.no_grad():  # lora_B starts at zero: make the adapters do something from the first step
        for name, q in split.blocks.named_parameters():
            if "lora_B" in name:
                q.normal_(0.0, 0.1)
    return split


def frozen_fn() -> SplitModel:
    torch.manual_seed(8)
    split = SplitModel(gpt_tiny(num_classes=VOCAB, seq_len=T, dim=DIM, depth=DEPTH, heads=HEADS).double())
    freeze(split.client_part(2))
    return split


def unsplit_sgd(model_fn, batches: list[TensorData]) -> dict[str, torch.Tensor]:
    model = model_fn().blocks
    opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=LR)
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(b.x).reshape(-1, VOCAB), b.y.reshape(-1)).backward()
        opt.step()
    return model.state_dict()


def run(cls, model_fn, parts, records: list | None = None, **settings):
    inner = client_app_of([SplitClient(model_fn, d, d, salt=i) for i, d in enumerate(parts)])
    app = ClientApp()

    @app.train("split_step")
    def _train(msg: Message, ctx):
        reply = inner(msg, ctx)
        if records is not None:
            records.extend([msg.content, reply.content])
        return reply

    grid = InProcessGrid(app, len(parts))
    strategy = cls(model_fn=model_fn, input_shape=(T,), num_classes=VOCAB, learning_rate=LR, shuffle=False, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    assert not strategy.history.rounds[-1]["errors"]
    return strategy, result.arrays.to_torch_state_dict()


@pytest.mark.parametrize("tail_cut", [0, 3])
def test_split_lora_equals_unsplit_lora_and_sends_only_the_adapters(tail_cut):
    data, b, steps = token_data(12, seed=1), 4, 3
    records: list = []
    _, got = run(SL, lora_fn, [data], records, cut_layer=2, tail_cut=tail_cut, batch_size=b, max_steps=steps)
    reference = unsplit_sgd(lora_fn, [data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)])
    assert max_abs_diff(got, reference) <= 1e-10
    start = lora_fn()
    base = {k: v for k, v in start.blocks.state_dict().items() if k not in trainable_keys(start.blocks)}
    assert all(torch.equal(got[k], v) for k, v in base.items())  # frozen base weights, bit for bit
    client = start.client_part(2, tail_cut)
    sent = [set(c.array_records[p.CLIENT_PART].keys()) for c in records if p.CLIENT_PART in c.array_records]
    assert len(sent) == 2 and all(keys == set(trainable_keys(client)) for keys in sent)  # down at the start, up at the end
    assert all("lora_" in k for k in sent[0])


def test_lora_client_part_traffic_is_the_adapters():
    parts = [token_data(8, seed=2), token_data(8, seed=3)]
    strategy, _ = run(PSL, lora_fn, parts, cut_layer=2, batch_size=4, max_steps=2)
    entry = strategy.history.rounds[-1]
    weights_up = entry["bytes_up"] - entry["split_bytes_up"]
    client = lora_fn().client_part(2)
    adapters = sum(v.numel() * v.element_size() for k, v in client.state_dict().items() if k in trainable_keys(client))
    full = sum(v.numel() * v.element_size() for v in client.state_dict().values())
    assert 2 * adapters <= weights_up < 2 * adapters + 2 * 4096  # two nodes' adapters and their array headers
    assert weights_up < full / 4


@pytest.mark.parametrize("cls", [PSL, SFLGA, EPSL])
def test_a_frozen_client_part_sends_no_weights_and_gets_no_gradients(cls):
    parts = [token_data(8, seed=4), token_data(8, seed=5)]
    records: list = []
    strategy, got = run(cls, frozen_fn, parts, records, cut_layer=2, batch_size=4, max_steps=2)
    start = frozen_fn().blocks.state_dict()
    assert all(torch.equal(got[k], start[k]) for k in start if int(k.split(".")[0]) < 2)  # the devices' blocks
    assert any(not torch.equal(got[k], start[k]) for k in start if int(k.split(".")[0]) >= 2)  # the server's trained
    assert not any(p.GRAD in c.array_records or p.BCAST in c.array_records for c in records)
    assert all(len(c.array_records[p.CLIENT_PART]) == 0 for c in records if p.CLIENT_PART in c.array_records)
    assert strategy.history.rounds[-1]["num_examples"] == 2 * 2 * 4
