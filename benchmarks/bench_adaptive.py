"""Adaptive schemes in training (issue 10): each planner in the loop beside its baselines.

Every run is the project's real ServerApp with the real ClientApps on an in-process grid
(``flsplit.planes.inprocess.InProcessGrid``: no Ray, no SuperLink; messages are handled in this
process), in ONE setting: the embedded scikit-learn digits (iid partitions), digits-cnn,
8 nodes all sampled every round (fraction-train 1.0), the ``edge-diverse`` scenario, the same
seed, rounds, local epochs, batch size, learning rate and momentum. Only ``strategy``,
``cut-layer``, ``phi`` and the ``planner*`` keys differ between rows.

Groups (each adaptive scheme beside its baselines):

1. EdgeSplit (psl + planner edgesplit) vs PSL at the best uniform cut;
2. ASL/OPEN (psl + planner asl, V; default budgets) vs PSL at the best fixed cut and vanilla SL
   at that cut; also OPEN with budgets = vanilla SL's per-device energy (``asl-slbudget``);
3. SFL-GA + CCC (sflga + planner ccc, agent trained first with ``flsplit plan --train-agent``)
   vs SFL-V2 at the best fixed cut and PSL (and SFL-GA at the best fixed cut, to isolate CCC);
4. EPSL + its resource management (epsl + planner epsl, phi) vs EPSL with an even split at
   the best fixed cut (same phi) vs PSL.

The best uniform cut is ``flsplit.planners.best_fixed_cut`` for the samples each node trains
per round (local epochs x its partition), over the run's rounds (mean latency; ties -> lower).

Server timing: EdgeSplit and OPEN price their rounds with the per-client server
(``ServerTiming.PER_CLIENT``), the fixed baselines with ``after-clients``. Every round is
therefore ALSO re-priced with the other timing from the history's measured workload
(``flsplit.sim.measured_workload`` + ``flsplit.sim.price``; a baseline's per-client server
is a full-speed worker per client, EdgeSplit's assumption). Re-pricing with the recorded
timing reproduces the recorded latency (checked).

Diagnostics per adaptive run: the planner's own latency (its objective) beside the measured
one; the same measured workload (same cuts) priced with an even radio split at maximum power
and clock, and with even server CPU shares; the client-part weights' share of the uplink
bytes; how often a plan lowered a clock or a power below the device's maximum.

The CCC agent is trained first with the CLI (8 clients, the nodes' samples, episodes of the
run's length, seed 0; ``OMP_NUM_THREADS=1``) and saved to ``OUT/ccc-agent.pt``.

Writes ``OUT/<run>/seed<k>/<stamp>/history.json`` per run, ``OUT/report-<group>/`` (``flsplit
report`` of seed ``--plot-seed``), ``OUT/results.json`` and ``OUT/table.md``.

Run: ``python benchmarks/bench_adaptive.py [--rounds 25] [--seeds 0,1,2] [--target 0.9] [--jobs 2]``
(about 10 minutes on the 2-core VM; ``--analyse-only`` re-reads the histories).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NODES = 8
SCENARIO = "edge-diverse"
MODEL = "digits-cnn"

GROUPS = {
    "1-edgesplit": ["edgesplit", "psl-fixed"],
    "2-asl": ["asl", "psl-fixed", "sl-fixed", "asl-slbudget"],
    "3-sflga-ccc": ["sflga-ccc", "sflv2-fixed", "psl-fixed", "sflga-fixed"],
    "4-epsl": ["epsl-rm", "epsl-fixed", "psl-fixed"],
}
EFFECTS = {  # (adaptive run, baseline run) pairs compared in the effects table
    "1-edgesplit": [("edgesplit", "psl-fixed")],
    "2-asl": [("asl", "psl-fixed"), ("asl", "sl-fixed"), ("asl-slbudget", "sl-fixed"), ("asl-slbudget", "psl-fixed")],
    "3-sflga-ccc": [("sflga-ccc", "sflv2-fixed"), ("sflga-ccc", "psl-fixed"), ("sflga-ccc", "sflga-fixed")],
    "4-epsl": [("epsl-rm", "epsl-fixed"), ("epsl-rm", "psl-fixed")],
}
LABELS = {
    "edgesplit": "EdgeSplit (psl + planner edgesplit)",
    "asl": "ASL/OPEN (psl + planner asl)",
    "asl-slbudget": "ASL/OPEN, budgets = vanilla SL's energy",
    "sflga-ccc": "SFL-GA + CCC (sflga + planner ccc)",
    "epsl-rm": "EPSL + resource mgmt (epsl + planner epsl)",
    "psl-fixed": "PSL, best uniform cut",
    "sl-fixed": "vanilla SL, best fixed cut",
    "sflv2-fixed": "SFL-V2, best fixed cut",
    "sflga-fixed": "SFL-GA, best fixed cut (no CCC)",
    "epsl-fixed": "EPSL, even split, best fixed cut",
}


# ----------------------------------------------------------------------------- setup
def node_samples(common: dict) -> list[int]:
    """Samples each node trains per round (local epochs x its training partition)."""
    from apps.task import RunSettings, client_data

    settings = RunSettings(common)
    sizes = [len(client_data(settings, {"partition-id": i, "num-partitions": NODES})[0]) for i in range(NODES)]
    return [int(settings["local-epochs"]) * s for s in sizes]


def best_cuts(samples: list[int], rounds: int, phi: float) -> dict:
    """Per baseline scheme, the best uniform cut over rounds 1..R (mean latency) and all cut latencies."""
    from flsplit.planners import PlanningProblem, best_fixed_cut
    from flsplit.model.profile import profile_model
    from flsplit.sim.scenario_files import load_scenario
    from flsplit.model.zoo import build_model

    profile = profile_model(build_model(MODEL, 10, 1, 8), (1, 8, 8))
    scenario = load_scenario(SCENARIO)
    out = {}
    for scheme, kw in (("psl", {}), ("sl", {}), ("sflga", {}), ("epsl", {"phi": phi})):
        by_cut: dict[int, list[float]] = defaultdict(list)
        energy: dict[int, list[float]] = defaultdict(list)
        picks = []
        for r in range(1, rounds + 1):
            s = samples if scheme != "epsl" else [max(samples)] * len(samples)  # EPSL steps in lockstep
            problem = PlanningProblem.build(profile, scenario, samples=s, client_ids=list(range(NODES)), server_round=r)
            plan = best_fixed_cut(problem, scheme=scheme, **kw)
            picks.append(plan.cuts[0])
            for k, v in plan.details["latency_by_cut"].items():
                by_cut[int(k)].append(v)
                energy[int(k)].append(plan.details["energy_by_cut"][k])
        mean = {k: statistics.mean(v) for k, v in by_cut.items()}
        best = min(mean, key=lambda k: (mean[k], k))
        out[scheme] = {"cut": best, "per_round_picks": dict(Counter(picks)),
                       "mean_latency_by_cut": mean, "mean_energy_by_cut": {k: statistics.mean(v) for k, v in energy.items()}}
    # plan_fixed prices psl/sl/epsl/sflga; SFL-V2's traffic model is PSL's (the same bytes, FLOPs and
    # parallel timing per round: flsplit.sim.workload), so its best uniform cut is PSL's.
    out["sflv2"] = {**out["psl"], "note": "same traffic model as psl"}
    return out


def train_agent(path: Path, samples: int, rounds: int, episodes: int) -> dict:
    """Train the CCC agent with the CLI (8 clients, the run's samples and rounds); its output."""
    cmd = [str(Path(sys.executable).parent / "flsplit"), "plan", "--scenario", SCENARIO, "--model", MODEL,
           "--method", "ccc", "--train-agent", "--agent", str(path), "--clients", str(NODES), "--samples", str(samples),
           "--episodes", str(episodes), "--episode-rounds", str(rounds), "--rounds", str(rounds),
           "--first-round", "1", "--seed", "0", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    return {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0, "stderr": proc.stderr.strip(),
            "plan_cuts": [r["plan"]["cuts"][0] for r in result["rounds"]], "best_fixed_cut": result["best_fixed_cut"],
            "summary": result["summary"]}


def sl_energy_budgets(samples: list[int], rounds: int, cut: int) -> list[float]:
    """Each device's mean energy per round under vanilla SL at ``cut`` (rounds 1..R, client-part
    weights included): OPEN's budgets for the paper's comparison "under the same budgets as
    fixed-split SL" (OPEN's default budgets are the parallel best-fixed-cut round's energies)."""
    from flsplit.model.profile import profile_model
    from flsplit.sim.scenario_files import load_scenario
    from flsplit.sim import ElementWire, predict_workload, price
    from flsplit.model.zoo import build_model

    profile = profile_model(build_model(MODEL, 10, 1, 8), (1, 8, 8))
    scenario = load_scenario(SCENARIO)
    work = predict_workload("sl", profile, cuts=[cut] * NODES, samples=samples, client_ids=list(range(NODES)),
                            wire=ElementWire(profile, 4.0, include_weights=True))
    per_round = [[c.energy_j for c in price(work, scenario, server_round=r).clients] for r in range(1, rounds + 1)]
    return [statistics.mean(e[i] for e in per_round) for i in range(NODES)]


def configs(cuts: dict, phi: float, v: float, agent: Path, sl_budgets: list[float]) -> dict[str, dict]:
    return {
        "edgesplit": {"strategy": "psl", "planner": "edgesplit"},
        "asl": {"strategy": "psl", "planner": "asl", "planner-v": v},
        "asl-slbudget": {"strategy": "psl", "planner": "asl", "planner-v": v,
                         "planner-energy-budget": ",".join(f"{b:.6g}" for b in sl_budgets)},
        "sflga-ccc": {"strategy": "sflga", "planner": "ccc", "planner-agent": str(agent)},
        "epsl-rm": {"strategy": "epsl", "planner": "epsl", "phi": phi},
        "psl-fixed": {"strategy": "psl", "cut-layer": str(cuts["psl"]["cut"])},
        "sl-fixed": {"strategy": "sl", "cut-layer": str(cuts["sl"]["cut"])},
        "sflv2-fixed": {"strategy": "sflv2", "cut-layer": str(cuts["sflv2"]["cut"])},
        "sflga-fixed": {"strategy": "sflga", "cut-layer": str(cuts["sflga"]["cut"])},
        "epsl-fixed": {"strategy": "epsl", "phi": phi, "cut-layer": str(cuts["epsl"]["cut"])},
    }


# ----------------------------------------------------------------------------- one run
def run_one(job: tuple) -> tuple[str, int, str, float]:
    """One run of the ServerApp + ClientApps on the in-process grid; (name, seed, history path, wall s)."""
    name, seed, config, out_dir = job
    import torch
    from flwr.app import Context, RecordDict
    from flwr.common.logger import FLOWER_LOGGER

    torch.set_num_threads(1)
    FLOWER_LOGGER.setLevel(logging.WARNING)
    from apps.client_app import app as client_app
    from apps.server_app import app as server_app
    from flsplit.planes.inprocess import InProcessGrid

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    config = {**config, "seed": seed, "output-dir": str(out)}
    t0 = time.perf_counter()
    grid = InProcessGrid(client_app, NODES, run_config=config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (history,) = out.glob("*/history.json")
    return name, seed, str(history), time.perf_counter() - t0


# ----------------------------------------------------------------------------- analysis
def reprice(entry: dict, samples: list[int], profile, scenario, timing: str, allocation: str = "plan") -> "object":
    """The round's measured workload (from the history) priced with ``timing``.

    ``allocation``: ``"plan"`` the round's own (recorded) allocation; ``"even-radio"`` the plan's
    server CPU shares but an even split of the band at every device's maximum power and clock;
    ``"even-shares"`` the plan's radio allocation but the server CPU split evenly (1/N each).
    """
    from flsplit.sim import Allocation, measured_workload, price
    from flsplit.sim.workload import Timing

    sim = entry["sim"]
    nodes = sorted(sim["clients"], key=int)
    plan = entry.get("plan")
    if plan is not None:
        ids = [plan["nodes"][n]["client_id"] for n in nodes]
        smp = [plan["nodes"][n]["samples"] for n in nodes]
        rec = [plan["nodes"][n] for n in nodes]

        def pick(key):
            return tuple(r[key] for r in rec) if all(key in r for r in rec) else None

        alloc = Allocation(bandwidth_hz=pick("bandwidth_hz"), subchannels=pick("subchannels"),
                           tx_power_w=pick("tx_power_w"), cpu_hz=pick("cpu_hz"), server_cpu_share=pick("server_cpu_share"))
        if allocation == "even-radio":
            alloc = Allocation(server_cpu_share=alloc.server_cpu_share)
        elif allocation == "even-shares":
            alloc = Allocation(bandwidth_hz=alloc.bandwidth_hz, subchannels=alloc.subchannels, tx_power_w=alloc.tx_power_w,
                               cpu_hz=alloc.cpu_hz, server_cpu_share=(1.0 / len(nodes),) * len(nodes))
    else:  # the fixed baselines: client id = position of the node (in-process partition id), even split
        ids = [int(n) - 1000 for n in nodes]
        smp = [samples[i] for i in ids]
        alloc = None
    clients = [sim["clients"][n] for n in nodes]
    work = measured_workload(
        entry["scheme"].lower(), profile, client_ids=ids, cuts=[int(entry["cuts"][n]) for n in nodes],
        client_flops=[c["flops"] for c in clients], uplink_bytes=[c["uplink_bytes"] for c in clients],
        downlink_bytes=[c["downlink_bytes"] for c in clients], samples=smp, server_flops=sim["server_flops"],
        broadcast_bytes=sim["broadcast_bytes"], timing=Timing(sim["timing"]),
    )
    return price(work, scenario, alloc, server_round=int(entry["round"]), server_timing=timing)


def analyse(history_path: str, target: float, samples: list[int], profile, scenario) -> dict:
    h = json.loads(Path(history_path).read_text())
    rounds = sorted(h["rounds"], key=lambda r: r["round"])
    acc = [r["test_accuracy"] for r in rounds]
    lat = [r["sim"]["round_latency_s"] for r in rounds]
    energy = [r["sim"]["energy_j"] for r in rounds]
    recorded = rounds[0]["sim"]["server_timing"]
    alt = {}
    for timing in ("after-clients", "per-client"):
        costs = [reprice(r, samples, profile, scenario, timing) for r in rounds]
        alt[timing] = [c.round_latency_s for c in costs]
        if timing == recorded:  # re-pricing with the recorded timing gives the recorded numbers
            for c, l, e in zip(costs, lat, energy):
                assert math.isclose(c.round_latency_s, l, rel_tol=1e-9), (history_path, c.round_latency_s, l)
                assert math.isclose(c.total_energy_j, e, rel_tol=1e-9), (history_path, c.total_energy_j, e)
    reached = next((i for i, a in enumerate(acc) if a is not None and a >= target), None)
    # client-part weights in the uplink (sent back at round end): profile bytes at each client's cut
    weights = sum(profile.cut(int(r["cuts"][n])).client_param_bytes for r in rounds for n in r["sim"]["clients"])
    weight_share = weights / sum(c["uplink_bytes"] for r in rounds for c in r["sim"]["clients"].values())

    def cum_to(series):
        return None if reached is None else float(sum(series[: reached + 1]))

    # where the time and energy went: per device (client id), means over rounds
    per_dev: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    straggler = Counter()
    for r in rounds:
        clients = r["sim"]["clients"]
        slow = max(clients, key=lambda n: clients[n]["latency_s"])
        for n, c in clients.items():
            cid = r["plan"]["nodes"][n]["client_id"] if r.get("plan") else int(n) - 1000
            d = per_dev[cid]
            d["cut"].append(r["cuts"][n])
            for key in ("compute_latency_s", "uplink_latency_s", "downlink_latency_s", "server_latency_s", "latency_s",
                        "compute_energy_j", "transmit_energy_j", "energy_j", "uplink_bytes", "downlink_bytes",
                        "bandwidth_hz", "tx_power_w", "cpu_hz"):
                d[key].append(c[key])
            if n == slow:
                straggler[cid] += 1
            plan = r.get("plan")
            if plan:
                for key in ("server_cpu_share", "subchannels"):
                    if key in plan["nodes"][n]:
                        d[key].append(plan["nodes"][n][key])
    devices = {cid: {k: (statistics.mean(v) if k != "cut" else dict(Counter(v))) for k, v in d.items()}
               for cid, d in sorted(per_dev.items())}
    out = {
        "history": history_path,
        "strategy": h["run"]["strategy"], "planner": h["run"]["planner"],
        "server_timing": recorded,
        "rounds": len(rounds),
        "accuracy": acc,
        "final_accuracy": acc[-1], "best_accuracy": max(a for a in acc if a is not None),
        "rounds_to_target": None if reached is None else int(rounds[reached]["round"]),
        "sim_s_to_target": cum_to(lat),
        "sim_s_to_target_after_clients": cum_to(alt["after-clients"]),
        "sim_s_to_target_per_client": cum_to(alt["per-client"]),
        "mean_latency_s": statistics.mean(lat),
        "mean_latency_after_clients_s": statistics.mean(alt["after-clients"]),
        "mean_latency_per_client_s": statistics.mean(alt["per-client"]),
        "mean_energy_j": statistics.mean(energy),
        "median_latency_s": statistics.median(lat),
        "median_energy_j": statistics.median(energy),
        "max_latency_s": max(lat), "max_latency_round": int(rounds[lat.index(max(lat))]["round"]),
        "weight_share_of_uplink_bytes": weight_share,
        "mean_server_latency_s": statistics.mean(r["sim"]["server_latency_s"] for r in rounds),
        "mean_broadcast_latency_s": statistics.mean(r["sim"]["broadcast_latency_s"] for r in rounds),
        "mean_bytes_up": statistics.mean(r["bytes_up"] for r in rounds),
        "mean_bytes_down": statistics.mean(r["bytes_down"] for r in rounds),
        "wall_s": sum(r["wall_seconds"] for r in rounds),
        "straggler_counts": dict(straggler),
        "devices": devices,
        "cuts_per_round": [sorted(Counter(r["cuts"].values()).items()) for r in rounds],
    }
    plans = [r["plan"] for r in rounds if r.get("plan")]
    if plans:
        # counterfactuals on the same measured workload (same cuts): which part of the plan did what
        for cf in ("even-radio", "even-shares"):
            if cf == "even-shares" and "server_cpu_share" not in next(iter(plans[0]["nodes"].values())):
                continue
            costs = [reprice(r, samples, profile, scenario, recorded, cf) for r in rounds]
            out[f"cf_{cf}"] = {"mean_latency_s": statistics.mean(c.round_latency_s for c in costs),
                               "median_latency_s": statistics.median(c.round_latency_s for c in costs),
                               "mean_energy_j": statistics.mean(c.total_energy_j for c in costs)}
        # did the plan use DVFS or power control (below the device's maximum)?
        lowered = Counter()
        for r in rounds:
            for n, c in r["sim"]["clients"].items():
                dev = scenario.device(r["plan"]["nodes"][n]["client_id"])
                lowered["cpu"] += c["cpu_hz"] < dev.cpu_hz * (1 - 1e-6)
                lowered["power"] += c["tx_power_w"] < dev.tx_power_w * (1 - 1e-6)
                lowered["of"] += 1
        out["below_max"] = dict(lowered)
        out["planner_own_latency_mean_s"] = statistics.mean(p["planner_latency_s"] for p in plans)
        out["planner_own_latency_median_s"] = statistics.median(p["planner_latency_s"] for p in plans)
        out["mean_planning_s"] = statistics.mean(p["planning_s"] for p in plans)
        out["mean_predicted_latency_s"] = statistics.mean(p["predicted_latency_s"] for p in plans)
        out["mean_predicted_energy_j"] = statistics.mean(p["predicted_energy_j"] for p in plans)
        if "energy_budget_j" in plans[0]:
            out["energy_budget_j"] = plans[0]["energy_budget_j"]
            out["queues_after_last"] = plans[-1].get("queues_after")
            out["measured_energy_mean_by_device"] = [
                statistics.mean(p["measured_energy_j"][i] for p in plans) for i in range(len(plans[0]["measured_energy_j"]))]
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def aggregate(per_seed: list[dict]) -> dict:
    keys = ("final_accuracy", "best_accuracy", "rounds_to_target", "sim_s_to_target", "sim_s_to_target_after_clients",
            "sim_s_to_target_per_client", "mean_latency_s", "mean_latency_after_clients_s", "mean_latency_per_client_s",
            "mean_energy_j", "median_latency_s", "median_energy_j")
    agg = {}
    for k in keys:
        vals = [s[k] for s in per_seed]
        known = [v for v in vals if v is not None]
        agg[k] = {"mean": _mean(vals), "min": min(known) if known else None, "max": max(known) if known else None,
                  "reached": len(known), "of": len(vals), "values": vals}
    return agg


def fmt(stat: dict, digits: int, spread: bool = True) -> str:
    if stat["mean"] is None:
        return f"not reached (0/{stat['of']})"
    text = f"{stat['mean']:.{digits}f}"
    if spread and stat["of"] > 1:
        text += f" [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"
    if stat["reached"] < stat["of"]:
        text += f" ({stat['reached']}/{stat['of']} seeds)"
    return text


def table(results: dict, target: float, cut: int) -> str:
    head = ("| group | run | cuts | server timing (recorded) | rounds to {t} | sim s to {t} (recorded) "
            "| sim s to {t}, after-clients / per-client | final acc | best acc | mean round latency s (recorded) "
            "| mean latency s, after-clients / per-client | median round latency s (recorded) "
            "| device energy J / round (8 devices summed), mean | same, median |").format(t=target)
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for group, names in GROUPS.items():
        for name in names:
            r = results[name]
            a = r["agg"]
            first = r["seeds"][0]
            if first["planner"] == "none":
                cuts = f"{cut} (all)"
            else:
                counts = Counter()
                for s in r["seeds"]:
                    for rnd in s["cuts_per_round"]:
                        for c, k in rnd:
                            counts[c] += k
                total = sum(counts.values())
                cuts = ", ".join(f"{c}: {100 * k / total:.0f}%" for c, k in sorted(counts.items()))
            alt_t = (f"{fmt(a['sim_s_to_target_after_clients'], 1, False)} / {fmt(a['sim_s_to_target_per_client'], 1, False)}")
            alt_l = f"{a['mean_latency_after_clients_s']['mean']:.3f} / {a['mean_latency_per_client_s']['mean']:.3f}"
            lines.append(
                f"| {group} | {LABELS[name]} | {cuts} | {first['server_timing']} | {fmt(a['rounds_to_target'], 1)} "
                f"| {fmt(a['sim_s_to_target'], 1)} | {alt_t} | {fmt(a['final_accuracy'], 4)} | {fmt(a['best_accuracy'], 4)} "
                f"| {fmt(a['mean_latency_s'], 3, False)} | {alt_l} | {fmt(a['median_latency_s'], 3, False)} "
                f"| {fmt(a['mean_energy_j'], 4, False)} | {fmt(a['median_energy_j'], 4, False)} |")
    return "\n".join(lines)


def _pct(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{100 * (a / b - 1):+.1f} %"


def effects_table(results: dict) -> str:
    """Each adaptive run against each of its baselines: relative changes (means over seeds)."""
    head = ("| group | adaptive vs baseline | mean latency, after-clients / per-client | median latency (recorded) "
            "| mean energy | median energy | sim s to T, after-clients / per-client | rounds to T (adaptive / baseline) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for group, names in GROUPS.items():
        for adaptive, base in EFFECTS[group]:
            a, b = results[adaptive]["agg"], results[base]["agg"]
            m = lambda agg, k: agg[k]["mean"]  # noqa: E731
            lines.append(
                f"| {group} | {adaptive} vs {base} "
                f"| {_pct(m(a, 'mean_latency_after_clients_s'), m(b, 'mean_latency_after_clients_s'))} / "
                f"{_pct(m(a, 'mean_latency_per_client_s'), m(b, 'mean_latency_per_client_s'))} "
                f"| {_pct(m(a, 'median_latency_s'), m(b, 'median_latency_s'))} "
                f"| {_pct(m(a, 'mean_energy_j'), m(b, 'mean_energy_j'))} | {_pct(m(a, 'median_energy_j'), m(b, 'median_energy_j'))} "
                f"| {_pct(m(a, 'sim_s_to_target_after_clients'), m(b, 'sim_s_to_target_after_clients'))} / "
                f"{_pct(m(a, 'sim_s_to_target_per_client'), m(b, 'sim_s_to_target_per_client'))} "
                f"| {fmt(a['rounds_to_target'], 1, False)} / {fmt(b['rounds_to_target'], 1, False)} |")
    return "\n".join(lines)


def diagnostics_table(results: dict) -> str:
    """Per adaptive run (seed means): what the planner expected, what the round cost, and counterfactuals."""
    head = ("| run | planner's own latency s, mean / median | measured latency s, mean / median "
            "| same cuts, even radio split: latency s mean / median, energy J | same plan, even server CPU shares: latency s "
            "| client-part weights / uplink bytes | devices below max clock / power (of device-rounds) "
            "| OPEN: worst device mean energy / budget (device) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for name, r in results.items():
        seeds = r["seeds"]
        if seeds[0]["planner"] == "none":
            lines.append(f"| {name} | - | {statistics.mean(s['mean_latency_s'] for s in seeds):.3f} / "
                         f"{statistics.mean(s['median_latency_s'] for s in seeds):.3f} | - | - "
                         f"| {statistics.mean(s['weight_share_of_uplink_bytes'] for s in seeds):.1%} | - | - |")
            continue
        mean = lambda f: statistics.mean(f(s) for s in seeds)  # noqa: E731
        radio = (f"{mean(lambda s: s['cf_even-radio']['mean_latency_s']):.3f} / "
                 f"{mean(lambda s: s['cf_even-radio']['median_latency_s']):.3f}, "
                 f"{mean(lambda s: s['cf_even-radio']['mean_energy_j']):.4f}")
        shares = (f"{mean(lambda s: s['cf_even-shares']['mean_latency_s']):.3f}" if "cf_even-shares" in seeds[0] else "-")
        below = seeds[0]["below_max"]
        budget = "-"
        if "energy_budget_j" in seeds[0]:
            ratios = [statistics.mean(s["measured_energy_mean_by_device"][i] / s["energy_budget_j"][i] for s in seeds)
                      for i in range(len(seeds[0]["energy_budget_j"]))]
            worst = max(range(len(ratios)), key=ratios.__getitem__)
            budget = f"{ratios[worst]:.2f} (client {worst})"
        lines.append(
            f"| {name} | {mean(lambda s: s['planner_own_latency_mean_s']):.3f} / {mean(lambda s: s['planner_own_latency_median_s']):.3f} "
            f"| {mean(lambda s: s['mean_latency_s']):.3f} / {mean(lambda s: s['median_latency_s']):.3f} | {radio} | {shares} "
            f"| {mean(lambda s: s['weight_share_of_uplink_bytes']):.1%} | {below['cpu']} / {below['power']} (of {below['of']}) "
            f"| {budget} |")
    return "\n".join(lines)


def per_seed_table(results: dict, seeds: list[int]) -> str:
    head = "| run | " + " | ".join(f"seed {s}: rounds to T / sim s to T / final acc" for s in seeds) + " |"
    lines = [head, "|" + "|".join(["---"] * (len(seeds) + 1)) + "|"]
    for name, r in results.items():
        cells = []
        for s in r["seeds"]:
            rt = "-" if s["rounds_to_target"] is None else str(s["rounds_to_target"])
            st = "-" if s["sim_s_to_target"] is None else f"{s['sim_s_to_target']:.1f}"
            cells.append(f"{rt} / {st} / {s['final_accuracy']:.4f}")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reports(out: Path, runs: dict, seed: int, target: float) -> dict[str, list[str]]:
    """``flsplit report`` of each group (seed ``seed``); the files it wrote."""
    written = {}
    for group, names in GROUPS.items():
        dest = out / f"report-{group}"
        cmd = [str(Path(sys.executable).parent / "flsplit"), "report", *[runs[(n, seed)] for n in names],
               "--out", str(dest), "--target", str(target)]
        for n in names:
            cmd += ["--label", LABELS[n]]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        written[group] = sorted(os.path.relpath(p, ROOT) for p in dest.iterdir())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--phi", type=float, default=0.5)
    parser.add_argument("--V", type=float, default=0.01)
    parser.add_argument("--episodes", type=int, default=600, help="CCC agent training episodes")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, 1 torch thread each)")
    parser.add_argument("--only", default="", help="comma list of run names (default: all)")
    parser.add_argument("--plot-seed", type=int, default=None, help="seed whose runs the reports plot (default: first)")
    parser.add_argument("--analyse-only", action="store_true", help="reuse the histories under --out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "adaptive")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    common = {"cost-scenario": SCENARIO, "model": MODEL, "dataset": "digits", "num-server-rounds": args.rounds,
              "local-epochs": 1, "batch-size": 32, "learning-rate": 0.1, "momentum": 0.9, "fraction-train": 1.0,
              "fraction-evaluate": 0.0, "min-available-nodes": NODES}
    samples = node_samples(common)
    cuts = best_cuts(samples, args.rounds, args.phi)
    print(f"samples per node per round: {samples}")
    for scheme, c in cuts.items():
        lat = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(c["mean_latency_by_cut"].items()))
        print(f"best uniform cut for {scheme}: {c['cut']} (per-round picks {c['per_round_picks']}; mean s by cut {lat})")

    agent = out / "ccc-agent.pt"
    agent_info = None
    sl_budgets = sl_energy_budgets(samples, args.rounds, cuts["sl"]["cut"])
    print("vanilla SL's mean energy per device and round (J): " + ", ".join(f"{b:.4g}" for b in sl_budgets))
    cfgs = configs(cuts, args.phi, args.V, agent, sl_budgets)
    names = [n for n in cfgs if not args.only or n in args.only.split(",")]
    if not args.analyse_only:
        if "sflga-ccc" in names:
            agent_info = train_agent(agent, max(samples), args.rounds, args.episodes)
            print(f"CCC agent: {agent_info['stderr']} ({agent_info['seconds']:.1f} s incl. planning); "
                  f"its plan over rounds 1..{args.rounds}: cuts {agent_info['plan_cuts']}")
            (out / "ccc-agent.json").write_text(json.dumps(agent_info, indent=1))
        jobs = [(n, s, {**common, **cfgs[n]}, str(out / n / f"seed{s}")) for s in seeds for n in names]
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            for name, seed, path, wall in pool.imap_unordered(run_one, jobs):
                print(f"  done {name} seed {seed} in {wall:.1f} s: {path}", flush=True)
    elif (out / "ccc-agent.json").exists():
        agent_info = json.loads((out / "ccc-agent.json").read_text())

    from flsplit.model.profile import profile_model
    from flsplit.sim.scenario_files import load_scenario
    from flsplit.model.zoo import build_model

    profile = profile_model(build_model(MODEL, 10, 1, 8), (1, 8, 8))
    scenario = load_scenario(SCENARIO)
    runs, results = {}, {}
    for n in names:
        per_seed = []
        for s in seeds:
            (path,) = (out / n / f"seed{s}").glob("*/history.json")
            runs[(n, s)] = str(path)
            per_seed.append(analyse(str(path), args.target, samples, profile, scenario))
        results[n] = {"config": cfgs[n], "seeds": per_seed, "agg": aggregate(per_seed)}
    cut = cuts["psl"]["cut"]
    md = table(results, args.target, cut) if all(n in results for g in GROUPS.values() for n in g) else ""
    print()
    print(md)
    extra = ""
    if md:
        extra = effects_table(results) + "\n\n" + diagnostics_table(results)
        print()
        print(extra)
    print()
    print(per_seed_table(results, seeds))
    plots = {}
    if md:
        plots = reports(out, runs, args.plot_seed if args.plot_seed is not None else seeds[0], args.target)
        print("\nflsplit report outputs:")
        for group, files in plots.items():
            print(f"  {group}: " + ", ".join(files))
    (out / "table.md").write_text(md + "\n\n" + extra + "\n\n" + per_seed_table(results, seeds) + "\n")
    (out / "results.json").write_text(json.dumps({
        "settings": {**common, "nodes": NODES, "seeds": seeds, "target": args.target, "phi": args.phi, "V": args.V},
        "samples_per_node": samples, "best_cuts": cuts, "sl_energy_budgets_j": sl_budgets, "ccc_agent": agent_info, "results": results, "plots": plots,
        "bench_wall_s": time.perf_counter() - t_start,
    }, indent=1, default=str))
    print(f"\nwrote {out / 'table.md'} and {out / 'results.json'} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
