"""Checkpoint and resume: a resumed run is the uninterrupted one, bit for bit; a bad checkpoint is refused.

In process, the resumed strategy runs on the same grid, so the clients' ``context.state`` (their
data cursors) carries over as it does in an uninterrupted run: 4 rounds equal 2 rounds, a
checkpoint, a new strategy object resumed from it, and 2 more rounds. A new ``flwr run`` starts
fresh client contexts, so there the resumed run only has to complete and append to the history.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from apps.client_app import app as client_app
from apps.server_app import app as server_app
from flsplit.runtime.checkpoint import CheckpointError, CheckpointMismatch, _is_reference, load_checkpoint
from flsplit.runtime.checkpoint_seal import DIGESTS, seal
from flsplit.planes.inprocess import InProcessGrid
from flsplit.planners.online import make_online_planner
from flsplit.sim.scenario_files import load_scenario
from flsplit.model.splitting import SplitModel
from flsplit.model.zoo import digits_cnn
from flsplit.strategies import EPSL, PSL, SFLGA, SFLV1, SFLV2, SL, AsyncSL
from flsplit.strategies.adaptive import Adaptive
from tests.helpers import client_app_for, model_fn, random_data

PARTITIONS = [random_data(48, seed) for seed in (1, 2, 3)]
SETTINGS = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, momentum=0.9, batch_size=16, max_steps=2,
                cut_layer=2)


def _psl_with_open(**kwargs):
    """PSL with OPEN in the loop: energy queues and budgets carry across rounds."""
    scenario = load_scenario("edge-diverse")
    psl = PSL(scenario=scenario, **kwargs)
    return Adaptive(psl, make_online_planner("asl", psl.profile, scenario, V=0.01, bytes_per_element=8.0))


_AGENT: dict[str, str] = {}  # the CCC agent's path, once the ccc_agent fixture trained it


def _sflga_with_ccc(**kwargs):
    """SFL-GA with CCC in the loop: the measured loss feeds the next round's plan."""
    scenario = load_scenario("edge-diverse")
    sflga = SFLGA(scenario=scenario, **kwargs)
    return Adaptive(sflga, make_online_planner("ccc", sflga.profile, scenario, agent_path=_AGENT["path"],
                                               bytes_per_element=8.0))


@pytest.fixture(scope="module")
def ccc_agent(tmp_path_factory):
    """A small CCC agent for the 3 clients (how well it plans does not matter here)."""
    from flsplit.planners import CCCEnvironment, PlanningProblem, train_ccc_agent
    from flsplit.model.profile import profile_model

    problem = PlanningProblem.build(profile_model(model_fn(), (1, 8, 8)), load_scenario("edge-diverse"),
                                    samples=[SETTINGS["max_steps"] * SETTINGS["batch_size"]] * 3, client_ids=[0, 1, 2])
    agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=3), episodes=3, seed=0)
    path = tmp_path_factory.mktemp("agent") / "ccc.pt"
    agent.save(path)
    _AGENT["path"] = str(path)


# name -> (build(**kwargs), rounds in all, rounds before the checkpoint)
CASES = {
    "psl": (lambda **kw: PSL(**kw), 4, 2),
    "psl-own-parts": (lambda **kw: PSL(sync_clients=False, **kw), 4, 2),
    "sflv2-carry-momentum": (lambda **kw: SFLV2(carry_momentum=True, **kw), 4, 2),  # server and client momentum
    "sl": (lambda **kw: SL(**kw), 4, 2),
    "sflv1": (lambda **kw: SFLV1(**kw), 4, 2),
    "epsl-random": (lambda **kw: EPSL(phi=0.5, positions="random", **kw), 4, 2),
    "epsl-rotating": (lambda **kw: EPSL(phi=0.5, mechanism="rotating", **kw), 4, 2),  # step counter across rounds
    # a threshold no loss change reaches: A, A, B (upload, cached), C (cache) ...; resumed in C
    "async": (lambda **kw: AsyncSL(loss_threshold=100.0, **kw), 5, 3),
    "psl-open": (_psl_with_open, 4, 2),
    "sflga-ccc": (_sflga_with_ccc, 4, 2),
}


def _build(name, **overrides):
    build = CASES[name][0]
    return build(**{"model_fn": model_fn, **SETTINGS, **overrides})


def _grid():
    return InProcessGrid(client_app_for(PARTITIONS), len(PARTITIONS))


def _start(strategy, grid, num_rounds, **kwargs):
    initial = ArrayRecord(model_fn().blocks.state_dict())
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, **kwargs)


def _records(history):
    """Round records as JSON, less what a clock measured."""
    rounds = json.loads(json.dumps(history.rounds, default=float))
    for entry in rounds:
        entry.pop("wall_seconds")
        if "plan" in entry:
            entry["plan"].pop("planning_s")
    return rounds


def _same(a, b, where="state"):
    """Trees of dicts, lists, tensors and records are equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, ArrayRecord):
        assert isinstance(b, ArrayRecord) and a.keys() == b.keys(), where
        assert all(a[k].data == b[k].data and a[k].dtype == b[k].dtype for k in a), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _inner(strategy):
    return strategy.strategy if isinstance(strategy, Adaptive) else strategy


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, name, one_torch_thread, request):
    if name == "sflga-ccc":
        request.getfixturevalue("ccc_agent")
    _, total, first = CASES[name]
    straight = _build(name)
    straight_result = _start(straight, _grid(), total)

    grid = _grid()  # one grid for both halves: the nodes keep their context.state
    _start(_build(name, checkpoint_dir=tmp_path), grid, first)
    assert load_checkpoint(tmp_path).round == first
    resumed = _build(name, checkpoint_dir=tmp_path)
    result = _start(resumed, grid, total, resume_from=tmp_path)

    final, expected = result.arrays.to_torch_state_dict(), straight_result.arrays.to_torch_state_dict()
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert sorted(result.train_metrics_clientapp) == list(range(first + 1, total + 1))  # the rounds run here
    assert _records(_inner(resumed).history) == _records(_inner(straight).history)
    # everything the strategy carries on (planner queues, async states and cache, ...) is the same too
    _same(_inner(resumed).checkpoint_state(), _inner(straight).checkpoint_state())
    if isinstance(straight, Adaptive):  # and so is what the planner in the loop carries on
        _same(resumed.planner_state(), straight.planner_state(), "planner")
    assert load_checkpoint(tmp_path).round == total
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [f"checkpoint-{total}.pt"]

    if name == "async":  # the checkpoint was taken with a client in C: its cache came back and was used
        states = [e["async"] for e in _inner(straight).history.rounds]
        assert {t["state"] for t in states[first].values()} == {"C"}
    if name == "psl-open":
        assert any(q > 0 for e in _inner(resumed).history.rounds for q in e["plan"]["queues_after"])
    if name == "sflga-ccc":  # the first resumed plan saw the loss measured before the checkpoint
        rounds = _inner(resumed).history.rounds
        assert rounds[first]["plan"]["recent_loss"] == rounds[first - 1]["train_loss"] is not None


def test_resumed_on_fresh_clients_async_b_clients_go_back_to_a(tmp_path):
    """Fresh nodes (as in a new ``flwr run``) have no frozen part to upload with in state B: the
    upload fails once, the client trains in A again, and the run goes on."""
    _start(_build("async", checkpoint_dir=tmp_path), _grid(), 2)
    assert set(load_checkpoint(tmp_path).state["states"].values()) == {"B"}
    resumed = _build("async", checkpoint_dir=tmp_path)
    _start(resumed, _grid(), 4, resume_from=tmp_path)
    third, fourth = resumed.history.rounds[2:]
    assert len(third["errors"]) == len(PARTITIONS) and all("upload failed" in e["error"] for e in third["errors"])
    assert {t["state"] for t in fourth["async"].values()} == {"A"}
    assert not fourth["errors"] and fourth["num_examples"] == len(PARTITIONS) * SETTINGS["max_steps"] * SETTINGS["batch_size"]


# ------------------------------------------------------------------ refused checkpoints
@pytest.fixture
def saved(tmp_path):
    """A PSL run of 2 rounds that left its checkpoint in ``tmp_path / "run"``."""
    run = tmp_path / "run"
    _start(_build("psl", checkpoint_dir=run), _grid(), 2)
    return run


def _refused(strategy, source, error, match):
    """Resuming raises ``error`` before a single message is sent."""
    grid = _grid()
    with pytest.raises(error, match=match):
        _start(strategy, grid, 4, resume_from=source)
    assert grid.messages_by_type == {}


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("sl", {}, r"strategy: checkpoint 'PSL', this run 'SL'"),
        ("psl", {"cut_layer": 3}, r"cut_layer: checkpoint 2, this run 3"),
        ("psl", {"seed": 7}, r"train\.seed: checkpoint 0, this run 7"),
        ("psl", {"learning_rate": 0.05}, r"train\.learning_rate: checkpoint 0\.1, this run 0\.05"),
        ("psl", {"model_fn": lambda: SplitModel(digits_cnn())}, r"model\.dtype: checkpoint 'torch\.float64', this run 'torch\.float32'"),
        ("psl", {"model_fn": lambda: SplitModel(torch.nn.Sequential(*digits_cnn().double(), torch.nn.Linear(10, 10).double()))},
         r"model\.blocks: checkpoint 9, this run 10; model\.layout: .*; model\.parameters: checkpoint \d+, this run \d+"),
        ("psl", {"sync_clients": False}, r"sync_clients: checkpoint True, this run False"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(saved, name, overrides, match):
    strategy = _build(name, **overrides)
    if "model_fn" in overrides:  # the initial arrays fit this run's model; the checkpoint does not
        grid = _grid()
        with pytest.raises(CheckpointMismatch, match=match):
            strategy.start(grid=grid, initial_arrays=ArrayRecord(overrides["model_fn"]().blocks.state_dict()),
                           num_rounds=4, resume_from=saved)
        assert grid.messages_by_type == {}
    else:
        _refused(strategy, saved, CheckpointMismatch, match)


def test_a_planner_in_the_loop_must_match_too(saved, tmp_path):
    _start(_build("psl-open", checkpoint_dir=tmp_path / "open"), _grid(), 1)
    _refused(_build("psl"), tmp_path / "open", CheckpointMismatch, r"planner: checkpoint .* this run \(not set\)")
    scenario = load_scenario("edge-diverse")
    psl = PSL(model_fn=model_fn, scenario=scenario, **SETTINGS)
    other_v = Adaptive(psl, make_online_planner("asl", psl.profile, scenario, V=0.5, bytes_per_element=8.0))
    _refused(other_v, tmp_path / "open", CheckpointMismatch, r"planner\.V: checkpoint 0\.01, this run 0\.5")


def _rewrite_meta(run, change, reseal=False):
    """Edit ``checkpoint.json`` with ``change(meta)``; ``reseal``: then recompute its digests as a
    forger could (plain digests do not stop that), to reach the checks behind them."""
    path = run / "checkpoint.json"
    meta = json.loads(path.read_text())
    change(meta)
    if reseal:
        meta = seal({k: v for k, v in meta.items() if k != DIGESTS}, _is_reference)
    path.write_text(json.dumps(meta))


class Payload:
    """Anything but tensors: a pickle that would run code on a loader that unpickles it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_corrupt_checkpoints_are_refused_before_anything_trains(saved, tmp_path):
    tensors = saved / "checkpoint-2.pt"
    blob = tensors.read_bytes()
    meta_text = (saved / "checkpoint.json").read_text()

    tensors.write_bytes(blob[: len(blob) // 2])  # truncated
    _refused(_build("psl"), saved, CheckpointError, r"checkpoint-2\.pt has \d+ bytes that do not match .* \(truncated or modified\)")
    tensors.write_bytes(blob[:100] + bytes(200) + blob[300:])  # same size, altered
    _refused(_build("psl"), saved, CheckpointError, r"truncated or modified")

    # a tensor file that is not tensors, with its checksum forged to match: torch.load refuses it
    import hashlib

    for garbage in (b"\x00garbage" * 50, pickle.dumps({"t0": Payload()}, protocol=2)):
        tensors.write_bytes(garbage)
        forged = lambda m: m["tensors"].update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
        _rewrite_meta(saved, forged)  # the checksum forged, but not the digests over it
        _refused(_build("psl"), saved, CheckpointError, r"section 'tensors' \(key 'bytes'\) was altered")
        (saved / "checkpoint.json").write_text(meta_text)
        _rewrite_meta(saved, forged, reseal=True)
        _refused(_build("psl"), saved, CheckpointError, r"checkpoint-2\.pt does not load")
    tensors.write_bytes(blob)
    (saved / "checkpoint.json").write_text(meta_text)

    (saved / "checkpoint.json").write_text(meta_text[: len(meta_text) // 2])  # truncated JSON
    _refused(_build("psl"), saved, CheckpointError, r"not valid JSON")
    (saved / "checkpoint.json").write_text("{}")
    _refused(_build("psl"), saved, CheckpointError, r"is not an flsplit checkpoint")
    (saved / "checkpoint.json").write_text(meta_text)
    _rewrite_meta(saved, lambda m: m["state"]["model"].update({"0.weight": {"$tensor": "t999"}}), reseal=True)
    _refused(_build("psl"), saved, CheckpointError, r"refers to tensor 't999'")
    (saved / "checkpoint.json").write_text(meta_text)
    _rewrite_meta(saved, lambda m: m["history"]["rounds"].pop(), reseal=True)
    _refused(_build("psl"), saved, CheckpointError, r"history does not hold rounds 1\.\.2")
    (saved / "checkpoint.json").write_text(meta_text)

    tensors.unlink()
    _refused(_build("psl"), saved, CheckpointError, r"tensor file .*checkpoint-2\.pt is missing")
    _refused(_build("psl"), tmp_path / "nowhere", CheckpointError, r"no checkpoint at")


# ------------------------------------------------------------------ edits of checkpoint.json
def _one_char(text, old, new):
    """``text`` with its only ``old`` replaced by ``new``."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _json_edit(change):
    def edit(text):
        meta = json.loads(text)
        change(meta)
        return json.dumps(meta)
    return edit


def _flip(digest):
    return digest[:-1] + ("0" if digest[-1] != "0" else "1")


def _older(meta):
    """A checkpoint as flsplit wrote them before digests: version 1, no digests."""
    del meta[DIGESTS]
    meta["version"] = 1


ROUND_1 = "section 'history' (round 1)"  # the label of round 1's digest

# each edit keeps checkpoint.json valid JSON; the refusal names what it changed
EDITS = {
    # one character: 8.bias would load 8.weight's tensor
    "tensor-map-entry": (lambda t: _one_char(t, '"8.bias": {"$tensor": "t7"}', '"8.bias": {"$tensor": "t6"}'),
                         r"section 'state' \(tensor map entry 'model\.8\.bias'\) was altered after it was written"),
    "history-value": (_json_edit(lambda m: m["history"]["rounds"][1].update(train_loss=0.5)),
                      r"section 'history' \(round 2\) was altered after it was written"),
    "history-round-removed": (_json_edit(lambda m: m["history"]["rounds"].pop()),
                              r"section 'history' \(round 2\) was removed"),
    "config-value": (_json_edit(lambda m: m["config"]["train"].update(seed=1)),
                     r"section 'config' \(key 'train'\) was altered after it was written"),
    "round": (_json_edit(lambda m: m.update(round=1)), r"section 'round' was altered after it was written"),
    "tensor-checksum": (_json_edit(lambda m: m["tensors"].update(sha256=_flip(m["tensors"]["sha256"]))),
                        r"section 'tensors' \(key 'sha256'\) was altered"),
    "digest-value": (_json_edit(lambda m: m[DIGESTS]["parts"].update({ROUND_1: _flip(m[DIGESTS]["parts"][ROUND_1])})),
                     r"the digest of section 'history' \(round 1\) was altered \(the content they cover is as written"),
    "digest-removed": (_json_edit(lambda m: m[DIGESTS]["parts"].pop("section 'config'")),
                       r"the digest of section 'config' was removed"),
    "overall-digest": (_json_edit(lambda m: m[DIGESTS].update(all=_flip(m[DIGESTS]["all"]))),
                       r"its digest over all parts \('all'\) was altered"),
    "digests-removed": (_json_edit(lambda m: m.pop(DIGESTS)), r"its digests were removed"),
    "digests-key-added": (_json_edit(lambda m: m[DIGESTS].update(note="x")),
                          r"its digests are not the 'parts' and 'all'"),
    "key-added": (_json_edit(lambda m: m["config"].update(extra=1)), r"section 'config' \(key 'extra'\) was added"),
    "section-added": (_json_edit(lambda m: m.update(note="x")), r"section 'note' was added"),
    "spacing": (lambda t: _one_char(t, '"version": 2,', '"version":  2,'),
                r"its text was edited at byte \d+ .* where no value changed"),
    "older-version": (_json_edit(_older), r"written by an older flsplit \(checkpoint version 1\) without digests: "
                                          r"whether it was edited cannot be told"),
}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    """The files of a 2-round PSL run's checkpoint, written once for all the edits."""
    run = tmp_path_factory.mktemp("sealed") / "run"
    _start(_build("psl", checkpoint_dir=run), _grid(), 2)
    return {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith("checkpoint")}


@pytest.mark.parametrize("edit", list(EDITS))
def test_any_edit_of_checkpoint_json_is_refused_naming_what_changed(sealed, tmp_path, edit):
    run = tmp_path / "run"
    run.mkdir()
    for name, data in sealed.items():
        (run / name).write_bytes(data)
    load_checkpoint(run)  # as written, it loads
    change, match = EDITS[edit]
    text = change(sealed["checkpoint.json"].decode())
    assert text != sealed["checkpoint.json"].decode() and isinstance(json.loads(text), dict)  # still valid JSON
    (run / "checkpoint.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as refused:
        load_checkpoint(run)
    assert not isinstance(refused.value, CheckpointMismatch)
    _refused(_build("psl"), run, CheckpointError, match)  # and a run does not start from it


def test_a_checkpoint_with_no_round_left_to_run_is_refused(saved):
    grid = _grid()
    with pytest.raises(ValueError, match=r"holds 2 rounds: num_rounds=2 leaves none to run"):
        _start(_build("psl"), grid, 2, resume_from=saved)
    assert grid.messages_by_type == {}


# ------------------------------------------------------------------ through the ServerApp
def _server_app(grid, tmp_path, **run_config):
    run_config = {"output-dir": str(tmp_path / "runs"), **run_config}
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


APP_CONFIG = {"strategy": "psl", "max-steps": 3, "cost-scenario": "none"}


def test_server_app_resumes_in_its_run_directory(tmp_path, one_torch_thread):
    straight = tmp_path / "straight"
    _server_app(InProcessGrid(client_app, 2, run_config=APP_CONFIG), straight, **APP_CONFIG, **{"num-server-rounds": 4})
    (expected,) = [json.loads(p.read_text()) for p in straight.glob("runs/*/history.json")]

    grid = InProcessGrid(client_app, 2, run_config=APP_CONFIG)
    _server_app(grid, tmp_path, **APP_CONFIG, **{"num-server-rounds": 2})
    (run_dir,) = (tmp_path / "runs").iterdir()
    first = json.loads((run_dir / "history.json").read_text())

    # other settings are refused before anything trains, naming the key
    with pytest.raises(CheckpointMismatch, match=r"seed: checkpoint 0, this run 5"):
        _server_app(grid, tmp_path, **APP_CONFIG, **{"num-server-rounds": 4, "resume-from": str(run_dir), "seed": 5})
    assert json.loads((run_dir / "history.json").read_text()) == first

    _server_app(grid, tmp_path / "elsewhere", **APP_CONFIG, **{"num-server-rounds": 4, "resume-from": str(run_dir)})
    assert list((tmp_path / "runs").iterdir()) == [run_dir] and not (tmp_path / "elsewhere").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert history["rounds"][:2] == first["rounds"]  # appended to, not rewritten
    assert history["run"] == first["run"] and history["resumed"][0]["after_round"] == 2
    assert history["resumed"][0]["run"]["num-server-rounds"] == 4
    for got, want in zip(history["rounds"], expected["rounds"], strict=True):
        got.pop("wall_seconds"), want.pop("wall_seconds")
        assert got == want
    final, want = torch.load(history["final_model"]), torch.load(expected["final_model"])
    assert all(torch.equal(final[k], want[k]) for k in want)


def test_resume_from_must_be_a_string():
    from apps.task import RunSettings

    with pytest.raises(ValueError, match="resume-from must be a run directory"):
        RunSettings({"resume-from": 3})


# ------------------------------------------------------------------ through flwr run
def test_flwr_run_resumes_and_appends_to_the_history(tmp_path):
    """2 rounds, then a new ``flwr run`` for round 3 with ``resume-from``. Its SuperNodes start
    with fresh ``context.state`` (data cursors from the start), so round 3 is not the round an
    uninterrupted run would have had; it continues the model and the history."""
    from tests.test_simulation import _flwr_run

    config = 'strategy="sflv2" max-steps=5'
    first, _ = _flwr_run(tmp_path, "num-supernodes=2", f"num-server-rounds=2 {config}")
    (run_dir,) = (tmp_path / "runs").iterdir()
    history, output = _flwr_run(tmp_path, "num-supernodes=2", f'num-server-rounds=3 {config} resume-from="{run_dir}"')
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3]
    assert history["rounds"][:2] == first["rounds"]
    assert history["resumed"][0]["after_round"] == 2 and history["resumed"][0]["run"]["run_id"] != first["run"]["run_id"]
    assert "resuming from" in output and "round 3/3 | test acc" in output
    assert history["rounds"][2]["num_examples"] > 0 and not history["rounds"][2]["errors"]
    assert load_checkpoint(run_dir).round == 3
