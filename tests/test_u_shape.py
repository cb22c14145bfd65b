"""U-shaped splits (``tail_cut``): the client keeps the last blocks, the labels and the loss.

Exactness: a U-shaped round trains what the unsplit model trains on the same batches (float64,
to 1e-10; an independent plain-torch reference), and what the same scheme trains with the loss
on the server, for SL, PSL, SFL-V1 and SFL-V2, on the zoo's CNN and its language model, with
SGD and AdamW, on the message plane and the stream plane. Privacy: every request and reply
(and every stream frame) of a U-shaped run is searched for the labels and the token ids of
every batch, and none is found; the same search finds them in a run that is not U-shaped.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp
import pytest
import torch

from flsplit.data.datasets import TensorData
from flsplit.planes.inprocess import InProcessGrid
from flsplit.planes.stream import StreamDataPlane
from flsplit.runtime.client import SplitClient
from flsplit.strategies import EPSL, PSL, SFLGA, SFLV1, SFLV2, SL, AsyncSL
from flsplit.wire import protocol as p
from tests.helpers import centralized_sgd, client_app_of, max_abs_diff, model_fn, random_data
from tests.test_text_models import LR, T, VOCAB, lm_fn, token_data, unsplit_sgd

CNN = dict(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10)  # 9 blocks
LM = dict(model_fn=lm_fn, input_shape=(T,), num_classes=VOCAB)  # 4 blocks


class Recorder:
    """Every request a node receives and every reply it sends, as Flower messages."""

    def __init__(self) -> None:
        self.contents: list[RecordDict] = []

    def app(self, clients: list[SplitClient]) -> ClientApp:
        inner = client_app_of(clients)
        app = ClientApp()

        @app.train("split_step")
        def _train(msg: Message, ctx):
            self.contents.append(msg.content)
            reply = inner(msg, ctx)
            self.contents.append(reply.content)
            return reply

        return app


def run(cls, parts: list[TensorData], model: dict, recorder: Recorder | None = None, stream: bool = False,
        num_rounds: int = 1, **settings):
    clients = [SplitClient(model["model_fn"], d, d, salt=i) for i, d in enumerate(parts)]
    app = recorder.app(clients) if recorder else client_app_of(clients)
    grid = InProcessGrid(app, len(parts), threaded=stream)
    if stream:
        settings["data_plane_factory"] = lambda g, timeout: StreamDataPlane(g, 60.0, mode="stream")
    strategy = cls(**model, learning_rate=LR, shuffle=False, **settings)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model["model_fn"]().blocks.state_dict()),
                            num_rounds=num_rounds)
    grid.shutdown()
    assert all(not r["errors"] for r in strategy.history.rounds), strategy.history.rounds[-1]["errors"]
    return strategy, result.arrays.to_torch_state_dict()


# ------------------------------------------------------------------ exactness against plain torch
@pytest.mark.parametrize("cut,tail", [(1, 2), (1, 3), (2, 3)])
def test_u_shaped_sl_equals_unsplit_sgd(cut, tail):
    data, b, steps = token_data(12, seed=1), 4, 3
    _, got = run(SL, [data], LM, cut_layer=cut, tail_cut=tail, batch_size=b, max_steps=steps)
    reference = unsplit_sgd([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)])
    assert max_abs_diff(got, reference) <= 1e-10


@pytest.mark.parametrize("cls", [PSL, SFLV1])
def test_u_shaped_parallel_step_equals_unsplit_sgd_on_the_union(cls):
    """One step each: PSL's union step, and SFL-V1's average of per-client steps, are the
    unsplit model's step on the concatenated batch (mean loss over all samples)."""
    parts = [token_data(5, seed=2), token_data(3, seed=3), token_data(4, seed=4)]
    _, got = run(cls, parts, LM, cut_layer=1, tail_cut=3, batch_size=8, max_steps=1)
    union = TensorData(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]))
    assert max_abs_diff(got, unsplit_sgd([union])) <= 1e-10


def test_u_shaped_cnn_sl_equals_centralized_sgd():
    data, b, steps = random_data(24, seed=5), 8, 3
    _, got = run(SL, [data], CNN, cut_layer=2, tail_cut=7, batch_size=b, max_steps=steps)
    reference = centralized_sgd([data.subset(slice(i * b, (i + 1) * b)) for i in range(steps)], LR)
    assert max_abs_diff(got, reference) <= 1e-10


# ------------------------------------------------------------------ against the same scheme with the loss on the server
# Where the tail is trained by one party either way, a U-shaped round trains exactly what the
# same scheme trains with the tail on the server: SL (one client), SFL-V1 (a server copy per
# client then; a client's own tail now), SFL-V2 with one client; with any optimizer and its
# state. With several clients PSL's and SFL-V2's shared server tail becomes one tail per client,
# averaged at the round's end: the same as one PSL (or SFL-GA) step with plain SGD (below, one
# step), not over several steps (the tail is then federated, like the head).
@pytest.mark.parametrize("cls,clients,steps,settings", [
    (SL, 1, 3, dict(momentum=0.9, carry_momentum=True)),
    (SL, 1, 3, dict(optimizer="adamw", carry_momentum=True)),
    (SFLV1, 2, 3, dict(momentum=0.9)),
    (SFLV1, 2, 3, dict(optimizer="adamw")),
    (SFLV2, 1, 3, dict(optimizer="adamw", carry_momentum=True)),
    (PSL, 2, 1, dict()),
    (SFLGA, 2, 1, dict()),  # its broadcast: the average of the cut-layer gradients, U-shaped after the tails
])
def test_u_shaped_rounds_train_what_the_loss_on_the_server_trains(cls, clients, steps, settings):
    parts = [random_data(20, seed=6), random_data(12, seed=7)][:clients]
    settings = dict(cut_layer=2, batch_size=4, max_steps=steps, num_rounds=2, **settings)
    _, plain = run(cls, parts, CNN, **settings)
    _, u_shaped = run(cls, parts, CNN, tail_cut=6, **settings)
    assert max_abs_diff(u_shaped, plain) <= 1e-10


def test_u_shaped_round_is_the_same_on_the_stream_plane():
    parts = [token_data(9, seed=8), token_data(7, seed=9)]
    settings = dict(cut_layer=1, tail_cut=3, batch_size=4, num_rounds=2)
    (s_msg, w_msg), (s_str, w_str) = run(PSL, parts, LM, **settings), run(PSL, parts, LM, stream=True, **settings)
    assert all(torch.equal(w_msg[k], w_str[k]) for k in w_msg)
    for r_msg, r_str in zip(s_msg.history.rounds, s_str.history.rounds):
        assert set(r_str["data_plane"].values()) == {"stream"}
        assert (r_msg["bytes_up"], r_msg["bytes_down"], r_msg["train_loss"]) == \
            (r_str["bytes_up"], r_str["bytes_down"], r_str["train_loss"])


# ------------------------------------------------------------------ no label or token crosses
def _secrets(parts: list[TensorData], b: int) -> list[bytes]:
    """The bytes of every batch's labels and of every input row (token ids) as int64 arrays."""
    out = []
    for d in parts:
        for i in range(0, len(d), b):
            out.append(d.y[i : i + b].contiguous().numpy().tobytes())
        out += [row.contiguous().numpy().tobytes() for row in d.x]
    return out


def _leaks(contents: list[RecordDict], secrets: list[bytes]) -> list[str]:
    found = []
    for content in contents:
        for name, record in content.array_records.items():
            for key, array in record.items():
                if key.startswith("y.") or array.dtype.startswith("int"):
                    found.append(f"{name}/{key} ({array.dtype})")
                elif any(s in array.data for s in secrets):
                    found.append(f"{name}/{key} holds a label or token row")
    return found


def test_no_label_or_token_id_crosses_in_a_u_shaped_round():
    parts, b = [token_data(8, seed=10), token_data(8, seed=11)], 4
    secrets = _secrets(parts, b)
    recorder = Recorder()
    strategy, _ = run(PSL, parts, LM, recorder, cut_layer=1, tail_cut=3, batch_size=b, num_rounds=2)
    assert len(recorder.contents) > 20 and strategy.history.rounds[-1]["train_loss"] > 0
    assert _leaks(recorder.contents, secrets) == []
    # the search finds them when the loss is on the server: the labels travel with the smashed data
    recorder = Recorder()
    run(PSL, parts, LM, recorder, cut_layer=1, batch_size=b)
    assert any("split.smashed/y." in leak for leak in _leaks(recorder.contents, secrets))


def test_no_label_or_token_id_is_in_any_stream_frame(monkeypatch):
    from flsplit.planes.stream import frames

    payloads: list[bytes] = []
    send = frames.send_frame

    def recording_send(sock, kind, payload=b""):
        payloads.append(bytes(payload))
        return send(sock, kind, payload)

    for module in _frame_senders():
        monkeypatch.setattr(module, "send_frame", recording_send)
    parts, b = [token_data(8, seed=12), token_data(8, seed=13)], 4
    run(PSL, parts, LM, stream=True, cut_layer=1, tail_cut=3, batch_size=b)
    assert len(payloads) > 10
    secrets = _secrets(parts, b)
    assert not any(s in payload for payload in payloads for s in secrets)
    frame_contents = [frames.decode_content(x) for x in payloads if x[:1] not in (b"{", b"")]
    assert _leaks([c for c in frame_contents if c is not None], secrets) == []


def _frame_senders():
    import importlib
    import pkgutil

    from flsplit.planes import stream

    out = []
    for info in pkgutil.iter_modules(stream.__path__):
        module = importlib.import_module(f"{stream.__name__}.{info.name}")
        if getattr(module, "send_frame", None) is not None:
            out.append(module)
    return out


# ------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("cls,reason", [(EPSL, "last layer"), (AsyncSL, "labels")])
def test_schemes_without_a_u_shaped_reading_refuse_it_with_the_reason(cls, reason):
    with pytest.raises(ValueError, match=f"cannot run a U-shaped split.*{reason}"):
        cls(**CNN, cut_layer=2, tail_cut=5)


@pytest.mark.parametrize("settings,message", [
    (dict(cut_layer=5, tail_cut=5), "must lie before tail_cut 5"),
    (dict(cut_layer=2, tail_cut=9), "tail_cut 9 is outside the model"),
    (dict(cut_layer=2, tail_cut=5, steps_per_exchange=2), "one step per exchange"),
    (dict(cut_layer=2, tail_cut=5, fraction_evaluate=0.5), "federated evaluation of a U-shaped split"),
])
def test_impossible_u_shapes_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PSL(**CNN, **settings)


# ------------------------------------------------------------------ the cost model
def test_a_u_shaped_round_is_priced_with_the_tail_on_the_client():
    """Two exchanges per step in the bytes (measured), the tail's FLOPs on the client and only
    the middle's on the server (from the profile's per-block FLOPs, summed here)."""
    from flsplit.model.profile import profile_model
    from flsplit.sim.scenario_files import load_scenario

    parts, cut, tail, rows = [random_data(16, seed=1), random_data(16, seed=2)], 2, 6, 16
    runs = {t: run(PSL, parts, CNN, cut_layer=cut, tail_cut=t, batch_size=8, max_steps=2, scenario=load_scenario("homogeneous"))[0]
            for t in (0, tail)}
    blocks = profile_model(model_fn(), (1, 8, 8)).blocks
    flops = lambda idx: sum(blocks[i].forward_flops + blocks[i].backward_flops for i in idx)  # noqa: E731
    plain, u_shaped = (runs[t].history.rounds[-1] for t in (0, tail))
    assert u_shaped["sim"]["server_flops"] == pytest.approx(2 * rows * flops(range(cut, tail)))
    for client in u_shaped["sim"]["clients"].values():
        assert client["flops"] == pytest.approx(rows * flops([*range(cut), *range(tail, len(blocks))]))
    assert plain["sim"]["server_flops"] == pytest.approx(2 * rows * flops(range(cut, len(blocks))))
    # each step's traffic both ways: the middle's output down and its gradient up on top of the cut's
    assert u_shaped["bytes_up"] > plain["bytes_up"] and u_shaped["bytes_down"] > plain["bytes_down"]


def test_planners_refuse_a_u_shaped_split():
    from flsplit.planners.online import make_online_planner
    from flsplit.sim.scenario_files import load_scenario
    from flsplit.strategies.adaptive import Adaptive

    psl = PSL(**CNN, cut_layer=2, tail_cut=6, scenario=load_scenario("homogeneous"))
    with pytest.raises(ValueError, match="U-shaped split .*tail-cut 6.* is not planned"):
        Adaptive(psl, make_online_planner("edgesplit", psl.profile, psl.scenario))


def test_a_u_shaped_run_resumes_from_its_checkpoint(tmp_path):
    """Two rounds, then a resumed third, train what three rounds in one go train; a checkpoint
    of a U-shaped run is refused by a run that is not U-shaped."""
    parts = [random_data(16, seed=14), random_data(16, seed=15)]
    settings = dict(cut_layer=2, tail_cut=6, batch_size=4, max_steps=2, optimizer="adamw", carry_momentum=True)
    _, straight = run(PSL, parts, CNN, num_rounds=3, **settings)

    clients = [SplitClient(model_fn, d, d, salt=i) for i, d in enumerate(parts)]
    grid = InProcessGrid(client_app_of(clients), 2)  # the devices keep their cursors and optimizer state

    def start(num_rounds: int, resume: bool, **extra):
        strategy = PSL(**CNN, learning_rate=LR, shuffle=False, checkpoint_dir=tmp_path, **{**settings, **extra})
        return strategy.start(grid=grid, num_rounds=num_rounds,
                               initial_arrays=ArrayRecord(model_fn().blocks.state_dict()),
                               resume_from=tmp_path if resume else None)

    start(2, resume=False)
    resumed = start(3, resume=True).arrays.to_torch_state_dict()
    assert max_abs_diff(resumed, straight) == 0.0
    with pytest.raises(Exception, match="tail_cut"):
        start(4, resume=True, tail_cut=0)


# ------------------------------------------------------------------ bad tail replies
def _tampered(change):
    """An intercept that changes node 1001's first tail reply with ``change(content)``."""
    done = []

    def intercept(node_id: int, reply: Message) -> Message:
        content = reply.content
        if node_id == 1001 and not done and p.TAIL_GRAD in content.array_records:
            done.append(True)
            change(content)
        return reply

    return intercept


def _nan_gradient(content: RecordDict) -> None:
    g = content.array_records[p.TAIL_GRAD]["t.0"].numpy().copy()
    g.flat[0] = float("nan")
    from flwr.app import Array

    content.array_records[p.TAIL_GRAD]["t.0"] = Array(g)


@pytest.mark.parametrize("change,reason", [
    (_nan_gradient, "t.0: contains NaN"),
    (lambda c: c.metric_records[p.LOSS].__setitem__("correct.0", 99.0), r"correct.0 must be a finite number in \[0, 4\]"),
    (lambda c: c.metric_records[p.LOSS].__setitem__("loss-sum.0", -1.0), "loss-sum.0 must be a finite number"),
    (lambda c: c.metric_records[p.LOSS].__setitem__("loss-sum.0", float("inf")), "loss-sum.0 must be a finite number"),
    (lambda c: c.array_records[p.TAIL_GRAD].__setitem__("t.1", c.array_records[p.TAIL_GRAD]["t.0"]), "'t.1' is unexpected"),
    (lambda c: c.array_records.__setitem__(p.SMASHED, c.array_records[p.TAIL_GRAD]), "unexpected ArrayRecord"),
])
def test_a_bad_tail_reply_makes_its_node_sit_out_and_corrupts_nothing(change, reason):
    """The node sits out the rest of the round, its half-done step is dropped (the server part
    is stepped on the other node's batch alone), and the round's model is the one the other
    node trains alone from that step on."""
    parts = [random_data(12, seed=16), random_data(12, seed=17)]
    clients = [SplitClient(model_fn, d, d, salt=i) for i, d in enumerate(parts)]
    grid = InProcessGrid(client_app_of(clients), 2, intercept=_tampered(change))
    strategy = PSL(**CNN, learning_rate=LR, shuffle=False, cut_layer=2, tail_cut=6, batch_size=4, max_steps=3)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    (error,) = strategy.history.rounds[-1]["errors"]
    assert error["node"] == 1001 and "sits out" in error["error"]
    assert pytest.importorskip("re").search(reason, error["error"]), error["error"]
    got = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    # the other node's three steps alone, in float64: the unsplit reference of its batches
    reference = centralized_sgd([parts[0].subset(slice(i * 4, (i + 1) * 4)) for i in range(3)], LR)
    assert max_abs_diff(got, reference) <= 1e-10


def test_u_shaped_sflga_broadcasts_one_average_and_trains():
    parts = [random_data(16, seed=18), random_data(12, seed=19), random_data(8, seed=20)]
    strategy, _ = run(SFLGA, parts, CNN, cut_layer=2, tail_cut=6, batch_size=4, max_steps=3, num_rounds=2)
    for entry in strategy.history.rounds:
        assert entry["broadcast_bytes_down"] > 0 and entry["server_steps"] == 3


def test_a_client_refuses_to_evaluate_a_u_shaped_split():
    """Its evaluation reply would carry the labels the U-shape keeps on the device."""
    from flwr.app import Context
    from flsplit.planes.inprocess import SERVER_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    data = random_data(8, seed=21)
    client = SplitClient(model_fn, data, data, salt=0)
    cfg = p.SplitConfig(server_round=1, cut=2, tail_cut=6).to_record()
    message = Message(RecordDict({p.CONFIG: cfg}), 5, p.EVALUATE)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(p.ProtocolError, match="would carry the labels"):
        client.evaluate(message, context)
