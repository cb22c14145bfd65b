"""``flsplit plan``: the command a user runs, through the real entry point.

The expected values are recomputed here from the planners' library functions and the cost
model (each tested against brute force or hand formulas in its own test module), not read
back from the command's own code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flsplit.cli import main
from flsplit.planners import PlanningProblem, plan_fixed
from tests.oracle import scheme_round_cost
from flsplit.cli.plan import model_profile
from flsplit.sim.scenario_files import load_scenario

MODEL = "digits-cnn"  # 9 blocks: cuts 1..8


@pytest.fixture(scope="module")
def profile():
    return model_profile(MODEL)


def run_json(capsys, *args: str) -> dict:
    assert main(["plan", "--model", MODEL, *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fixed_reports_the_cut_and_the_best_fixed_cut(capsys, profile):
    scenario = load_scenario("heterogeneous")
    out = run_json(capsys, "--scenario", "heterogeneous", "--method", "fixed", "--cut", "3", "--clients", "4",
                   "--samples", "32", "--rounds", "2")
    by_cut = {
        k: [plan_fixed(PlanningProblem.build(profile, scenario, samples=[32] * 4, server_round=r), cut=k) for r in (0, 1)]
        for k in range(1, 9)
    }
    best = min(by_cut, key=lambda k: sum(p.latency_s for p in by_cut[k]))
    assert out["best_fixed_cut"] == best
    for r, entry in enumerate(out["rounds"]):
        assert entry["round"] == r
        assert entry["plan"]["cuts"] == [3] * 4
        assert entry["latency_s"] == pytest.approx(by_cut[3][r].latency_s, rel=1e-12)
        assert entry["energy_j"] == pytest.approx(by_cut[3][r].energy_j, rel=1e-12)
        assert entry["baseline_latency_s"] == pytest.approx(by_cut[best][r].latency_s, rel=1e-12)
    mean = sum(p.latency_s for p in by_cut[3]) / 2
    assert out["summary"]["mean_latency_s"] == pytest.approx(mean, rel=1e-12)


def test_edgesplit_plan_is_priced_by_the_common_cost_model(capsys, profile):
    scenario = load_scenario("heterogeneous")
    out = run_json(capsys, "--scenario", "heterogeneous", "--method", "edgesplit", "--clients", "3")
    entry = out["rounds"][0]
    plan = entry["plan"]
    assert all(1 <= k <= 8 for k in plan["cuts"])
    total = scenario.channel.total_bandwidth_hz
    assert sum(plan["bandwidth_hz"]) == pytest.approx(total, rel=1e-9)
    cost = scheme_round_cost(profile, scenario, cuts=plan["cuts"], samples=[64] * 3,
                             bandwidth_shares=[b / total for b in plan["bandwidth_hz"]])
    assert entry["latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-12)
    assert entry["energy_j"] == pytest.approx(cost.total_energy_j, rel=1e-12)


def test_asl_carries_its_queues_across_rounds_under_the_baseline_budgets(capsys, profile):
    scenario = load_scenario("homogeneous")
    out = run_json(capsys, "--scenario", "homogeneous", "--method", "asl", "--clients", "3", "--rounds", "3")
    rounds = out["rounds"]
    # Default budgets: each device's mean energy at the best fixed cut over the same rounds.
    best = out["best_fixed_cut"]
    fixed = [plan_fixed(PlanningProblem.build(profile, scenario, samples=[64] * 3, server_round=r), cut=best)
             for r in range(3)]
    budgets = [sum(p.details["energy_per_client_j"][i] for p in fixed) / 3 for i in range(3)]
    assert rounds[0]["plan"]["details"]["energy_budget_j"] == pytest.approx(budgets, rel=1e-12)
    assert rounds[0]["plan"]["details"]["queues_before"] == [0.0, 0.0, 0.0]
    for before, after in zip(rounds, rounds[1:]):
        assert after["plan"]["details"]["queues_before"] == before["plan"]["details"]["queues_after"]
    for entry in rounds:
        assert sum(entry["plan"]["server_cpu_share"]) == pytest.approx(1.0, abs=1e-9)


def test_text_output_has_a_row_per_client(capsys):
    assert main(["plan", "--scenario", "homogeneous", "--model", MODEL, "--method", "edgesplit", "--clients", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("flsplit plan: method edgesplit")
    rows = [line for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3, 4]
    assert "best fixed cut" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scenario", "homogeneous", "--method", "fixed", "--cut", "9"], "--cut 9 is outside the model: valid cuts are 1..8"),
        (["--scenario", "no-such", "--method", "fixed"], "neither a shipped scenario"),
        (["--scenario", "homogeneous", "--method", "edgesplit", "--phi", "0.5"], "--phi applies to --method epsl"),
        (["--scenario", "homogeneous", "--method", "fixed", "--phi", "0.5"], "--phi applies to --method epsl"),
        (["--scenario", "homogeneous", "--method", "asl", "--cut", "2"], "--cut applies to --method fixed only"),
        (["--scenario", "homogeneous", "--method", "edgesplit", "--energy-budget", "1"], "--energy-budget applies to --method epsl/asl/ccc only, not edgesplit"),
        (["--scenario", "homogeneous", "--method", "asl", "--clients", "3", "--energy-budget", "1,2"],
         "--energy-budget: energy_budget_j has 2 entries for 3 clients"),
        (["--scenario", "homogeneous", "--method", "asl", "--energy-budget", "0"], "energy_budget_j"),
        (["--scenario", "homogeneous", "--method", "edgesplit", "--train-agent", "--agent", "x.pt"],
         "--train-agent trains the ccc agent"),
        (["--scenario", "homogeneous", "--method", "ccc", "--train-agent"], "--train-agent needs --agent"),
        (["--scenario", "homogeneous", "--method", "ccc"], "needs a trained agent"),
    ],
)
def test_bad_requests_exit_1_with_the_reason(capsys, args, message):
    assert main(["plan", "--model", MODEL, *args]) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_malformed_scenario_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\ncpu-hz = 'fast'\n")
    assert main(["plan", "--model", MODEL, "--scenario", str(bad), "--method", "fixed"]) == 1
    assert "bad.toml" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", MODEL, "--scenario", "homogeneous", "--method", "fixed", "--rounds", "0"])
    assert exc.value.code == 2


def test_console_script_prints_json(tmp_path):
    script = Path(sys.executable).parent / "flsplit"
    proc = subprocess.run(
        [str(script), "plan", "--scenario", "heterogeneous", "--model", MODEL, "--method", "edgesplit",
         "--clients", "2", "--rounds", "2", "--json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["round"] for r in out["rounds"]] == [0, 1]
    assert out["method"] == "edgesplit" and out["clients"] == 2


def test_epsl_plan_equals_the_cost_model_and_respects_budgets(capsys, profile):
    scenario = load_scenario("heterogeneous")
    out = run_json(capsys, "--scenario", "heterogeneous", "--method", "epsl", "--phi", "0.5", "--clients", "4",
                   "--energy-budget", "0.002")
    entry = out["rounds"][0]
    plan = entry["plan"]
    assert len(set(plan["cuts"])) == 1 and sum(plan["subchannels"]) == 16
    cost = scheme_round_cost(profile, scenario, cuts=plan["cuts"], samples=[64] * 4, scheme="epsl", phi=0.5,
                             subchannels=plan["subchannels"], tx_power_w=plan["tx_power_w"])
    assert entry["latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-12)
    assert plan["latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-9)
    assert all(c.energy_j <= 0.002 * (1 + 1e-9) for c in cost.clients)
    # The baseline is EPSL at one cut with an even split, at the same phi.
    base = plan_fixed(PlanningProblem.build(profile, scenario, samples=[64] * 4), cut=out["best_fixed_cut"],
                      scheme="epsl", phi=0.5)
    assert entry["baseline_latency_s"] == pytest.approx(base.latency_s, rel=1e-12)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--scenario", "homogeneous", "--method", "epsl"], "EPSL assigns OFDMA subchannels"),
        (["--scenario", "heterogeneous", "--method", "epsl", "--energy-budget", "1e-9"], "infeasible"),
        (["--scenario", "heterogeneous", "--method", "epsl", "--phi", "2"], "phi"),
    ],
)
def test_epsl_requests_it_cannot_plan_exit_1(capsys, args, message):
    assert main(["plan", "--model", MODEL, *args]) == 1
    assert message in capsys.readouterr().err


def test_ccc_trains_saves_and_reloads_an_agent(tmp_path, capsys, profile):
    from dataclasses import replace

    agent = tmp_path / "agents" / "ccc.pt"
    common = ["--scenario", "heterogeneous", "--method", "ccc", "--clients", "3", "--agent", str(agent),
              "--min-client-depth", "2"]
    first = run_json(capsys, *common, "--train-agent", "--episodes", "4", "--episode-rounds", "5", "--rounds", "2")
    assert agent.is_file()
    second = run_json(capsys, *common, "--rounds", "2")  # loads the saved agent
    assert [r["plan"]["cuts"] for r in first["rounds"]] == [r["plan"]["cuts"] for r in second["rounds"]]
    scenario = load_scenario("heterogeneous")
    for entry in second["rounds"]:
        plan = entry["plan"]
        assert len(set(plan["cuts"])) == 1 and plan["cuts"][0] >= 2  # the privacy bound
        clocks = plan["details"]["cpu_hz"]
        at_clock = scenario.with_devices({i: replace(scenario.device(i), cpu_hz=f) for i, f in enumerate(clocks)})
        total = scenario.channel.total_bandwidth_hz
        cost = scheme_round_cost(profile, at_clock, cuts=plan["cuts"], samples=[64] * 3, scheme="sflga",
                                 server_round=entry["round"], tx_power_w=plan["tx_power_w"],
                                 bandwidth_shares=[b / total for b in plan["bandwidth_hz"]])
        assert entry["latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-12)
        assert plan["latency_s"] == pytest.approx(cost.round_latency_s, rel=1e-6)


def test_ccc_agent_for_other_clients_is_refused(tmp_path, capsys):
    agent = tmp_path / "ccc.pt"
    args = ["--scenario", "heterogeneous", "--method", "ccc", "--agent", str(agent)]
    run_json(capsys, *args, "--clients", "3", "--train-agent", "--episodes", "2", "--episode-rounds", "3")
    assert main(["plan", "--model", MODEL, *args, "--clients", "4"]) == 1
    assert "the agent was trained for 3 clients" in capsys.readouterr().err
