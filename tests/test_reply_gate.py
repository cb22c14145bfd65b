"""Fuzz corpus of malformed replies and requests (issue 12): 0 crashes, 0 silent acceptances,
0 corrupted models, and each error names its problem.

Replies (client -> server) are spoilt on the client, after an honest client built them, so
the same spoilers run over Flower messages and over the stream plane. A spoilt reply must
be refused with an error naming the problem, the run must go on, and the global model must
be bit-identical to the reference: the same run in which that node failed at that point
(its ClientApp raised instead of replying), i.e. sat out the rest of the round.
Requests (server -> client) are sent to a ``SplitClient`` directly: each must raise a
``ProtocolError`` naming the problem and leave ``context.state`` as it was.
The stream plane's frames have their own corpus in ``test_stream_security.py``.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Callable, Optional

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.planes.inprocess import SERVER_NODE_ID, InProcessGrid
from flsplit.planes.stream.offer import FALLBACK, OFFER
from flsplit.planes.stream.plane import StreamDataPlane
from flsplit.strategies import EPSL, PSL, SFLGA, SFLV1, SFLV2, SL
from tests.helpers import client_app_of, model_fn, random_data

PARTS = [random_data(8, seed=11), random_data(8, seed=12)]  # 2 batches of 4 per node and round
SETTINGS = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, shuffle=False, batch_size=4, cut_layer=3)
BAD_NODE = 1000  # partition 0 misbehaves; partition 1 is honest
# the n-th train reply of a round: 1 = first (with the device record), 2 = second batch, 3 = the end
FIRST, STEP, FINAL = 1, 2, 3

Spoiler = Callable[[RecordDict], None]


class Fails(RuntimeError):
    """The reference: the node's ClientApp fails instead of replying."""


# ---------------------------------------------------------------- tensors in records
def get(content: RecordDict, record: str, key: str) -> torch.Tensor:
    return torch.from_numpy(content.array_records[record][key].numpy().copy())


def put(content: RecordDict, record: str, key: str, value: torch.Tensor | Array) -> None:
    content.array_records[record][key] = value if isinstance(value, Array) else Array(value.contiguous())


def garbage_like(array: Array) -> Array:
    """An Array whose header says one thing and whose bytes are garbage."""
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=b"\x93NUMPY garbage")


def edit(record: str, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Spoiler:
    return lambda c: put(c, record, key, fn(get(c, record, key)))


def setting(record: str, key: str, value) -> Spoiler:
    def spoil(c: RecordDict) -> None:
        c.config_records[record][key] = value
    return spoil


def delete(record: str, key: Optional[str] = None) -> Spoiler:
    def spoil(c: RecordDict) -> None:
        if key is None:
            for records in (c.array_records, c.metric_records, c.config_records):
                records.pop(record, None)
        elif record in c.array_records:
            del c.array_records[record][key]
        elif record in c.metric_records:
            del c.metric_records[record][key]
        else:
            del c.config_records[record][key]
    return spoil


def add(name: str, value) -> Spoiler:
    def spoil(c: RecordDict) -> None:
        c[name] = value
    return spoil


def metric(value) -> Spoiler:
    def spoil(c: RecordDict) -> None:
        c.metric_records[p.METRICS]["num-examples"] = value
    return spoil


def nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def inf_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = -float("inf")
    return t


def clear(c: RecordDict) -> None:
    for records in (c.array_records, c.metric_records, c.config_records):
        records.clear()


def second_batch(c: RecordDict) -> None:
    s = c.array_records[p.SMASHED]
    s["x.1"], s["y.1"] = s["x.0"], s["y.0"]


def gap(c: RecordDict) -> None:
    s = c.array_records[p.SMASHED]
    s["x.2"], s["y.2"] = s["x.0"], s["y.0"]


def doubled_rows(c: RecordDict) -> None:
    put(c, p.SMASHED, "x.0", torch.cat([get(c, p.SMASHED, "x.0")] * 2))
    put(c, p.SMASHED, "y.0", torch.cat([get(c, p.SMASHED, "y.0")] * 2))


def empty_batch(c: RecordDict) -> None:
    put(c, p.SMASHED, "x.0", get(c, p.SMASHED, "x.0")[:0])
    put(c, p.SMASHED, "y.0", get(c, p.SMASHED, "y.0")[:0])


def rows_header_lies(c: RecordDict) -> None:
    """Eight rows of payload under an array header that says four."""
    x = torch.cat([get(c, p.SMASHED, "x.0")] * 2)
    y = torch.cat([get(c, p.SMASHED, "y.0")] * 2)
    real = Array(x)
    c.array_records[p.SMASHED]["x.0"] = Array(dtype=real.dtype, shape=(4, *real.shape[1:]), stype=real.stype,
                                              data=real.data)
    put(c, p.SMASHED, "y.0", y)


def smashed_garbage(c: RecordDict) -> None:
    c.array_records[p.SMASHED]["x.0"] = garbage_like(c.array_records[p.SMASHED]["x.0"])


def part_garbage(c: RecordDict) -> None:
    c.array_records[p.CLIENT_PART]["0.weight"] = garbage_like(c.array_records[p.CLIENT_PART]["0.weight"])


def wrong_stype(c: RecordDict) -> None:
    a = c.array_records[p.SMASHED]["x.0"]
    c.array_records[p.SMASHED]["x.0"] = Array(dtype=a.dtype, shape=tuple(a.shape), stype="pickle", data=a.data)


def server_block_in_part(c: RecordDict) -> None:
    put(c, p.CLIENT_PART, "6.weight", model_fn().blocks.state_dict()["6.weight"])


def whole_model_as_part(c: RecordDict) -> None:
    c.array_records[p.CLIENT_PART] = ArrayRecord(model_fn().blocks.state_dict())


def huge_part_key(c: RecordDict) -> None:
    put(c, p.CLIENT_PART, "0.bias", torch.zeros(2_000_000, dtype=torch.float64))


def smashed_on_final(c: RecordDict) -> None:
    c[p.SMASHED] = ArrayRecord({"x.0": Array(torch.zeros(4, 32, 4, 4, dtype=torch.float64)),
                                "y.0": Array(torch.zeros(4, dtype=torch.int64))})


# ---------------------------------------------------------------- the corpus of replies
# (case id, which train reply of node 1000 is spoilt, spoiler, phrase the error must contain)
STEP_CASES = [
    ("x-shape", STEP, edit(p.SMASHED, "x.0", lambda x: x[:, :, :2]), "wrong shape"),
    ("x-extra-dim", STEP, edit(p.SMASHED, "x.0", lambda x: x.unsqueeze(1)), "wrong shape"),
    ("x-scalar", STEP, edit(p.SMASHED, "x.0", lambda x: x[0, 0, 0, 0]), "wrong shape"),
    ("x-float32", STEP, edit(p.SMASHED, "x.0", lambda x: x.float()), "wrong dtype torch.float32"),
    ("x-int64", STEP, edit(p.SMASHED, "x.0", lambda x: x.long()), "wrong dtype torch.int64"),
    ("x-nan", STEP, edit(p.SMASHED, "x.0", nan_at), "NaN or infinite"),
    ("x-inf", STEP, edit(p.SMASHED, "x.0", inf_at), "NaN or infinite"),
    ("x-missing", STEP, delete(p.SMASHED, "x.0"), "missing key 'x.0'"),
    ("y-missing", STEP, delete(p.SMASHED, "y.0"), "missing key 'y.0'"),
    ("y-too-high", STEP, edit(p.SMASHED, "y.0", lambda y: torch.full_like(y, 10)), "labels outside [0, 10)"),
    ("y-negative", STEP, edit(p.SMASHED, "y.0", lambda y: torch.full_like(y, -1)), "labels outside [0, 10)"),
    ("y-huge", STEP, edit(p.SMASHED, "y.0", lambda y: torch.full_like(y, 2**40)), "labels outside [0, 10)"),
    ("y-float", STEP, edit(p.SMASHED, "y.0", lambda y: y.double()), "wrong dtype torch.float64"),
    ("y-int32", STEP, edit(p.SMASHED, "y.0", lambda y: y.int()), "wrong dtype torch.int32"),
    ("y-short", STEP, edit(p.SMASHED, "y.0", lambda y: y[:2]), "wrong shape"),
    ("y-2d", STEP, edit(p.SMASHED, "y.0", lambda y: y[:, None]), "wrong shape"),
    ("empty-batch", STEP, empty_batch, "empty batch"),
    ("more-batches-than-K", STEP, second_batch, "2 batches, more than the 1"),
    ("batch-number-gap", STEP, gap, "3 batches, more than the 1"),
    ("rows-over-batch-size", STEP, doubled_rows, "8 rows, more than batch-size 4"),
    ("rows-header-lies", STEP, rows_header_lies, "bytes, more than the"),  # the byte cap sees the real rows
    ("extra-smashed-key", STEP, lambda c: put(c, p.SMASHED, "z", torch.zeros(1)), "unexpected key 'z'"),
    ("scale-under-native-codec", STEP, lambda c: put(c, p.SMASHED, "x.0.scale", torch.ones(())),
     "unexpected key 'x.0.scale'"),
    ("x-garbage-bytes", STEP, smashed_garbage, "cannot decode"),
    ("x-pickle-stype", STEP, wrong_stype, "cannot decode"),
    ("x-over-byte-cap", STEP, edit(p.SMASHED, "x.0", lambda x: torch.zeros(4, 4096, 64)), "bytes, more than the"),
    ("smashed-record-empty", STEP, add(p.SMASHED, ArrayRecord()), "missing key 'x.0'"),
    ("smashed-missing", STEP, delete(p.SMASHED), "missing record 'split.smashed'"),
    ("status-missing", STEP, delete(p.STATUS), "missing record 'split.status'"),
    ("status-done-string", STEP, setting(p.STATUS, "done", "no"), "done must be true or false"),
    ("status-done-int", STEP, setting(p.STATUS, "done", 0), "done must be true or false"),
    ("status-position-negative", STEP, setting(p.STATUS, "position", -4), "position must be an integer >= 0"),
    ("status-remaining-float", STEP, setting(p.STATUS, "remaining", 1.5), "remaining must be an integer"),
    ("status-remaining-missing", STEP, delete(p.STATUS, "remaining"), "is missing 'remaining'"),
    ("status-extra-key", STEP, setting(p.STATUS, "evil", 1), "unexpected key 'evil'"),
    ("extra-array-record", STEP, add("evil", ArrayRecord({"a": Array(torch.zeros(1))})), "unexpected ArrayRecord 'evil'"),
    ("extra-metric-record", STEP, add("evil", MetricRecord({"a": 1})), "unexpected MetricRecord 'evil'"),
    ("extra-config-record", STEP, add("evil", ConfigRecord({"a": 1})), "unexpected ConfigRecord 'evil'"),
    ("client-part-in-step", STEP, add(p.CLIENT_PART, ArrayRecord()), "unexpected ArrayRecord 'client.part'"),
    ("metrics-in-step", STEP, add(p.METRICS, MetricRecord({"num-examples": 4})), "unexpected MetricRecord 'split.metrics'"),
    ("empty-content", STEP, clear, "missing record 'split.status'"),
    ("fallback-extra-key", STEP, add(FALLBACK, ConfigRecord({"reason": "x", "evil": 1})), "must hold only a 'reason'"),
    ("device-extra-key", FIRST, setting(p.DEVICE, "evil", 1.0), "'client.device' has unexpected key 'evil'"),
    ("device-inf", FIRST, setting(p.DEVICE, "cpu-hz", float("inf")), "cpu-hz must be a finite number"),
    ("device-string", FIRST, setting(p.DEVICE, "cpu-hz", "fast"), "cpu-hz must be a finite number"),
    ("device-partition-negative", FIRST, setting(p.DEVICE, "partition-id", -1), "partition-id must be an integer >= 0"),
    ("device-partition-float", FIRST, setting(p.DEVICE, "partition-id", 0.5), "partition-id must be an integer"),
]

FINAL_CASES = [
    ("part-missing-key", FINAL, delete(p.CLIENT_PART, "2.bias"), "missing key '2.bias'"),
    ("part-server-block", FINAL, server_block_in_part, "unexpected key '6.weight'"),
    ("part-whole-model", FINAL, whole_model_as_part, "unexpected key '6.bias'"),
    ("part-extra-key", FINAL, lambda c: put(c, p.CLIENT_PART, "evil", torch.zeros(1)), "unexpected key 'evil'"),
    ("part-shape", FINAL, edit(p.CLIENT_PART, "0.weight", lambda w: w[:8]), "wrong shape"),
    ("part-float32", FINAL, edit(p.CLIENT_PART, "0.weight", lambda w: w.float()), "wrong dtype torch.float32"),
    ("part-int", FINAL, edit(p.CLIENT_PART, "0.bias", lambda w: w.long()), "wrong dtype torch.int64"),
    ("part-nan", FINAL, edit(p.CLIENT_PART, "2.weight", nan_at), "NaN or infinite"),
    ("part-inf", FINAL, edit(p.CLIENT_PART, "0.bias", inf_at), "NaN or infinite"),
    ("part-garbage-bytes", FINAL, part_garbage, "cannot decode"),
    ("part-over-byte-cap", FINAL, huge_part_key, "bytes, more than the"),
    ("part-empty", FINAL, add(p.CLIENT_PART, ArrayRecord()), "missing key '0.bias'"),
    ("part-missing", FINAL, delete(p.CLIENT_PART), "missing record 'client.part'"),
    ("metrics-missing", FINAL, delete(p.METRICS), "missing record 'split.metrics'"),
    ("num-examples-missing", FINAL, add(p.METRICS, MetricRecord({})), "is missing 'num-examples'"),
    ("num-examples-nan", FINAL, metric(float("nan")), "num-examples must be an integer"),
    ("num-examples-float", FINAL, metric(8.0), "num-examples must be an integer"),
    ("num-examples-negative", FINAL, metric(-8), "num-examples must be an integer >= 0"),
    ("num-examples-inflated", FINAL, metric(8000), "num-examples is 8000, but the server trained on 8"),
    ("num-examples-zero", FINAL, metric(0), "num-examples is 0, but the server trained on 8"),
    ("metrics-extra-key", FINAL, lambda c: c.metric_records[p.METRICS].__setitem__("loss", 0.1), "unexpected key 'loss'"),
    ("final-status-missing", FINAL, delete(p.STATUS), "missing record 'split.status'"),
    ("final-done-string", FINAL, setting(p.STATUS, "done", "yes"), "done must be true or false"),
    ("final-position-string", FINAL, setting(p.STATUS, "position", "end"), "position must be an integer"),
    ("final-remaining", FINAL, setting(p.STATUS, "remaining", 0), "unexpected key 'remaining'"),
    ("final-with-smashed", FINAL, smashed_on_final, "unexpected ArrayRecord 'split.smashed'"),
    ("final-extra-config", FINAL, add("evil", ConfigRecord()), "unexpected ConfigRecord 'evil'"),
    ("final-device-nan", FINAL, add(p.DEVICE, ConfigRecord({"partition-id": 0, "cpu-hz": float("nan")})),
     "cpu-hz must be a finite number"),
    ("final-empty", FINAL, clear, "missing record 'split.status'"),
]

# int8 on the uplink: a scale travels with every batch
SCALED_CASES = [
    ("scale-missing", STEP, delete(p.SMASHED, "x.0.scale"), "missing key 'x.0.scale'"),
    ("scale-nan", STEP, edit(p.SMASHED, "x.0.scale", lambda s: torch.tensor(float("nan"))), "one positive finite number"),
    ("scale-negative", STEP, edit(p.SMASHED, "x.0.scale", lambda s: -s), "one positive finite number"),
    ("scale-zero", STEP, edit(p.SMASHED, "x.0.scale", lambda s: s * 0), "one positive finite number"),
    ("scale-vector", STEP, edit(p.SMASHED, "x.0.scale", lambda s: s.repeat(2)), "one positive finite number"),
    ("scale-int", STEP, edit(p.SMASHED, "x.0.scale", lambda s: torch.tensor(1)), "expected float32 or float64"),
    ("payload-not-int8", STEP, edit(p.SMASHED, "x.0", lambda x: x.to(torch.uint8)), "dtype"),
    ("scale-beyond-float64", STEP, edit(p.SMASHED, "x.0.scale", lambda s: torch.tensor(1e307, dtype=torch.float64)),
     "beyond torch.float64's range"),
]


# ---------------------------------------------------------------- clients that misbehave
class SpoilingClient(SplitClient):
    """An honest client, except that its ``nth`` train reply of the first round is spoilt
    (or, with ``spoil`` None, the ClientApp fails there: the reference)."""

    def __init__(self, *args, nth: int = 0, spoil: Optional[Spoiler] = None, eval_spoil: Optional[Spoiler] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nth, self.spoil, self.eval_spoil = nth, spoil, eval_spoil
        self.calls, self.lock = 0, threading.Lock()

    def advance(self, *args, **kwargs) -> RecordDict:
        reply = super().advance(*args, **kwargs)
        with self.lock:
            self.calls += 1
            if self.calls != self.nth:
                return reply
        if self.spoil is None:
            raise Fails("the reference node fails here")
        self.spoil(reply)
        return reply

    def evaluate_content(self, content: RecordDict, context: Context) -> RecordDict:
        reply = super().evaluate_content(content, context)  # under both planes' evaluation
        if self.eval_spoil is not None:
            self.eval_spoil(reply)
        return reply


def run(scheme=PSL, nth: int = 0, spoil: Optional[Spoiler] = None, stream: bool = False, eval_spoil=None,
        **settings):
    """One round of ``scheme`` with partition 0 misbehaving; returns (strategy, final model)."""
    clients = [SpoilingClient(model_fn, PARTS[0], PARTS[0], salt=0, nth=nth, spoil=spoil, eval_spoil=eval_spoil),
               SplitClient(model_fn, PARTS[1], PARTS[1], salt=1)]
    grid = InProcessGrid(client_app_of(clients), len(clients), threaded=stream)
    kwargs = {**SETTINGS, **settings}
    if stream:
        kwargs["data_plane_factory"] = lambda g, timeout: StreamDataPlane(g, 20.0, mode="stream")
    strategy = scheme(model_fn=model_fn, **kwargs)
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    finally:
        grid.shutdown()
    return strategy, result


@functools.lru_cache(maxsize=None)
def reference(scheme=PSL, nth: int = 0, stream: bool = False, items: tuple = ()):
    """The model (and history) of the run in which node 1000 failed at its ``nth`` reply."""
    strategy, result = run(scheme, nth, None, stream, **dict(items))
    return result.arrays.to_torch_state_dict(), strategy.history.rounds[0]


def assert_sat_out(scheme, nth: int, spoil: Spoiler, phrase: str, stream: bool = False, **settings) -> None:
    strategy, result = run(scheme, nth, spoil, stream, **settings)  # must not raise
    errors = strategy.history.rounds[0]["errors"]
    assert len(errors) == 1, errors
    assert errors[0]["node"] == BAD_NODE and "sits out the rest of the round" in errors[0]["error"], errors
    assert phrase in errors[0]["error"], errors[0]["error"]
    model = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(t).all() for t in model.values())
    expected, ref_round = reference(scheme, nth, stream, tuple(sorted(settings.items())))
    assert model.keys() == expected.keys()
    assert all(torch.equal(model[k], expected[k]) for k in model), "the model is not that of a round without the node"
    got = strategy.history.rounds[0]
    assert got["examples_per_node"] == ref_round["examples_per_node"] and str(BAD_NODE) not in got["examples_per_node"]
    assert got["server_steps"] == ref_round["server_steps"]


@pytest.mark.parametrize("case, nth, spoil, phrase", STEP_CASES + FINAL_CASES, ids=[c[0] for c in STEP_CASES + FINAL_CASES])
def test_malformed_reply_costs_only_its_node(case, nth, spoil, phrase):
    assert_sat_out(PSL, nth, spoil, phrase)


@pytest.mark.parametrize("case, nth, spoil, phrase", SCALED_CASES, ids=[c[0] for c in SCALED_CASES])
def test_malformed_scaled_reply_costs_only_its_node(case, nth, spoil, phrase):
    assert_sat_out(PSL, nth, spoil, phrase, codec_up="int8")


SCHEME_CASES = {c[0]: c[1:] for c in STEP_CASES + FINAL_CASES}
ACROSS = ["x-nan", "rows-over-batch-size", "part-server-block", "part-nan", "num-examples-inflated"]


@pytest.mark.parametrize("scheme", [SL, SFLV1, SFLV2, EPSL, SFLGA], ids=lambda s: s.__name__)
@pytest.mark.parametrize("case", ACROSS)
def test_every_scheme_lets_a_malformed_node_sit_out(scheme, case):
    assert_sat_out(scheme, *SCHEME_CASES[case])


@pytest.mark.parametrize("case", ["x-nan", "more-batches-than-K", "status-done-string", "part-server-block",
                                  "num-examples-inflated", "final-with-smashed"])
def test_the_gate_holds_on_the_stream_plane(case):
    assert_sat_out(PSL, *SCHEME_CASES[case], stream=True)


def test_a_node_refused_at_its_first_reply_leaves_the_model_of_a_round_without_it():
    """Refused before the server trained on anything of it: the round is the one where the
    node was never sampled (computed by a run with the honest partition alone)."""
    _, result = run(PSL, FIRST, edit(p.SMASHED, "x.0", nan_at))
    strategy_alone = PSL(model_fn=model_fn, **SETTINGS)
    clients = [SplitClient(model_fn, PARTS[1], PARTS[1], salt=1)]
    alone = strategy_alone.start(grid=InProcessGrid(client_app_of(clients), 1), num_rounds=1,
                                 initial_arrays=ArrayRecord(model_fn().blocks.state_dict()))
    a, b = result.arrays.to_torch_state_dict(), alone.arrays.to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- evaluation replies
EVAL_CASES = [
    ("eval-x-nan", edit(p.SMASHED, "x.0", nan_at), "NaN or infinite"),
    ("eval-x-shape", edit(p.SMASHED, "x.0", lambda x: x[:, :1]), "wrong shape"),
    ("eval-labels", edit(p.SMASHED, "y.0", lambda y: y + 10), "labels outside"),
    ("eval-rows-over-batch", doubled_rows, "more than batch-size 4"),
    ("eval-metrics-missing", delete(p.METRICS), "missing record 'split.metrics'"),
    ("eval-num-examples-wrong", metric(80), "num-examples is 80, but the batches hold 8"),
    ("eval-extra-record", add("evil", ConfigRecord()), "unexpected ConfigRecord 'evil'"),
    ("eval-garbage", smashed_garbage, "cannot decode"),
    ("eval-y-missing", delete(p.SMASHED, "y.1"), "missing key 'y.1'"),
]


@pytest.mark.parametrize("case, spoil, phrase", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_malformed_evaluation_reply_is_left_out_of_the_metrics(case, spoil, phrase):
    strategy, result = run(PSL, eval_spoil=spoil, fraction_evaluate=1.0)
    (error,) = strategy.history.rounds[0]["errors"]
    assert error["node"] == BAD_NODE and phrase in error["error"], error
    # the federated metrics are those of the honest node alone: its 8 samples, exactly as
    # when the misbehaving node's evaluation failed
    assert result.evaluate_metrics_clientapp[1]["num-examples"] == 8
    _, failed = run(PSL, eval_spoil=fail, fraction_evaluate=1.0)
    assert dict(result.evaluate_metrics_clientapp[1]) == dict(failed.evaluate_metrics_clientapp[1])


def fail(content: RecordDict) -> None:
    raise Fails("the reference node's evaluation fails")


# ---------------------------------------------------------------- uploads (async SL, state B)
def gate_and_upload():
    strategy = PSL(model_fn=model_fn, **SETTINGS)
    shape = strategy._shapes[2]  # smashed shape at cut 3
    batches = [p.SmashedBatch(torch.rand(4, *shape, dtype=torch.float64), torch.randint(0, 10, (4,))) for _ in range(2)]
    content = RecordDict({p.SMASHED: p.encode_batches(batches, strategy.codec_up),
                          p.METRICS: MetricRecord({"num-examples": 8})})
    return strategy.gate, content


UPLOAD_CASES = [
    ("upload-more-than-max-steps", lambda c: None, 1, "2 batches, more than the 1"),
    ("upload-num-examples-wrong", metric(9), None, "num-examples is 9, but the batches hold 8"),
    ("upload-metrics-missing", delete(p.METRICS), None, "missing record 'split.metrics'"),
    ("upload-extra-record", add(p.CLIENT_PART, ArrayRecord()), None, "unexpected ArrayRecord 'client.part'"),
    ("upload-x-nan", edit(p.SMASHED, "x.1", nan_at), None, "NaN or infinite"),
    ("upload-rows-over-batch", edit(p.SMASHED, "x.0", lambda x: torch.cat([x, x])), None, "more than batch-size 4"),
]


@pytest.mark.parametrize("case, spoil, max_batches, phrase", UPLOAD_CASES, ids=[c[0] for c in UPLOAD_CASES])
def test_malformed_upload_is_refused(case, spoil, max_batches, phrase):
    gate, content = gate_and_upload()
    assert len(gate.upload(content, 3, None)) == 2  # the honest upload passes
    spoil(content)
    with pytest.raises(p.ProtocolError, match=_escaped(phrase)):
        gate.upload(content, 3, max_batches)


def _escaped(phrase: str) -> str:
    return re.escape(phrase)


# ---------------------------------------------------------------- requests (server -> client)
def _client_context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _message(content: RecordDict, message_type: str = p.TRAIN_STEP) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    message = Message(content, 5, message_type)
    message.metadata.__dict__["_message_id"] = "m"
    return message


def _config(**changes) -> ConfigRecord:
    record = p.SplitConfig(server_round=1, cut=3, batch_size=4, shuffle=False).to_record()
    for key, value in changes.items():
        record[key] = value
    return record


def _part(cut: int = 3) -> ArrayRecord:
    return ArrayRecord(model_fn().client_part(cut).state_dict())


def _snapshot(state: RecordDict) -> dict:
    out = {}
    for name, record in state.array_records.items():
        out[name] = {k: bytes(a.data) for k, a in record.items()}
    for name, record in state.config_records.items():
        out[name] = dict(record)
    return out


def started_client():
    """A client mid-round: it has sent its first batch and waits for the gradient."""
    client = SplitClient(model_fn, random_data(8, seed=3))
    ctx = _client_context()
    reply = client.train_step(_message(RecordDict({p.CONFIG: _config(), p.CLIENT_PART: _part()})), ctx)
    smashed = torch.from_numpy(reply.content.array_records[p.SMASHED]["x.0"].numpy().copy())
    return client, ctx, smashed


def grads(*tensors) -> ArrayRecord:
    return ArrayRecord({f"g.{i}": Array(t) for i, t in enumerate(tensors)})


def part_with(key: str, fn) -> ArrayRecord:
    record = _part()
    record[key] = fn(record[key])
    return record


def _t(array: Array) -> torch.Tensor:
    return torch.from_numpy(array.numpy().copy())


# (case id, request content given the pending batch's smashed data, phrase)
REQUEST_CASES = [
    ("req-config-missing", lambda s: RecordDict({p.GRAD: grads(s)}), "missing record 'split.config'"),
    ("req-unexpected-array-record", lambda s: RecordDict({p.CONFIG: _config(), "evil": ArrayRecord()}),
     "unexpected ArrayRecord 'evil'"),
    ("req-unexpected-metric-record", lambda s: RecordDict({p.CONFIG: _config(), "evil": MetricRecord()}),
     "unexpected MetricRecord 'evil'"),
    ("req-unexpected-config-record", lambda s: RecordDict({p.CONFIG: _config(), "evil": ConfigRecord()}),
     "unexpected ConfigRecord 'evil'"),
    ("req-cut-zero", lambda s: RecordDict({p.CONFIG: _config(cut=0), p.GRAD: grads(s)}), "cut"),
    ("req-cut-string", lambda s: RecordDict({p.CONFIG: _config(cut="3"), p.GRAD: grads(s)}), "cut"),
    ("req-batch-size-negative", lambda s: RecordDict({p.CONFIG: _config(batch_size=-4), p.GRAD: grads(s)}), "batch-size"),
    ("req-seed-negative", lambda s: RecordDict({p.CONFIG: _config(seed=-1), p.GRAD: grads(s)}), "seed"),
    ("req-learning-rate-nan", lambda s: RecordDict({p.CONFIG: _config(learning_rate=float("nan")), p.GRAD: grads(s)}),
     "learning-rate"),
    ("req-codec-unknown", lambda s: RecordDict({p.CONFIG: _config(codec_down="zip"), p.GRAD: grads(s)}), "zip"),
    ("req-grad-count", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(s, s)}), "2 gradients for 1 pending"),
    ("req-grad-shape", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(s[:, :1])}), "wrong shape"),
    ("req-grad-dtype", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(s.float())}), "wrong dtype"),
    ("req-grad-nan", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(nan_at(s))}), "NaN or infinite"),
    ("req-grad-inf", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(inf_at(s))}), "NaN or infinite"),
    ("req-grad-garbage", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: ArrayRecord({"g.0": garbage_like(Array(s))})}),
     "cannot decode"),
    ("req-bcast-without-config", lambda s: RecordDict({p.CONFIG: _config(), p.GRAD: grads(s[1:]),
                                                   p.BCAST: ArrayRecord({"b.0": Array(s[:1])})}),
     "without 'split.bcast.config'"),
    ("req-bcast-position-out-of-range", lambda s: RecordDict({
        p.CONFIG: _config(), p.GRAD: grads(s[1:]), p.BCAST: ArrayRecord({"b.0": Array(s[:1])}),
        p.BCAST_CONFIG: ConfigRecord({"positions.0": [9], "scale.0": 1.0})}), "do not fit"),
    ("req-bcast-duplicate-positions", lambda s: RecordDict({
        p.CONFIG: _config(), p.GRAD: grads(s[2:]), p.BCAST: ArrayRecord({"b.0": Array(s[:2])}),
        p.BCAST_CONFIG: ConfigRecord({"positions.0": [0, 0], "scale.0": 1.0})}), "do not fit"),
    ("req-bcast-scale-nan", lambda s: RecordDict({
        p.CONFIG: _config(), p.GRAD: grads(s[1:]), p.BCAST: ArrayRecord({"b.0": Array(s[:1])}),
        p.BCAST_CONFIG: ConfigRecord({"positions.0": [0], "scale.0": float("nan")})}), "NaN or infinite"),
    ("req-bcast-positions-missing", lambda s: RecordDict({
        p.CONFIG: _config(), p.GRAD: grads(s[1:]), p.BCAST: ArrayRecord({"b.0": Array(s[:1])}),
        p.BCAST_CONFIG: ConfigRecord({"scale.0": 1.0})}), "missing positions.0"),
    ("req-part-missing-key", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: ArrayRecord(
        {k: v for k, v in _part().items() if k != "2.bias"})}), "missing key '2.bias'"),
    ("req-part-extra-key", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: _part(7)}), "unexpected key '6.bias'"),
    ("req-part-shape", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: part_with(
        "0.weight", lambda a: Array(_t(a)[:2]))}), "wrong shape"),
    ("req-part-dtype", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: part_with(
        "0.weight", lambda a: Array(_t(a).float()))}), "wrong dtype torch.float32"),
    ("req-part-nan", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: part_with(
        "2.bias", lambda a: Array(nan_at(_t(a))))}), "NaN or infinite"),
    ("req-part-garbage", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: part_with("0.bias", garbage_like)}),
     "cannot decode"),
    ("req-offer-malformed", lambda s: RecordDict({p.CONFIG: _config(), p.CLIENT_PART: _part(),
                                              OFFER: ConfigRecord({"address": 5})}), "malformed session offer"),
]


@pytest.mark.parametrize("case, build, phrase", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_malformed_request_is_refused_and_the_client_state_is_unchanged(case, build, phrase):
    client, ctx, smashed = started_client()
    before = _snapshot(ctx.state)
    with pytest.raises(p.ProtocolError, match=_escaped(phrase)):
        client.train_step(_message(build(smashed)), ctx)
    assert _snapshot(ctx.state) == before
    # the node is not hurt: the right request still continues its round
    client.train_step(_message(RecordDict({p.CONFIG: _config(), p.GRAD: grads(smashed)})), ctx)


EVAL_REQUEST_CASES = [
    ("eval-part-nan", RecordDict({p.CONFIG: _config(), p.CLIENT_PART: part_with("0.bias", lambda a: Array(nan_at(_t(a))))}),
     "NaN or infinite"),
    ("eval-grad-record", RecordDict({p.CONFIG: _config(), p.GRAD: ArrayRecord()}), "unexpected ArrayRecord 'split.grad'"),
    ("eval-config-missing", RecordDict({p.CLIENT_PART: _part()}), "missing record 'split.config'"),
]


@pytest.mark.parametrize("case, content, phrase", EVAL_REQUEST_CASES, ids=[c[0] for c in EVAL_REQUEST_CASES])
def test_malformed_evaluation_request_is_refused(case, content, phrase):
    client, ctx, _ = started_client()
    before = _snapshot(ctx.state)
    with pytest.raises(p.ProtocolError, match=_escaped(phrase)):
        client.evaluate(_message(content, p.EVALUATE), ctx)
    assert _snapshot(ctx.state) == before


def test_the_corpus_has_at_least_100_cases():
    cases = (STEP_CASES + FINAL_CASES + SCALED_CASES + EVAL_CASES + UPLOAD_CASES + REQUEST_CASES
             + EVAL_REQUEST_CASES)
    assert len({c[0] for c in cases}) == len(cases) >= 100


def test_rows_beyond_batch_size_under_a_lying_header_are_refused_after_decoding():
    """Small samples (cut 8: 64 values) let 4 extra rows fit in the byte cap's slack; the
    array header says 4 rows, the payload holds 8: the decoded batch is what counts."""
    gate = PSL(model_fn=model_fn, **SETTINGS).gate
    x, y = torch.rand(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    real = Array(x)
    record = ArrayRecord({"x.0": Array(dtype=real.dtype, shape=(4, 64), stype=real.stype, data=real.data),
                          "y.0": Array(y)})
    content = RecordDict({p.SMASHED: record, p.STATUS: ConfigRecord({"done": False, "position": 0, "remaining": 2})})
    with pytest.raises(p.ProtocolError, match="batch 0 has 8 rows, more than batch-size 4"):
        gate.step(content, 8)
