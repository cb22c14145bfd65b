"""Resource planners: planning time, predicted latency and energy, ASL against fixed-split SL.

Three parts (each prints a Markdown table; ``--part`` picks one):

``time``
    Seconds to plan one round for 100 and 1000 clients (``--sizes``), per method (median of
    ``--repeats``; each call builds and checks its ``PlanningProblem`` and prices its plan with
    ``flsplit.sim.price``). The heterogeneous scenario's eight devices are cycled; the band stays
    20 MHz, as ``2 N`` OFDMA subchannels so that EPSL has subchannels to hand out. The CCC
    agent's training is timed separately (it is trained per number of clients; the planning
    time is one greedy forward pass plus the convex allocation).
``methods``
    Each method over ``--rounds`` rounds of the heterogeneous scenario (8 clients), against
    the best fixed cut (one cut for everyone, resources split evenly) of the same scheme, both
    priced by the one price (``flsplit.sim.price``) through
    ``flsplit.cli.plan.run_plans`` (what ``flsplit plan`` prints).
``asl``
    OPEN (ASL) against fixed-split SL under the same energy budgets, in OPEN's own model
    (parallel clients, server CPU shared optimally): the fixed split is OPEN restricted to one
    candidate cut, every cut tried, the fastest kept; the budgets are that split's mean energy
    per device (and 80 % of it). 200 rounds of Rayleigh fading.

Run: ``python benchmarks/bench_planners.py [--part time|methods|asl] [--model vgg11]``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flsplit.sim.scenario import Channel, Scenario  # noqa: E402
from flsplit.cli.plan import PlanSetup, model_profile, run_plans  # noqa: E402
from flsplit.planners import OpenPlanner, PlanningProblem, allocate_sflga, best_fixed_cut, plan_edgesplit  # noqa: E402
from flsplit.sim.scenario_files import load_scenario  # noqa: E402


def scaled_scenario(base: Scenario, n: int) -> Scenario:
    """``base``'s devices and server on a 20 MHz band cut into ``2 n`` subchannels."""
    channel = Channel(num_subchannels=2 * n, subchannel_bandwidth_hz=20e6 / (2 * n))
    return Scenario(base.devices, base.server, channel, seed=base.seed, name=f"{base.name}-{n}")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_time(profile, base: Scenario, samples: int, repeats: int, sizes: list[int]) -> None:
    from flsplit.planners.ccc import CCCEnvironment, CCCPlanner, train_ccc_agent
    from flsplit.planners.epsl import plan_epsl

    print(f"\n### Planning time per round (s), median of {repeats}; {len(profile.blocks) - 1} candidate cuts\n")
    print("| clients | fixed (best cut) | edgesplit | asl (OPEN) | epsl | epsl + budgets | ccc (plan) | ccc (train) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        sc = scaled_scenario(base, n)
        per_client = [samples] * n
        fixed = best_fixed_cut(PlanningProblem.build(profile, sc, samples=per_client))
        budgets = [1.5 * e for e in fixed.details["energy_per_client_j"]]
        row = {
            "fixed": lambda: best_fixed_cut(PlanningProblem.build(profile, sc, samples=per_client)),
            "edgesplit": lambda: plan_edgesplit(PlanningProblem.build(profile, sc, samples=per_client)),
            "asl": lambda: OpenPlanner(PlanningProblem.build(profile, sc, samples=per_client), energy_budget_j=budgets,
                                       V=1.0).plan(0),
            "epsl": lambda: plan_epsl(PlanningProblem.build(profile, sc, samples=per_client)),
            "epsl-budget": lambda: plan_epsl(PlanningProblem.build(profile, sc, samples=per_client),
                                             energy_budget_j=budgets),
        }
        cells = []
        for name, fn in row.items():
            try:
                cells.append(f"{_median_seconds(fn, repeats):.3f}")
            except ValueError as err:  # e.g. a budget the slowest device cannot meet
                cells.append(f"n/a ({err})")
        start = time.perf_counter()
        episodes = 600 if n <= 10 else 5  # the training time is reported for the full run only
        problem = PlanningProblem.build(profile, sc, samples=per_client)
        agent = train_ccc_agent(CCCEnvironment(problem, num_rounds=20), episodes=episodes, seed=0)
        train_s = time.perf_counter() - start
        planner = CCCPlanner(agent, problem)
        cells.append(f"{_median_seconds(lambda: planner.plan(0), repeats):.3f}")
        cells.append(f"{train_s:.1f} ({episodes} episodes x 20 rounds)")
        print(f"| {n} | " + " | ".join(cells) + " |")


def part_methods(profile, scenario: Scenario, samples: int, rounds: int, agent_path: Path) -> None:
    from flsplit.planners.ccc import CCCEnvironment, train_ccc_agent

    n = len(scenario.devices)
    start = time.perf_counter()
    env = CCCEnvironment(PlanningProblem.build(profile, scenario, samples=[samples] * n), num_rounds=20)
    agent = train_ccc_agent(env, episodes=600, seed=0)
    agent.save(agent_path)
    print(f"\n(ccc agent: 600 episodes x 20 rounds trained in {time.perf_counter() - start:.1f} s)")
    print(f"\n### Predicted round latency and device energy, mean of {rounds} rounds, {n} clients x "
          f"{samples} samples, scenario {scenario.name}\n")
    print("| method | scheme | latency s | energy J | best fixed cut | its latency s | its energy J "
          "| latency | energy | planner's own latency s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    configs = [
        ("edgesplit", {}),
        ("asl", {}),
        ("epsl", {"phi": 0.0}),
        ("epsl", {"phi": 0.5}),
        ("ccc", {}),
    ]
    for method, extra in configs:
        setup = PlanSetup(method=method, profile=profile, scenario=scenario, num_clients=n, samples=samples,
                          rounds=rounds, agent_path=agent_path, **extra)
        out = run_plans(setup)
        s = out["summary"]
        own = sum(r["plan"]["latency_s"] for r in out["rounds"]) / rounds
        label = method + (f" phi={extra['phi']}" if "phi" in extra else "")
        if method == "ccc":
            chosen = collections.Counter(r["plan"]["cuts"][0] for r in out["rounds"])
            label += " (cuts " + ", ".join(f"{k}: {c}x" for k, c in sorted(chosen.items())) + ")"
        print(f"| {label} | {out['scheme']} | {s['mean_latency_s']:.4g} | {s['mean_energy_j']:.4g} | "
              f"{out['best_fixed_cut']} | {s['baseline_mean_latency_s']:.4g} | {s['baseline_mean_energy_j']:.4g} | "
              f"{s['latency_change_pct']:+.1f} % | {s['energy_change_pct']:+.1f} % | {own:.4g} |")
        if method == "ccc":  # the convex allocation alone, at the best fixed cut
            k = out["best_fixed_cut"]
            alloc = [allocate_sflga(PlanningProblem.build(profile, scenario, samples=[samples] * n, server_round=r),
                                    cut=k) for r in range(rounds)]
            lat = float(np.mean([p.latency_s for p in alloc]))
            energy = float(np.mean([p.energy_j for p in alloc]))
            print(f"| sflga allocation at cut {k} | sflga | {lat:.4g} | {energy:.4g} | {k} | "
                  f"{s['baseline_mean_latency_s']:.4g} | {s['baseline_mean_energy_j']:.4g} | "
                  f"{100 * (lat / s['baseline_mean_latency_s'] - 1):+.1f} % | "
                  f"{100 * (energy / s['baseline_mean_energy_j'] - 1):+.1f} % | {lat:.4g} |")


def part_asl(profile, scenario: Scenario, samples: int, rounds: int, v_values: list[float]) -> None:
    n = len(scenario.devices)
    per_client = [samples] * n
    cuts = range(1, len(profile.blocks))

    def run(planner: OpenPlanner) -> tuple[float, np.ndarray]:
        plans = [planner.plan(r) for r in range(rounds)]
        latency = float(np.mean([p.latency_s for p in plans]))
        energy = np.mean([p.details["energy_per_client_j"] for p in plans], axis=0)
        return latency, energy

    def equal_shares(k: int) -> float:
        """Mean latency at cut k with the server CPU split evenly (no allocation at all)."""
        planner = OpenPlanner(PlanningProblem.build(profile, scenario, samples=per_client, candidate_cuts=[k]),
                              energy_budget_j=[1.0] * n, V=1.0)
        return float(np.mean([
            np.max(t["ready_s"][:, 0] + n * t["server_s"][:, 0]) for t in map(planner.round_terms, range(rounds))
        ]))

    # Fixed split: OPEN with one candidate cut (its budgets do not matter: nothing to choose).
    fixed = {k: run(OpenPlanner(PlanningProblem.build(profile, scenario, samples=per_client, candidate_cuts=[k]),
                                energy_budget_j=[1.0] * n, V=1.0)) for k in cuts}
    best = min(fixed, key=lambda k: fixed[k][0])
    fixed_latency, fixed_energy = fixed[best]
    even = {k: equal_shares(k) for k in cuts}
    best_even = min(even, key=even.get)
    print(f"\n### ASL (OPEN) against fixed-split SL, {rounds} rounds, {n} clients x {samples} samples, "
          f"scenario {scenario.name}\n")
    print(f"- Fixed split, server CPU shared optimally: best cut {best}, {fixed_latency:.4g} s and "
          f"{fixed_energy.sum():.4g} J per round (the budgets below are its per-device energy).")
    print(f"- Fixed split, server CPU shared evenly: best cut {best_even}, {even[best_even]:.4g} s, "
          f"{fixed[best_even][1].sum():.4g} J per round.\n")
    print("| budgets | V | ASL latency s | ASL energy J | delay vs fixed (optimal shares) | "
          "delay vs fixed (even shares) | energy vs fixed | worst device energy / budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scale in (1.0, 0.8):
        budgets = list(scale * fixed_energy)
        for v in v_values:
            latency, energy = run(OpenPlanner(PlanningProblem.build(profile, scenario, samples=per_client),
                                              energy_budget_j=budgets, V=v))
            ratio = float(np.max(energy / np.array(budgets)))
            print(f"| {scale:.0%} of fixed | {v:g} | {latency:.4g} | {energy.sum():.4g} | "
                  f"{100 * (latency / fixed_latency - 1):+.1f} % | {100 * (latency / even[best_even] - 1):+.1f} % | "
                  f"{100 * (energy.sum() / fixed_energy.sum() - 1):+.1f} % | {ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("time", "methods", "asl", "all"), default="all")
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=50, help="rounds of the methods part")
    parser.add_argument("--asl-rounds", type=int, default=200)
    parser.add_argument("--asl-model", default="lenet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--agent", type=Path, default=Path("/tmp/flsplit-bench-ccc-agent.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = model_profile(args.model)
    het = load_scenario("heterogeneous")
    print(f"model {args.model}: {len(profile.blocks)} blocks; torch {torch.__version__}; "
          f"{torch.get_num_threads()} torch thread(s)")
    if args.part in ("time", "all"):
        part_time(profile, het, args.samples, args.repeats, [int(s) for s in args.sizes.split(",")])
    if args.part in ("methods", "all"):
        part_methods(profile, het, args.samples, args.rounds, args.agent)
    if args.part in ("asl", "all"):
        for model in dict.fromkeys([args.asl_model, args.model]):
            part_asl(model_profile(model), het, args.samples, args.asl_rounds, [1e-4, 1e-3, 1e-2, 1e-1])


if __name__ == "__main__":
    main()
