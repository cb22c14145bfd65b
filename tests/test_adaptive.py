"""Planners in the training loop, through the real ServerApp and ClientApps on an in-process grid."""

from __future__ import annotations

import pytest

from flsplit.planners import CCCAgent, CCCEnvironment, OpenPlanner, PlanningProblem, plan_edgesplit, plan_epsl, train_ccc_agent
from flsplit.model.profile import profile_model
from flsplit.sim.scenario_files import load_scenario
from flsplit.model.zoo import build_model
from tests.test_learning import run_app

STEPS, BATCH = 3, 32  # max-steps x batch-size: the samples every node trains per round
COMMON = {"cost-scenario": "edge-diverse", "max-steps": STEPS, "num-server-rounds": 3}


def _profile():
    return profile_model(build_model("digits-cnn", 10, 1, 8), (1, 8, 8))


def _round_state(entry):
    """Nodes, their scenario client ids (in-process: partition id = node - 1000), as recorded."""
    nodes = sorted(entry["plan"]["nodes"], key=int)
    ids = [entry["plan"]["nodes"][n]["client_id"] for n in nodes]
    assert ids == [int(n) - 1000 for n in nodes]  # identified before planning, as the grid configured them
    return nodes, ids


def test_edgesplit_in_the_loop_plans_each_round_as_the_planner_does(tmp_path):
    history = run_app(tmp_path, num_nodes=8, strategy="psl", planner="edgesplit", **COMMON, **{"fraction-train": 0.5})
    profile, scenario = _profile(), load_scenario("edge-diverse")
    all_cuts = []
    for r, entry in enumerate(history["rounds"], start=1):
        nodes, ids = _round_state(entry)
        # a training round sends the client parts down and back: the planner counts them
        problem = PlanningProblem.build(profile, scenario, samples=[STEPS * BATCH] * len(ids), client_ids=ids,
                                        server_round=r, include_weights=True)
        expected = plan_edgesplit(problem)
        recorded = entry["plan"]["nodes"]
        assert [recorded[n]["cut"] for n in nodes] == expected.cuts
        assert [recorded[n]["bandwidth_hz"] for n in nodes] == pytest.approx(expected.bandwidth_hz, rel=1e-12)
        assert [entry["cuts"][n] for n in nodes] == expected.cuts  # the cuts the clients trained with
        assert entry["plan"]["server_timing"] == "per-client" and entry["plan"]["planning_s"] >= 0
        # the round is priced with the plan's bandwidths
        assert [entry["sim"]["clients"][n]["bandwidth_hz"] for n in nodes] == pytest.approx(expected.bandwidth_hz, rel=1e-12)
        assert entry["sim"]["server_timing"] == "per-client"
        assert len(set(expected.cuts)) > 1  # different cuts for different clients in one round
        all_cuts.append(tuple((n, recorded[n]["cut"]) for n in nodes))
        assert not entry["errors"]
    assert len(set(all_cuts)) > 1  # and the plan changes between rounds
    assert max(r["test_accuracy"] for r in history["rounds"]) > 0.15  # it trains

    # flsplit report plots the cuts chosen over rounds beside accuracy
    from flsplit.cli.report_plots import write_plots
    from flsplit.cli.report_runs import load_run, summarize

    (path,) = (tmp_path / "runs").glob("*/history.json")
    summary = summarize(load_run(path))
    assert summary.planner == "edgesplit"
    assert summary.cuts == [list(r["cuts"].values()) for r in history["rounds"]]
    written = write_plots(tmp_path, [summary], metric="test_accuracy", target=0.9)
    assert tmp_path / "cuts_vs_round.png" in written and (tmp_path / "cuts_vs_round.png").stat().st_size > 10_000


def test_open_queues_advance_with_the_measured_energy(tmp_path):
    history = run_app(tmp_path, num_nodes=4, strategy="psl", planner="asl", **COMMON, **{"planner-v": 0.01})
    profile, scenario = _profile(), load_scenario("edge-diverse")
    queues: dict[str, float] = {}
    for r, entry in enumerate(history["rounds"], start=1):
        plan = entry["plan"]
        nodes, ids = _round_state(entry)
        before = [queues.get(n, 0.0) for n in nodes]
        assert plan["queues_before"] == pytest.approx(before, rel=1e-12, abs=0)
        # the planner's plan for this round's state, recomputed independently
        problem = PlanningProblem.build(profile, scenario, samples=[STEPS * BATCH] * len(ids), client_ids=ids,
                                        server_round=r, include_weights=True)
        expected = OpenPlanner(problem, energy_budget_j=plan["energy_budget_j"], V=0.01,
                               initial_queues=before).plan(r)
        assert [plan["nodes"][n]["cut"] for n in nodes] == expected.cuts
        assert [plan["nodes"][n]["server_cpu_share"] for n in nodes] == pytest.approx(expected.server_cpu_share, rel=1e-9)
        for n, budget in zip(nodes, plan["energy_budget_j"]):
            spent = entry["sim"]["clients"][n]["energy_j"]
            queues[n] = max(queues.get(n, 0.0) + spent - budget, 0.0)
        assert plan["queues_after"] == pytest.approx([queues[n] for n in nodes], rel=1e-12, abs=0)
    assert any(q > 0 for q in queues.values()) or all(
        e["sim"]["clients"][n]["energy_j"] <= b
        for e in history["rounds"] for n, b in zip(sorted(e["plan"]["nodes"], key=int), e["plan"]["energy_budget_j"])
    )


def test_epsl_resource_management_in_the_loop(tmp_path):
    history = run_app(tmp_path, num_nodes=4, strategy="epsl", planner="epsl", **{**COMMON, "phi": 0.5, "num-server-rounds": 2})
    profile, scenario = _profile(), load_scenario("edge-diverse")
    width = scenario.channel.subchannel_bandwidth_hz
    for r, entry in enumerate(history["rounds"], start=1):
        nodes, ids = _round_state(entry)
        problem = PlanningProblem.build(profile, scenario, samples=[STEPS * BATCH] * len(ids), client_ids=ids,
                                        server_round=r, include_weights=True)
        expected = plan_epsl(problem, phi=0.5)
        recorded = entry["plan"]["nodes"]
        assert [recorded[n]["subchannels"] for n in nodes] == expected.subchannels
        assert [entry["cuts"][n] for n in nodes] == expected.cuts
        assert [entry["sim"]["clients"][n]["bandwidth_hz"] for n in nodes] == [m * width for m in expected.subchannels]
        assert entry["sim"]["broadcast_bytes"] > 0


@pytest.fixture(scope="module")
def agent_path(tmp_path_factory):
    """A small CCC agent for 4 clients of the edge-diverse scenario (trained before the run)."""
    problem = PlanningProblem.build(_profile(), load_scenario("edge-diverse"), samples=[STEPS * BATCH] * 4,
                                    client_ids=[0, 1, 2, 3])
    agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=5), episodes=15, seed=0)
    path = tmp_path_factory.mktemp("agent") / "ccc.pt"
    agent.save(path)
    return path


def test_ccc_in_the_loop_feeds_the_measured_loss_back(tmp_path, agent_path):
    history = run_app(tmp_path, num_nodes=4, strategy="sflga", planner="ccc", **COMMON,
                      **{"planner-agent": str(agent_path)})
    agent = CCCAgent.load(agent_path)
    rounds = history["rounds"]
    assert rounds[0]["plan"]["recent_loss"] is None
    for prev, entry in zip(rounds, rounds[1:]):
        assert entry["plan"]["recent_loss"] == prev["train_loss"]  # the measured loss, one round late
    for entry in rounds:
        cuts = set(entry["cuts"].values())
        assert len(cuts) == 1 and cuts <= set(agent.candidate_cuts)  # SFL-GA: one cut per round


def test_an_agent_for_another_number_of_clients_is_refused_at_start(tmp_path, agent_path):
    with pytest.raises(ValueError, match="trained for 4 clients per round, but this run samples 3"):
        run_app(tmp_path, num_nodes=3, strategy="sflga", planner="ccc", **COMMON, **{"planner-agent": str(agent_path)})


def test_an_agent_for_other_candidate_cuts_is_refused_at_start(tmp_path, agent_path):
    with pytest.raises(ValueError, match="chooses among cuts .* not the run's candidate cuts"):
        run_app(tmp_path, num_nodes=4, strategy="sflga", planner="ccc", **COMMON,
                **{"planner-agent": str(agent_path), "planner-candidate-cuts": "2,3"})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "psl", "planner": "epsl"}, "planner 'epsl' plans epsl rounds, not 'psl'"),
        ({"strategy": "sflga", "planner": "ccc"}, "needs a trained agent"),
        ({"strategy": "psl", "planner": "fastest"}, "unknown planner 'fastest'"),
        ({"strategy": "psl", "planner": "edgesplit", "cost-scenario": "none"}, "needs a wireless scenario"),
        ({"strategy": "epsl", "planner": "epsl", "cost-scenario": "homogeneous"}, "OFDMA"),
        ({"strategy": "psl", "planner": "asl", "planner-energy-budget": "0.1,-2"}, "energy budgets must be finite and > 0"),
        ({"strategy": "psl", "planner": "edgesplit", "planner-candidate-cuts": "2,x"}, "planner-candidate-cuts"),
        ({"strategy": "psl", "planner": "edgesplit", "planner-candidate-cuts": "2,40"}, "cut 40 is outside the model: valid cuts are 1..8"),
    ],
)
def test_bad_planner_settings_are_refused_before_training(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        run_app(tmp_path, num_nodes=2, **{**COMMON, **config})
    assert not list(tmp_path.glob("runs/*/history.json"))


def test_planners_in_the_loop_count_the_client_part_weights():
    """With ``include_weights`` a planner's model is the one price of a training round's traffic
    (client parts down and back), and it plans differently from the weight-free model."""
    from flsplit.sim import Allocation, ElementWire, ServerTiming, predict_workload, price

    profile, scenario = _profile(), load_scenario("edge-diverse")
    ids, samples = list(range(8)), [96] * 8
    with_weights = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=samples, client_ids=ids,
                                                   include_weights=True))
    without = plan_edgesplit(PlanningProblem.build(profile, scenario, samples=samples, client_ids=ids))
    work = predict_workload("psl", profile, cuts=with_weights.cuts, samples=samples, client_ids=ids,
                            wire=ElementWire(profile, 4.0, include_weights=True))
    priced = price(work, scenario, Allocation(bandwidth_hz=with_weights.bandwidth_hz), server_timing=ServerTiming.PER_CLIENT)
    assert with_weights.latency_s == pytest.approx(priced.round_latency_s, rel=1e-9)
    assert with_weights.energy_j == pytest.approx(priced.total_energy_j, rel=1e-9)
    # the weight-free plan, priced as a training round, is slower than the weight-aware one
    work_without = predict_workload("psl", profile, cuts=without.cuts, samples=samples, client_ids=ids,
                                    wire=ElementWire(profile, 4.0, include_weights=True))
    slower = price(work_without, scenario, Allocation(bandwidth_hz=without.bandwidth_hz), server_timing=ServerTiming.PER_CLIENT)
    assert slower.round_latency_s > priced.round_latency_s


def test_open_names_budgets_no_cut_can_meet():
    """A budget below a device's cheapest cut is reported (once per device), not silently chased."""
    from flsplit.planners.online import make_online_planner

    planner = make_online_planner("asl", _profile(), load_scenario("edge-diverse"), energy_budget_j="1e-4,1")
    planner.plan(1, [0, 1], [96, 96])
    planner.plan(2, [0, 1], [96, 96])
    assert planner.warned == {0}  # client 0 cannot meet 0.1 mJ; client 1 has 1 J


def test_the_wrapped_strategy_does_not_know_it_is_wrapped():
    """``Adaptive`` holds the strategy, as Flower's DP wrappers do: wrapping sets nothing on it
    (the planner reaches the round loop as ``start(..., planning=...)``)."""
    from flsplit.planners.online import make_online_planner
    from flsplit.strategies import PSL
    from flsplit.strategies.adaptive import Adaptive
    from tests.helpers import model_fn

    scenario = load_scenario("edge-diverse")
    psl = PSL(model_fn=model_fn, input_shape=(1, 8, 8), num_classes=10, scenario=scenario)
    before = dict(vars(psl))
    adaptive = Adaptive(psl, make_online_planner("edgesplit", psl.profile, scenario))
    assert vars(psl).keys() == before.keys() and all(vars(psl)[k] is v for k, v in before.items())
    assert adaptive.strategy is psl and not hasattr(psl, "round_planner")
