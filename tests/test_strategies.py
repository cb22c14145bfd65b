"""Strategy behaviour beyond exactness: client sync option, node sampling, cut assignment."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.planes.inprocess import InProcessGrid
from flsplit.strategies import PSL, SFLV2
from tests.helpers import max_abs_diff, model_fn, random_data


def recording_app(partitions, sent_parts):
    clients = [SplitClient(model_fn, d, salt=i) for i, d in enumerate(partitions)]
    app = ClientApp()

    @app.train("split_step")
    def _train(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        if p.CLIENT_PART in msg.content.array_records:
            sent_parts.append((pid, msg.content.array_records[p.CLIENT_PART].to_torch_state_dict()))
        return clients[pid].train_step(msg, ctx)

    return app


def run(cls, partitions, num_rounds, grid_cls=InProcessGrid, **kwargs):
    sent = []
    returned: dict[int, list] = {}

    def keep_returned_parts(node_id, reply):
        if reply.has_content() and p.CLIENT_PART in reply.content.array_records:
            part = reply.content.array_records[p.CLIENT_PART].to_torch_state_dict()
            returned.setdefault(node_id - 1000, []).append(part)
        return reply

    grid = grid_cls(recording_app(partitions, sent), len(partitions), intercept=keep_returned_parts)
    grid.returned_parts = returned
    strategy = cls(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, shuffle=False, **kwargs)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=num_rounds)
    return strategy, result, sent, grid


def test_psl_without_client_sync_resumes_each_clients_own_part():
    parts = [random_data(8, seed=1), random_data(8, seed=2)]
    _, _, sent, grid = run(PSL, parts, 2, cut_layer=3, batch_size=4, max_steps=1, sync_clients=False)
    returned = grid.returned_parts  # what each client sent back at the end of round 1
    assert [pid for pid, _ in sent[2:]] == [0, 1]
    for pid, start in sent[2:]:
        assert max_abs_diff(start, returned[pid][0]) == 0.0
    assert max_abs_diff(sent[2][1], sent[3][1]) > 0  # two different starting parts

    _, _, synced, _ = run(PSL, parts, 2, cut_layer=3, batch_size=4, max_steps=1)
    average = {k: (returned[0][0][k] + returned[1][0][k]) / 2 for k in returned[0][0]}
    assert max_abs_diff(synced[2][1], synced[3][1]) == 0.0  # synced: both get the average
    assert max_abs_diff(synced[2][1], average) <= 1e-12  # equal samples: the plain mean


class SlowlyConnectingGrid(InProcessGrid):
    """Nodes appear one by one: first call sees one node, then all."""

    calls = 0

    def get_node_ids(self):
        SlowlyConnectingGrid.calls += 1
        return self.node_ids[:1] if SlowlyConnectingGrid.calls <= 2 else list(self.node_ids)


def test_sampling_waits_until_enough_nodes_are_connected():
    parts = [random_data(8, seed=1), random_data(8, seed=2), random_data(8, seed=3)]
    strategy, _, _, _ = run(SFLV2, parts, 1, grid_cls=SlowlyConnectingGrid, cut_layer=2, batch_size=8, min_available_nodes=3)
    assert SlowlyConnectingGrid.calls >= 3
    assert len(strategy.history.rounds[0]["nodes"]) == 3


def test_fraction_train_samples_a_seeded_subset_and_cuts_can_change_per_round():
    parts = [random_data(8, seed=i) for i in range(4)]
    cut_fn = lambda rnd, nodes: {n: 1 + rnd for n in nodes}  # noqa: E731
    strategy, _, _, _ = run(SFLV2, parts, 2, cut_layer=cut_fn, batch_size=8, fraction_train=0.5, seed=3)
    rounds = strategy.history.rounds
    assert [len(r["nodes"]) for r in rounds] == [2, 2]
    assert [set(r["cuts"].values()) for r in rounds] == [{2}, {3}]
    again, _, _, _ = run(SFLV2, parts, 2, cut_layer=cut_fn, batch_size=8, fraction_train=0.5, seed=3)
    assert [r["nodes"] for r in again.history.rounds] == [r["nodes"] for r in rounds]
    assert torch.isfinite(torch.tensor([r["train_loss"] for r in rounds])).all()


def test_long_rounds_log_their_progress():
    import logging

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        parts = [random_data(12, seed=1), random_data(12, seed=2)]
        grid = InProcessGrid(recording_app(parts, []), 2)
        strategy = SFLV2(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=2, batch_size=4)
        strategy.progress_interval = 0.0
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    progress = [line for line in lines if "client batches" in line]
    assert progress[-1] == "[flsplit] round 1: 6/6 client batches (100%)"
    assert progress[0].startswith("[flsplit] round 1: 1/")  # totals are known once each node replied
