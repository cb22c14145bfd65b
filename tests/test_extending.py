"""Extending flsplit from outside the package: a scheme of one's own is priced and planned like
a built-in one once its module registers its row (traffic model and timing), and a scheme
without a row is refused before anything runs, saying how to add one."""

from __future__ import annotations

import json

import pytest

from flsplit.model.profile import profile_model
from flsplit.sim.scenario_files import load_scenario
from flsplit.sim.schemes import SCHEME_MODELS, SchemeModel, per_client_traffic, register_scheme, scheme_model
from flsplit.sim.traffic import predict_workload
from flsplit.sim.workload import Timing
from flsplit.strategies import PSL, SL
from tests.helpers import model_fn, random_data, run_strategy


class RelayPSL(PSL):
    """PSL's exchanges, priced as if its clients ran one after another (a made-up scheme)."""

    scheme = "test-relay-psl"


@pytest.fixture
def relay_psl_row():
    model = register_scheme(RelayPSL.scheme, SchemeModel(Timing.SEQUENTIAL, per_client_traffic))
    yield model
    SCHEME_MODELS.pop(RelayPSL.scheme)


def test_a_registered_scheme_is_priced_with_its_own_timing(relay_psl_row, one_torch_thread):
    parts = [random_data(16, seed=i) for i in range(3)]
    scenario = load_scenario("heterogeneous")
    runs = {cls: run_strategy(cls, parts, batch_size=8, cut_layer=2, scenario=scenario)[0] for cls in (PSL, RelayPSL)}
    psl, relay = (runs[c].history.rounds[0] for c in (PSL, RelayPSL))
    assert relay["bytes_up"] == psl["bytes_up"] and relay["train_loss"] == psl["train_loss"]  # the same exchanges
    assert (psl["sim"]["timing"], relay["sim"]["timing"]) == ("parallel", "sequential")
    # Parallel: the slowest chain bounds the round; sequential: the chains (each with the whole band) add up.
    chains = {name: [c["latency_s"] for c in run["sim"]["clients"].values()] for name, run in (("psl", psl), ("relay", relay))}
    assert max(chains["psl"]) <= psl["sim"]["round_latency_s"] < sum(chains["psl"])
    assert relay["sim"]["round_latency_s"] >= sum(chains["relay"]) * (1 - 1e-12)


def test_a_registered_scheme_is_predicted_by_the_traffic_models(relay_psl_row):
    profile = profile_model(model_fn(), (1, 8, 8))
    mine = predict_workload(RelayPSL.scheme, profile, cuts=[2, 3], samples=[16, 16])
    psl = predict_workload("psl", profile, cuts=[2, 3], samples=[16, 16])
    assert mine.timing is Timing.SEQUENTIAL and psl.timing is Timing.PARALLEL
    assert [c.uplink_bytes for c in mine.clients] == [c.uplink_bytes for c in psl.clients]


def test_a_scheme_without_a_row_is_refused_before_anything_runs():
    class Unpriced(SL):
        scheme = "test-unpriced"

    with pytest.raises(ValueError, match="register_scheme"):
        Unpriced(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, scenario=load_scenario("heterogeneous"))
    Unpriced(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10)  # no scenario: nothing to price


def test_a_scheme_name_keeps_its_model(relay_psl_row):
    assert register_scheme(RelayPSL.scheme, relay_psl_row) is relay_psl_row  # the same row again: fine
    with pytest.raises(ValueError, match="registered already"):
        register_scheme(RelayPSL.scheme, SchemeModel(Timing.PARALLEL, per_client_traffic))
    with pytest.raises(ValueError, match="registered already"):
        register_scheme("psl", SchemeModel(Timing.SEQUENTIAL, per_client_traffic))
    assert scheme_model("psl").timing is Timing.PARALLEL


def test_the_run_config_reaches_every_plane_folder_and_names_the_known_ones():
    from flsplit.planes.registry import plane_factory, plane_modes
    from flsplit.planes.stream import StreamDataPlane

    assert plane_modes()[:1] == ["message"] and {"auto", "stream"} <= set(plane_modes())
    config = {"data-plane": "stream", "stream-certfile": "", "stream-keyfile": "", "stream-max-frame-mb": 1,
              "stream-handshake-timeout": 5.0, "stream-listen": "127.0.0.1:0", "stream-advertise": ""}
    assert plane_factory({**config, "data-plane": "message"}) is None  # Flower messages: no plane folder
    factory = plane_factory(config)
    plane = factory(object(), 7.0)  # the grid is only used once the plane pushes
    try:
        assert isinstance(plane, StreamDataPlane) and plane.mode == "stream" and plane.timeout == 7.0
    finally:
        plane.close()
    with pytest.raises(ValueError, match=r"data-plane must be one of \['message', .*'stream'.*got 'carrier-pigeon'"):
        plane_factory({**config, "data-plane": "carrier-pigeon"})
    with pytest.raises(ValueError, match="stream-certfile and stream-keyfile go together"):
        plane_factory({**config, "stream-certfile": "/nonexistent.pem"})


def test_a_plane_registered_from_its_own_package_is_reachable_and_cannot_take_a_mode():
    from flsplit.planes import registry
    from flsplit.planes.dataplane import MessageDataPlane

    made = []
    entry = registry.PlaneEntry("test-plane", modes=("test-plane",),
                                from_run_config=lambda config, mode: lambda grid, timeout: made.append(mode) or
                                MessageDataPlane(grid, timeout))
    registry.register_plane(entry)
    try:
        assert "test-plane" in registry.plane_modes()
        registry.plane_factory({"data-plane": "test-plane"})(object(), 1.0)
        assert made == ["test-plane"]
        for taken in ("stream", "message"):
            with pytest.raises(ValueError, match=f"data-plane '{taken}' is taken"):
                registry.register_plane(registry.PlaneEntry("other", modes=(taken,), from_run_config=entry.from_run_config))
    finally:
        registry._BY_MODE.pop("test-plane")


def deepest_cut_rounds(inputs):
    """A made-up planner's driver: everyone at the deepest cut, resources split evenly."""
    from flsplit.planners.fixed import plan_fixed

    deepest = len(inputs.profile.blocks) - 1
    return lambda server_round: plan_fixed(inputs.problem(server_round), cut=deepest)


def test_a_planner_registered_from_its_own_module_runs_in_flsplit_plan(capsys):
    from flsplit.cli import main
    from flsplit.cli.plan import model_profile
    from flsplit.planners.registry import PLANNERS, PlannerEntry, register_planner

    entry = register_planner(PlannerEntry("test-deepest", "psl", f"{__name__}:deepest_cut_rounds", summary="made up"))
    try:
        command = ["plan", "--method", "test-deepest", "--scenario", "homogeneous", "--model", "digits-cnn"]
        assert main([*command, "--clients", "2", "--rounds", "2", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["method"] == "test-deepest" and result["scheme"] == "psl" and len(result["rounds"]) == 2
        deepest = len(model_profile("digits-cnn").blocks) - 1
        assert all(r["plan"]["cuts"] == [deepest, deepest] for r in result["rounds"])
        with pytest.raises(ValueError, match="registered already"):
            register_planner(PlannerEntry("test-deepest", "psl", "x:y"))
        assert main([*command, "--phi", "0.5"]) != 0
        assert "--phi applies to --method epsl only, not test-deepest" in capsys.readouterr().err
    finally:
        PLANNERS.pop(entry.name)


def test_every_registered_scheme_is_spelled_once_and_has_its_row():
    """The registry key, the class's ``scheme`` and its row in the scheme table name one scheme."""
    from flsplit.strategies import STRATEGIES

    assert {name: cls.scheme for name, cls in STRATEGIES.items()} == {name: name for name in STRATEGIES}
    assert all(scheme_model(name) is SCHEME_MODELS[name] for name in STRATEGIES)
