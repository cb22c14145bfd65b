"""Language models split at a block: the zoo's ``gpt-tiny`` on token ids, next-token labels
``(b, T)`` on the wire, the offline ``stdlib-text`` corpus, and split training equal to the
unsplit model's SGD on the same batches (float64, to 1e-10) at every cut, SL and PSL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from flsplit.data import text
from flsplit.data.datasets import TensorData, dataset_info, load_centralized, load_partition, partition_indices
from flsplit.data.local import LocalDataError, load_local
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import build_model, gpt_tiny
from flsplit.planes.inprocess import InProcessGrid
from flsplit.runtime.client import SplitClient
from flsplit.strategies import PSL, SL, SFLV2
from flsplit.wire import protocol as p
from flsplit.wire.codecs import get_codec
from tests.helpers import client_app_of, max_abs_diff

VOCAB, T, LR = 32, 8, 0.1
DIM, DEPTH, HEADS = 16, 2, 2


def lm_fn() -> SplitModel:
    torch.manual_seed(99)
    return SplitModel(gpt_tiny(num_classes=VOCAB, seq_len=T, dim=DIM, depth=DEPTH, heads=HEADS).double())


def token_data(n: int, seed: int) -> TensorData:
    """Random token sequences and their next tokens (the window shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (n, T + 1), generator=g)
    return TensorData(seq[:, :-1].contiguous(), seq[:, 1:].contiguous())


def unsplit_sgd(batches: list[TensorData]) -> dict[str, torch.Tensor]:
    """Plain torch: the unsplit model, SGD on the mean next-token cross-entropy over every token."""
    model = lm_fn().blocks
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for b in batches:
        opt.zero_grad()
        logits = model(b.x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b.y.reshape(-1)).backward()
        opt.step()
    return model.state_dict()


def run(cls, parts: list[TensorData], **settings):
    clients = [SplitClient(lm_fn, d, d, salt=i) for i, d in enumerate(parts)]
    grid = InProcessGrid(client_app_of(clients), len(parts))
    strategy = cls(model_fn=lm_fn, input_shape=(T,), num_classes=VOCAB, learning_rate=LR, shuffle=False, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(lm_fn().blocks.state_dict()), num_rounds=1)
    return strategy, result.arrays.to_torch_state_dict()


# ------------------------------------------------------------------ the model
def test_gpt_tiny_is_causal_and_takes_token_ids():
    model = build_model("gpt-tiny", 256, seq_len=64)
    assert model.num_blocks == 6 and model.input_dtype == torch.int64
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, 40] = (changed[:, 40] + 1) % 256
    with torch.no_grad():
        a, b = model.blocks(x), model.blocks(changed)
    assert a.shape == (2, 64, 256)
    assert torch.equal(a[:, :40], b[:, :40])  # no position sees a later token
    assert not torch.equal(a[:, 40:], b[:, 40:])


def test_an_image_model_on_text_and_a_text_model_on_images_are_refused():
    with pytest.raises(ValueError, match="reads token sequences"):
        build_model("gpt-tiny", 10, 1, 8)
    with pytest.raises(ValueError, match="reads images"):
        build_model("digits-cnn", 256, seq_len=64)


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("cut", range(1, DEPTH + 2))
def test_sl_equals_unsplit_sgd_at_every_cut(cut):
    data, b, steps = token_data(12, seed=1), 4, 3
    strategy, got = run(SL, [data], cut_layer=cut, batch_size=b, max_steps=steps)
    reference = unsplit_sgd([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)])
    assert max_abs_diff(got, reference) <= 1e-10
    assert strategy.round.errors == []


def test_psl_step_equals_unsplit_sgd_on_the_union():
    parts = [token_data(5, seed=2), token_data(3, seed=3), token_data(4, seed=4)]
    _, got = run(PSL, parts, cut_layer=2, batch_size=8, max_steps=1)
    union = TensorData(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    assert max_abs_diff(got, unsplit_sgd([union])) <= 1e-10


def test_the_server_reports_the_mean_token_loss_and_accuracy():
    data = token_data(4, seed=5)
    strategy, _ = run(SFLV2, [data], cut_layer=1, batch_size=4, max_steps=1)
    with torch.no_grad():
        logits = lm_fn().blocks(data.x)
    want_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), data.y.reshape(-1)).item()
    want_acc = (logits.argmax(-1) == data.y).double().mean().item()
    stats = strategy.train_stats()
    assert stats.loss == pytest.approx(want_loss, rel=1e-12)
    assert stats.accuracy == pytest.approx(want_acc, rel=1e-12)


# ------------------------------------------------------------------ the wire
def _smashed(y: torch.Tensor) -> ArrayRecord:
    return p.encode_batches([p.SmashedBatch(torch.zeros(y.shape[0], T, DIM, dtype=torch.float64), y)], get_codec("native"))


def test_the_gate_wants_one_next_token_per_position_inside_the_vocabulary():
    strategy, _ = run(SL, [token_data(4, seed=6)], cut_layer=1, batch_size=4, max_steps=1)
    gate = strategy.gate
    assert gate.label_shape == (T,)
    good = torch.randint(0, VOCAB, (4, T))
    assert len(gate.smashed(_smashed(good), 1, 1, "reply")) == 1
    with pytest.raises(p.ProtocolError, match=r"y.0: wrong shape \(4,\), expected \(4, 8\)"):
        gate.smashed(_smashed(good[:, 0]), 1, 1, "reply")
    with pytest.raises(p.ProtocolError, match=r"labels outside \[0, 32\)"):
        gate.smashed(_smashed(good.clone().fill_(VOCAB)), 1, 1, "reply")


# ------------------------------------------------------------------ the offline corpus
def test_stdlib_text_is_next_byte_windows_of_held_out_source_files():
    info = dataset_info("stdlib-text")
    assert (info.input_shape, info.num_classes) == ((64,), 256)
    train, test = load_centralized("stdlib-text", "train"), load_centralized("stdlib-text", "test")
    assert train.x.dtype == torch.int64 and train.x.shape[1:] == (64,) and train.y.shape == train.x.shape
    assert torch.equal(train.x[:, 1:], train.y[:, :-1])  # y is x shifted by one byte
    docs, owner = text.stdlib_documents(), text.stdlib_text("train")[2]
    for i in (0, 1, len(train) - 1):  # each sample is a 65-byte window of its own file, at a multiple of 64
        source, window = docs[owner[i]][1], bytes(train.x[i].tolist()) + bytes(train.y[i, -1:].tolist())
        assert any(source[k : k + 65] == window for k in range(0, len(source) - 64, 64))
    train_docs, test_docs = set(text.stdlib_text("train")[2]), set(text.stdlib_text("test")[2])
    assert not train_docs & test_docs and len(test_docs) == len(range(0, len(docs), 10))


def test_stdlib_text_splits_iid_by_sample_and_non_iid_by_document():
    train = load_centralized("stdlib-text", "train")
    docs = text.stdlib_text("train")[2]

    def document_spread(partitioning: str) -> float:
        """Mean over documents of the largest share of its samples that one node holds."""
        owner = np.full(len(train), -1)
        for node, index in enumerate(partition_indices(docs, partitioning, 4, alpha=0.1)):
            part = load_partition("stdlib-text", node, 4, partitioning, alpha=0.1)
            assert torch.equal(part.x, train.x[index]) and torch.equal(part.y, train.y[index])
            owner[index] = node
        assert (owner >= 0).all()  # every sample on one node
        counts = np.zeros((docs.max() + 1, 4))
        np.add.at(counts, (docs, owner), 1)
        counts = counts[counts.sum(1) > 0]
        return float((counts.max(1) / counts.sum(1)).mean())

    # iid: each file spread over the 4 nodes; Dirichlet by document: most of a file on one node
    assert document_spread("iid") < 0.4 < 0.8 < document_spread("dirichlet")


def test_a_node_own_token_file_is_read_and_checked(tmp_path):
    info = dataset_info("stdlib-text")
    seq = np.random.default_rng(0).integers(0, 256, (10, 65))
    np.savez(tmp_path / "mine.npz", x=seq[:, :-1], y=seq[:, 1:])
    data = load_local(tmp_path / "mine.npz", info)
    assert data.x.dtype == torch.int64 and torch.equal(data.y, torch.as_tensor(seq[:, 1:]))
    np.savez(tmp_path / "short.npz", x=seq[:, :32], y=seq[:, 1:33])
    with pytest.raises(LocalDataError, match=r"takes \(N, 64\) tokens"):
        load_local(tmp_path / "short.npz", info)
    np.savez(tmp_path / "big.npz", x=seq[:, :-1] + 256, y=seq[:, 1:])
    with pytest.raises(LocalDataError, match="outside 0..255"):
        load_local(tmp_path / "big.npz", info)


def test_the_flower_app_trains_gpt_tiny_on_stdlib_text(tmp_path):
    """The project's ServerApp and ClientApp, configured as a user would (run config only)."""
    from apps.client_app import app as client_app
    from apps.server_app import app as server_app
    from apps.task import DEFAULTS

    config = {**DEFAULTS, "model": "gpt-tiny", "dataset": "stdlib-text", "optimizer": "adamw", "learning-rate": 0.003,
              "num-server-rounds": 2, "max-steps": 3, "batch-size": 8, "output-dir": str(tmp_path), "cut-layer": "2"}
    grid = InProcessGrid(client_app, 2, run_config=config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    import json

    (run_dir,) = tmp_path.iterdir()
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["errors"] for r in history["rounds"]] == [[], []]
    losses = [r["test_loss"] for r in history["rounds"]]
    assert losses[1] < losses[0] < np.log(256)  # below a uniform guess over the bytes, and falling
