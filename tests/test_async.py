"""Loss-triggered asynchronous SL: the state rule, the wire, the cache, and learning."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.wire.codecs import get_codec
from flsplit.planes.inprocess import InProcessGrid
from flsplit.runtime.server import ServerPart
from flsplit.strategies import AsyncSL
from flsplit.strategies.async_sl import next_state
from tests.helpers import model_fn, random_data
from tests.test_learning import run_app


@pytest.mark.parametrize(
    "state, reference, loss, threshold, expected",
    [
        ("A", None, 1.0, 0.1, "A"),  # no reference yet: stay in A
        ("A", 1.0, 0.5, 0.1, "A"),  # loss moved a lot
        ("A", 1.0, 0.95, 0.1, "B"),  # settled: A -> B
        ("B", 1.0, 0.95, 0.1, "C"),  # B -> C
        ("C", 1.0, 0.95, 0.1, "C"),  # C stays
        ("C", 1.0, 1.3, 0.1, "A"),  # drifted away: back to A
        ("B", 1.0, 0.75, 0.25, "A"),  # boundary: delta == threshold -> A (exact in binary)
        ("C", 0.5, 0.625, 0.125, "A"),  # boundary from above
        ("A", 0.5, 0.625, 0.1250001, "B"),  # just under the threshold
        ("A", 0.5, 0.5, 0.0, "A"),  # threshold 0: always A (synchronous)
    ],
)
def test_state_rule(state, reference, loss, threshold, expected):
    assert next_state(state, reference, loss, threshold) == expected


def test_reference_loss_is_refreshed_only_in_state_a():
    strategy = AsyncSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, loss_threshold=0.1)
    strategy.node_stats = {}
    losses = {"A": 2.0, "B": 1.95, "C": 1.5}
    from flsplit.runtime.server import StepStats

    def window(state, loss):
        stats = StepStats()
        stats.loss_sum, stats.samples = loss * 10, 10
        strategy.node_stats = {7: stats}
        strategy._update_states({7: state})

    window("A", losses["A"])  # first window: reference becomes 2.0
    assert strategy.reference_loss[7] == 2.0 and strategy.states[7] == "A"
    window("A", 1.95)  # settled: A -> B, reference refreshed to 1.95
    assert strategy.states[7] == "B" and strategy.reference_loss[7] == 1.95
    window("B", 1.9)  # B: reference not refreshed
    assert strategy.states[7] == "C" and strategy.reference_loss[7] == 1.95
    window("C", 1.5)  # far from the reference: back to A, reference still from the last A
    assert strategy.states[7] == "A" and strategy.reference_loss[7] == 1.95


def _recording_app(partitions, log):
    clients = [SplitClient(model_fn, d, salt=i) for i, d in enumerate(partitions)]
    app = ClientApp()

    def handle(kind):
        def run(msg, ctx):
            pid = int(ctx.node_config["partition-id"])
            reply = getattr(clients[pid], kind)(msg, ctx)
            log.append(
                {
                    "round": msg.metadata.group_id,
                    "node": pid,
                    "type": msg.metadata.message_type,
                    "down_arrays": sum(len(a.data) for r in msg.content.array_records.values() for a in r.values()),
                    "grad": p.GRAD in msg.content.array_records,
                    "reply": reply,
                }
            )
            return reply

        return run

    app.train("split_step")(handle("train_step"))
    app.train("split_upload")(handle("upload"))
    return app


def _run(partitions, rounds, log, **kwargs):
    grid = InProcessGrid(_recording_app(partitions, log), len(partitions))
    strategy = AsyncSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, cut_layer=2, batch_size=8, **kwargs)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=rounds)
    return strategy


def test_wire_a_both_ways_b_one_way_c_silent(monkeypatch):
    """A huge threshold never triggers A again: rounds 1-2 A (the first sets the reference),
    round 3 B, round 4 C."""
    log: list[dict] = []
    parts = [random_data(24, seed=1), random_data(24, seed=2)]
    strategy = _run(parts, 4, log, loss_threshold=1e9)
    states = [{k: v["state"] for k, v in r["async"].items()} for r in strategy.history.rounds]
    assert [set(s.values()) for s in states] == [{"A"}, {"A"}, {"B"}, {"C"}]

    by_round = {r: [e for e in log if e["round"] == r] for r in ("2", "3", "4")}
    # A: split steps with gradients down and smashed data up
    assert all(e["type"] == p.TRAIN_STEP for e in by_round["2"])
    assert any(e["grad"] and e["down_arrays"] > 0 for e in by_round["2"])
    # B: one upload per client, nothing but the config down, the whole window up
    assert [e["type"] for e in by_round["3"]] == [p.UPLOAD, p.UPLOAD]
    assert all(e["down_arrays"] == 0 and not e["grad"] for e in by_round["3"])
    assert all(len([k for k in e["reply"].content.array_records[p.SMASHED] if k.startswith("x.") and k[2:].isdigit()]) == 3 for e in by_round["3"])
    # C: no message to or from any client
    assert by_round["4"] == []
    assert strategy.history.rounds[3]["bytes_up"] == 0 and strategy.history.rounds[3]["bytes_down"] == 0
    assert strategy.history.rounds[3]["server_steps"] == 6  # trained on the cache


def test_server_trains_in_c_on_exactly_what_was_sent_in_b(monkeypatch):
    log: list[dict] = []
    trained: list[tuple[int, torch.Tensor]] = []
    original = ServerPart.step_each

    def recording(self, batches, input_grad=True):
        trained.extend((cut, b.x.clone()) for cut, b in batches)
        return original(self, batches, input_grad)

    monkeypatch.setattr(ServerPart, "step_each", recording)
    parts = [random_data(16, seed=3)]
    strategy = _run(parts, 4, log, loss_threshold=1e9)
    sent = [e["reply"] for e in log if e["type"] == p.UPLOAD][0].content.array_records[p.SMASHED]
    codec = get_codec("fp8-e4m3")
    uploaded = [codec.decode_from(sent, f"x.{i}", torch.float64) for i in range(2)]
    in_c = [x for _, x in trained[-2:]]  # round 4 trains on the two cached batches
    assert all(torch.equal(a, b) for a, b in zip(uploaded, in_c))
    assert strategy.cache[next(iter(strategy.cache))][1] is sent  # kept encoded, as received
    assert sent["x.0"].dtype == "uint8"  # one byte per value


def test_cache_bound_sends_an_evicted_client_back_to_b():
    log: list[dict] = []
    parts = [random_data(16, seed=4), random_data(16, seed=5)]
    one_upload = 2 * (8 * 16 * 8 * 8 + 200)  # two fp8 batches of 8 x 16 x 8 x 8 plus headers
    strategy = _run(parts, 4, log, loss_threshold=1e9, cache_max_mb=1.5 * one_upload / 1e6)
    assert len(strategy.cache) == 1  # only one client's upload fits
    fourth = {k: v["state"] for k, v in strategy.history.rounds[3]["async"].items()}
    assert sorted(fourth.values()) == ["B", "C"]  # the evicted client uploads again


def test_async_learns_within_one_point_of_synchronous(tmp_path):
    """Over three seeds, async SL with FP8 loses at most one point of best test accuracy on
    average against synchronous fp32 SL, and sends under a quarter of its bytes.

    One seed is not evidence here: 360 test digits make one point 3.6 samples, and a single
    trajectory moves by more than that with the float rounding of the machine (measured Dec
    2026: seed 0 at threshold 0.1 lost 1.1 points on one 2-core VM and passed on another).
    """
    sync_best, fp8_best, sync_bytes, fp8_bytes, states = [], [], 0, 0, set()
    best = lambda h: max(r["test_accuracy"] for r in h["rounds"])  # noqa: E731
    traffic = lambda h: sum(r["bytes_up"] + r["bytes_down"] for r in h["rounds"])  # noqa: E731
    for seed in range(3):
        sync = run_app(tmp_path / f"sync{seed}", strategy="async", seed=seed, **{"num-server-rounds": 10, "loss-threshold": 0.0, "codec-up": "fp32", "codec-down": "fp32"})
        fp8 = run_app(tmp_path / f"async{seed}", strategy="async", seed=seed, **{"num-server-rounds": 10, "loss-threshold": 0.05})
        assert all(v["state"] == "A" for r in sync["rounds"] for v in r["async"].values())
        states |= {v["state"] for r in fp8["rounds"] for v in r["async"].values()}
        sync_best.append(best(sync))
        fp8_best.append(best(fp8))
        sync_bytes += traffic(sync)
        fp8_bytes += traffic(fp8)
    assert "C" in states
    assert sum(fp8_best) / 3 >= sum(sync_best) / 3 - 0.01, (fp8_best, sync_best)
    assert fp8_bytes < sync_bytes / 4


def test_async_reads_its_own_run_config_keys():
    """The ServerApp takes a scheme's own keys from its class: a window of N steps is a round of N batches."""
    config = {"loss-threshold": 0.2, "cache-max-mb": 8.0, "state-window": "epoch"}
    assert AsyncSL.run_config_options(config) == {"loss_threshold": 0.2, "cache_max_mb": 8.0}
    assert AsyncSL.run_config_options({**config, "state-window": "5"})["max_steps"] == 5
    for bad in ("0", "five", "-1"):
        with pytest.raises(ValueError, match="state-window must be 'epoch' or a number of steps"):
            AsyncSL.run_config_options({**config, "state-window": bad})
