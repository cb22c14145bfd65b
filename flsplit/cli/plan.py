"""Plan cuts and wireless resources for a scenario (the ``flsplit plan`` command).

``flsplit plan --scenario FILE --model NAME --method {epsl,edgesplit,asl,ccc,fixed} [--rounds R]``
profiles the model (torch's FLOP counter, per cut), loads the scenario (a shipped name such
as ``heterogeneous`` or a TOML file) and runs the planner for rounds ``0 .. R-1`` (the
fading changes every round). For each round it prints the plan per client (cut, bandwidth or
subchannels, transmit power, server CPU share, latency and energy) and the predicted round
latency and device energy, next to the **best fixed cut** (one cut for everyone, resources
split evenly: ``flsplit.planners.plan_fixed``; the cut with the lowest mean latency over the
rounds). ``--json`` prints one JSON document instead.

Methods:

- ``fixed``: one cut for everyone (``--cut``; default the best fixed cut), even split.
- ``edgesplit``: a cut and a bandwidth share per client minimising the makespan.
- ``epsl``: one cut, OFDMA subchannels and uplink powers minimising EPSL's round latency
  (``--phi``; optional ``--energy-budget``). Needs an OFDMA scenario.
- ``asl``: OPEN, online cuts and server CPU shares under per-device long-term energy budgets
  (``--V``; ``--energy-budget``, default: each device's energy at the best fixed cut, so the
  comparison is under the same budgets). The queues carry over the rounds.
- ``ccc``: SFL-GA's cut chosen each round by a Double-DQN agent (``--agent PATH``), then a
  convex bandwidth / power / CPU allocation. ``--train-agent`` trains one on the simulator
  first and saves it to ``--agent``.

``epsl`` with ``--energy-budget`` solves a convex program with cvxpy (``pip install
"flsplit[planners]"``); without it the command exits 1 with that install command.

Exit status: 0 on success, 1 on a planning error (an infeasible budget, a scenario the
method cannot use, a missing optional dependency: the message says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from flsplit.cli.args import int_at_least
from flsplit.planners.registry import PLANNERS, PlanInputs, planner_entry
from flsplit.sim.checks import budget_array, cut_arg

__all__ = ["METHODS", "PlanSetup", "add_arguments", "handle", "model_profile", "run_plans"]

METHODS = tuple(PLANNERS)  # the one registry of planners (flsplit.planners.registry)

# Sample shape of each zoo model's usual dataset (digits 8x8, MNIST 28x28, CIFAR-10 32x32).
_INPUT_SHAPES = {"digits-cnn": (1, 8, 8), "lenet": (1, 28, 28)}
_DEFAULT_INPUT_SHAPE = (3, 32, 32)


def default_input_shape(model: str) -> tuple[int, ...]:
    """The sample shape a zoo model is profiled with unless ``--input-shape`` says otherwise."""
    from flsplit.data.text import SEQ_LEN
    from flsplit.model.zoo import TEXT_MODELS

    if model in TEXT_MODELS:
        return (SEQ_LEN,)
    return _INPUT_SHAPES.get(model, _DEFAULT_INPUT_SHAPE)


def model_profile(model: str, input_shape: Optional[Sequence[int]] = None):
    """Build a zoo model and measure its per-cut profile (``flsplit.model.profile.profile_model``)."""
    from flsplit.model.profile import profile_model
    from flsplit.model.zoo import build_model

    from flsplit.data.text import VOCAB_SIZE
    from flsplit.model.zoo import TEXT_MODELS

    shape = default_input_shape(model) if input_shape is None else tuple(input_shape)
    if model in TEXT_MODELS:
        if len(shape) != 1:
            raise ValueError(f"{model} reads token sequences: its input shape is T (tokens), got {shape}")
        return profile_model(build_model(model, num_classes=VOCAB_SIZE, seq_len=shape[0]), shape)
    if len(shape) != 3:
        raise ValueError(f"{model} reads images: its input shape is C,H,W, got {shape}")
    c, h, w = shape
    if h != w:
        raise ValueError(f"input shape must be square (C,H,H), got {c},{h},{w}")
    net = build_model(model, num_classes=10, in_channels=c, image_size=h)
    return profile_model(net, (c, h, w))




@dataclass
class PlanSetup:
    """Everything a planning run needs (the parsed command line, made explicit)."""

    method: str
    profile: Any
    scenario: Any
    num_clients: int
    samples: int
    rounds: int = 1
    first_round: int = 0
    bytes_per_element: float = 4.0
    cut: Optional[int] = None
    phi: float = 0.0
    V: float = 0.01
    energy_budget_j: Optional[list[float]] = None
    agent_path: Optional[Path] = None


def _budgets(values: Optional[list[float]], n: int) -> Optional[list[float]]:
    """``--energy-budget``: one budget for all clients or one per client (``budget_array``'s checks)."""
    if values is None:
        return None
    try:
        return budget_array(values[0] if len(values) == 1 else values, n).tolist()
    except ValueError as err:
        raise ValueError(f"--energy-budget: {err}") from None


def baseline_plans(setup: PlanSetup) -> tuple[int, list]:
    """The best fixed cut over the rounds (lowest mean latency) and its plan in each round."""
    from flsplit.planners.fixed import plan_fixed
    from flsplit.planners.problem import PlanningProblem

    samples = [setup.samples] * setup.num_clients
    rounds = range(setup.first_round, setup.first_round + setup.rounds)
    scheme = planner_entry(setup.method).scheme
    phi = setup.phi if scheme == "epsl" else 0.0
    problems = [PlanningProblem.build(setup.profile, setup.scenario, samples=samples, server_round=r,
                                      bytes_per_element=setup.bytes_per_element) for r in rounds]
    by_cut = {
        k: [
            plan_fixed(problem, cut=k, scheme=scheme, phi=phi)
            for problem in problems
        ]
        for k in range(1, len(setup.profile.blocks))
    }
    best = min(by_cut, key=lambda k: (sum(p.latency_s for p in by_cut[k]), k))
    return best, by_cut[best]


def _method(text: str) -> str:
    """``--method``: a planner of the one registry (read when the command runs: registered ones too)."""
    try:
        return planner_entry(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_FLAGS = {"cut": "--cut", "phi": "--phi", "energy_budget_j": "--energy-budget", "V": "--V", "agent_path": "--agent"}


def _planner(setup: PlanSetup, baseline: list) -> Callable[[int], Any]:
    """A function from the round number to that round's plan, for ``setup.method`` (its
    ``rounds`` driver in the one registry); options the method does not read are refused."""
    entry = planner_entry(setup.method)
    inputs = PlanInputs(setup.profile, setup.scenario, [setup.samples] * setup.num_clients, setup.bytes_per_element,
                        cut=setup.cut, phi=setup.phi, V=setup.V, agent_path=setup.agent_path,
                        energy_budget_j=_budgets(setup.energy_budget_j, setup.num_clients), baseline=baseline)
    for option in inputs.given():
        if option not in entry.options:
            takers = [name for name, e in PLANNERS.items() if option in e.options]
            raise ValueError(f"{_FLAGS[option]} applies to --method {'/'.join(takers)} only, not {setup.method}")
    return entry.rounds(inputs)


def cost_model_price(setup: PlanSetup, plan, server_round: int, server_timing: str = "after-clients"):
    """The one price (``flsplit.sim.price``) of the plan's predicted workload with its allocation.

    Every method is compared with the baseline at the same server timing: by default the
    common one, the server computing after the slowest client's chain. EdgeSplit's and OPEN's
    own models place the server per client instead (a full-speed worker per client; shares of
    the server CPU): that is the ``per-client`` option of the same price, shown beside.
    """
    from flsplit.sim import Allocation, ElementWire, predict_workload, price

    n = len(plan.cuts)
    scheme = planner_entry(setup.method).scheme
    ids = plan.details.get("client_ids") or list(range(n))
    work = predict_workload(
        scheme, setup.profile, cuts=plan.cuts, samples=[setup.samples] * n, client_ids=ids,
        phi=setup.phi if scheme == "epsl" else 0.0, wire=ElementWire(setup.profile, setup.bytes_per_element),
    )
    alloc = Allocation.from_plan(plan)
    if setup.method == "fixed" or scheme == "sl":  # the baseline: an even split at full power
        alloc = Allocation()
    elif setup.method not in ("epsl", "ccc"):  # only EPSL and CCC control the transmit power
        alloc = Allocation(bandwidth_hz=alloc.bandwidth_hz, subchannels=alloc.subchannels,
                           server_cpu_share=alloc.server_cpu_share)
    return price(work, setup.scenario, alloc, server_round=server_round, server_timing=server_timing)


def run_plans(setup: PlanSetup) -> dict:
    """Plan every round and compare with the best fixed cut.

    Returns
    -------
    dict
        ``method``, ``scheme``, ``clients``, ``samples``, ``best_fixed_cut``, ``rounds`` (per
        round: the plan as a dict with the planner's own prediction, ``latency_s`` and
        ``energy_j`` of the plan under the common cost model, the baseline's, the planning
        seconds) and ``summary`` (mean cost-model latency and energy of the plans and of the
        baseline, and the change in percent).
    """
    best_cut, baseline = baseline_plans(setup)
    plan_round = _planner(setup, baseline)
    rounds = []
    for r, base in zip(range(setup.first_round, setup.first_round + setup.rounds), baseline):
        start = time.perf_counter()
        plan = plan_round(r)
        seconds = time.perf_counter() - start
        for name, value in (("latency", plan.latency_s), ("energy", plan.energy_j)):
            if not math.isfinite(value):  # a planner bug, never a result
                raise RuntimeError(f"round {r}: the {setup.method} planner returned a non-finite {name}")
        priced = cost_model_price(setup, plan, r)
        rounds.append({
            "round": r,
            "plan": plan.as_dict(),
            "planning_s": seconds,
            "latency_s": priced.round_latency_s,
            "energy_j": priced.total_energy_j,
            "baseline_latency_s": base.latency_s,
            "baseline_energy_j": base.energy_j,
        })
    mean = lambda key: sum(x[key] for x in rounds) / len(rounds)  # noqa: E731
    latency, energy = mean("latency_s"), mean("energy_j")
    base_latency, base_energy = mean("baseline_latency_s"), mean("baseline_energy_j")
    return {
        "method": setup.method,
        "scheme": planner_entry(setup.method).scheme,
        "clients": setup.num_clients,
        "samples": setup.samples,
        "bytes_per_element": setup.bytes_per_element,
        "best_fixed_cut": best_cut,
        "rounds": rounds,
        "summary": {
            "mean_latency_s": latency,
            "mean_energy_j": energy,
            "baseline_mean_latency_s": base_latency,
            "baseline_mean_energy_j": base_energy,
            "latency_change_pct": 100.0 * (latency / base_latency - 1.0),
            "energy_change_pct": 100.0 * (energy / base_energy - 1.0) if base_energy > 0 else 0.0,
            "mean_planning_s": mean("planning_s"),
        },
    }


def _cell(values: Optional[list], i: int, fmt: str) -> str:
    width = int(fmt.split(".")[0].rstrip("dfg"))
    return "-".rjust(width) if values is None else format(values[i], fmt)


def format_round(entry: dict) -> str:
    """One round as text: a header line and a row per client."""
    plan = entry["plan"]
    d = plan["details"]
    timing = plan.get("server_timing") or "after-clients"
    own = ""
    if timing != "after-clients":  # the same price, under the planner's own server model
        own = f"with the planner's server timing '{timing}': {plan['latency_s']:.4g} s, {plan['energy_j']:.4g} J; "
    objective = d.get("objective_latency_s")
    if objective is not None and not math.isclose(objective, plan["latency_s"], rel_tol=1e-9):
        own += f"its search objective: {objective:.4g} s; "
    lines = [
        f"round {entry['round']}: latency {entry['latency_s']:.4g} s, energy {entry['energy_j']:.4g} J "
        f"(server after the clients; {own}best fixed cut: "
        f"{entry['baseline_latency_s']:.4g} s, {entry['baseline_energy_j']:.4g} J; "
        f"planned in {entry['planning_s'] * 1e3:.1f} ms)",
        f"{'client':>6} {'cut':>4} {'band MHz':>9} {'subch':>6} {'power W':>8} {'cpu share':>9} "
        f"{'latency s':>10} {'energy J':>10}   (per client, as the planner reports)",
    ]
    per_latency = d.get("client_latency_s") or d.get("finish_s")
    per_energy = d.get("energy_per_client_j")
    band = [b / 1e6 for b in plan["bandwidth_hz"]] if plan["bandwidth_hz"] is not None else None
    ids = d.get("client_ids") or list(range(len(plan["cuts"])))
    for i, cut in enumerate(plan["cuts"]):
        lines.append(
            f"{ids[i]:>6} {cut:>4} {_cell(band, i, '9.4f')} {_cell(plan['subchannels'], i, '6d')} "
            f"{_cell(plan['tx_power_w'], i, '8.4f')} {_cell(plan['server_cpu_share'], i, '9.4f')} "
            f"{_cell(per_latency if isinstance(per_latency, list) else None, i, '10.4g')} "
            f"{_cell(per_energy if isinstance(per_energy, list) else None, i, '10.4g')}"
        )
    return "\n".join(lines)


def format_text(result: dict, header: str) -> str:
    """The whole planning run as text."""
    out = [header]
    for entry in result["rounds"]:
        out += ["", format_round(entry)]
    s = result["summary"]
    out += [
        "",
        f"mean over {len(result['rounds'])} round(s): latency {s['mean_latency_s']:.4g} s, "
        f"energy {s['mean_energy_j']:.4g} J; best fixed cut {result['best_fixed_cut']}: "
        f"{s['baseline_mean_latency_s']:.4g} s, {s['baseline_mean_energy_j']:.4g} J "
        f"(latency {s['latency_change_pct']:+.1f} %, energy {s['energy_change_pct']:+.1f} %)",
    ]
    return "\n".join(out)


_positive_int = int_at_least(1)
_nonnegative_int = int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _float_list(text: str) -> list[float]:
    return [_finite_float(t) for t in text.split(",")]


def _shape(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected C,H,W (images) or T (a text model's tokens), got {text!r}")
    return tuple(_positive_int(p) for p in parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` arguments to ``parser`` and set its handler."""
    parser.description = __doc__.split("\n\n")[0].replace("``", "")
    parser.epilog = ("Every plan is priced once (flsplit.sim.price) and compared with the best fixed cut with the "
                     "server computing after the clients; the price under the planner's own server timing is shown beside.")
    parser.add_argument("--scenario", required=True,
                        help="shipped scenario name (homogeneous, heterogeneous) or a scenario TOML file")
    parser.add_argument("--model", required=True, help="zoo model name (digits-cnn, lenet, vgg11, resnet18, ...)")
    parser.add_argument("--method", required=True, type=_method, help=f"the planner: one of {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=_positive_int, default=1, help="rounds to plan (default 1)")
    parser.add_argument("--first-round", type=_nonnegative_int, default=0,
                        help="number of the first round (keys the fading; default 0)")
    parser.add_argument("--clients", type=_positive_int, default=None,
                        help="clients per round (default: the scenario's number of devices)")
    parser.add_argument("--samples", type=_positive_int, default=64,
                        help="samples each client processes per round (default 64)")
    parser.add_argument("--input-shape", type=_shape, default=None,
                        help="sample shape C,H,W, or T tokens for a text model (default: the model's dataset, "
                             "e.g. 1,28,28 for lenet, 64 for gpt-tiny)")
    parser.add_argument("--bytes-per-element", type=_finite_float, default=4.0,
                        help="wire bytes per smashed element: 4 fp32, 2 fp16/bf16, 1 fp8/int8 (default 4)")
    parser.add_argument("--cut", type=_positive_int, default=None, help="fixed: the cut (default: the best fixed cut)")
    parser.add_argument("--phi", type=_finite_float, default=0.0, help="epsl: aggregated fraction phi (default 0)")
    parser.add_argument("--V", type=_finite_float, default=0.01,
                        help="asl: Lyapunov latency weight V, in J^2/s (default 0.01)")
    parser.add_argument("--energy-budget", type=_float_list, default=None, metavar="J[,J...]",
                        help="per-round device energy budget in J, one for all or one per client "
                             "(asl: long-term average; epsl/ccc: per round)")
    parser.add_argument("--agent", type=Path, default=None, help="ccc: the trained agent file")
    parser.add_argument("--train-agent", action="store_true",
                        help="ccc: train an agent on the simulator and save it to --agent before planning")
    parser.add_argument("--episodes", type=_positive_int, default=600,
                        help="--train-agent: episodes (default 600: with 30 cuts, 200 left the agent off the "
                             "best cut in a quarter of the rounds)")
    parser.add_argument("--episode-rounds", type=_positive_int, default=20,
                        help="--train-agent: rounds per episode (default 20)")
    parser.add_argument("--min-client-depth", type=_positive_int, default=1,
                        help="--train-agent: privacy bound, the least number of blocks a client keeps (default 1)")
    parser.add_argument("--seed", type=_nonnegative_int, default=0, help="--train-agent: seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    parser.set_defaults(handler=handle)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays as plain numbers and lists (for ``json.dumps``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def handle(args: argparse.Namespace) -> int:
    """Handler of ``flsplit plan``: plan, print, return the exit status."""
    from flsplit.extras import MissingExtra
    from flsplit.sim.scenario_files import load_scenario

    def fail(message: str) -> int:
        print(f"flsplit plan: error: {message}", file=sys.stderr)
        return 1

    if args.train_agent and args.method != "ccc":
        return fail("--train-agent trains the ccc agent: use it with --method ccc")
    if args.train_agent and args.agent is None:
        return fail("--train-agent needs --agent PATH to save the agent to")
    try:
        scenario = load_scenario(args.scenario)
        profile = model_profile(args.model, args.input_shape)
        n = args.clients if args.clients is not None else len(scenario.devices)
        if args.cut is not None:
            cut_arg("--cut", args.cut, len(profile.blocks))
        if args.train_agent:
            from flsplit.planners import CCCEnvironment, PlanningProblem, train_ccc_agent

            start = time.perf_counter()
            problem = PlanningProblem.build(profile, scenario, samples=[args.samples] * n,
                                            bytes_per_element=args.bytes_per_element)
            env = CCCEnvironment(problem, min_client_depth=args.min_client_depth, num_rounds=args.episode_rounds,
                                 energy_budget_j=_budgets(args.energy_budget, n))
            agent = train_ccc_agent(env, episodes=args.episodes, seed=args.seed)
            args.agent.parent.mkdir(parents=True, exist_ok=True)
            agent.save(args.agent)
            print(f"trained the ccc agent in {time.perf_counter() - start:.1f} s; saved to {args.agent}",
                  file=sys.stderr)
        setup = PlanSetup(
            method=args.method, profile=profile, scenario=scenario, num_clients=n, samples=args.samples,
            rounds=args.rounds, first_round=args.first_round, bytes_per_element=args.bytes_per_element,
            cut=args.cut, phi=args.phi, V=args.V, energy_budget_j=args.energy_budget, agent_path=args.agent,
        )
        result = run_plans(setup)
    except (ValueError, MissingExtra) as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"cannot read or write {err.filename or 'a file'}: {err.strerror or err}")
    result.update({"model": args.model, "scenario": scenario.name or str(args.scenario)})
    if args.json:
        print(json.dumps(result, indent=2, default=_jsonable))
    else:
        header = (f"flsplit plan: method {args.method}, model {args.model} ({len(profile.blocks)} blocks), "
                  f"scenario {result['scenario']}, {n} clients x {args.samples} samples, {args.rounds} round(s)")
        print(format_text(result, header))
    return 0
