"""One price, three traffic models: how far the planners' approximation is from a real round.

For each scheme, one round of the project's ServerApp and ClientApps (in-process grid, the
embedded digits, 4 nodes, digits-cnn, the edge-diverse scenario) is priced from what it
measured, and the same round is predicted from the configuration with three wire models:

- ``SerializedWire``: the wire's own byte counts (headers, labels, scales, client-part weights);
- ``ElementWire(include_weights=True)``: smashed elements x 4 bytes plus the client part's weights;
- ``ElementWire()``: smashed elements x 4 bytes only (the classic planners' model).

Each is priced by ``flsplit.sim.price`` with the same (default) allocation; the table gives
each prediction's round latency and energy relative to the measured round.

Run: ``python benchmarks/bench_one_price.py``
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from apps.client_app import app as client_app  # noqa: E402
from apps.server_app import app as server_app  # noqa: E402
from apps.task import RunSettings, client_data  # noqa: E402
from flsplit.planes.inprocess import InProcessGrid  # noqa: E402
from flsplit.model.profile import profile_model  # noqa: E402
from flsplit.sim.scenario_files import load_scenario  # noqa: E402
from flsplit.sim import ElementWire, predict_workload, price  # noqa: E402
from flsplit.wire.wire_bytes import SerializedWire  # noqa: E402
from flsplit.model.zoo import build_model  # noqa: E402

NODES, BATCH = 4, 32
SCHEMES = [("psl", {"cut-layer": "1,7"}), ("sl", {"cut-layer": "3"}), ("sflv2", {"cut-layer": "3"}),
           ("sflga", {"cut-layer": "3"}), ("epsl", {"cut-layer": "3", "phi": 0.5})]


def run(scheme: str, extra: dict, out: Path) -> dict:
    config = {"strategy": scheme, "num-server-rounds": 1, "cost-scenario": "edge-diverse", "output-dir": str(out),
              "batch-size": BATCH, **extra}
    grid = InProcessGrid(client_app, NODES, run_config=config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    (path,) = out.glob("*/history.json")
    return json.loads(path.read_text())["rounds"][0]


def main() -> None:
    torch.set_num_threads(1)
    model = build_model("digits-cnn", 10, 1, 8)
    profile = profile_model(model, (1, 8, 8))
    scenario = load_scenario("edge-diverse")
    sizes = [len(client_data(RunSettings({}), {"partition-id": i, "num-partitions": NODES})[0]) for i in range(NODES)]
    wires = {"serialized": SerializedWire(model, (1, 8, 8)), "elements+weights": ElementWire(profile, 4.0, True),
             "elements": ElementWire(profile, 4.0)}
    print("| scheme | measured latency s | measured energy J | " + " | ".join(f"{w} latency / energy" for w in wires) + " |")
    print("|---|---|---|" + "---|" * len(wires))
    for scheme, extra in SCHEMES:
        with tempfile.TemporaryDirectory() as tmp:
            entry = run(scheme, extra, Path(tmp))
        nodes = sorted(entry["cuts"], key=int)
        cuts = [entry["cuts"][n] for n in nodes]
        sim = entry["sim"]
        cells = []
        for wire in wires.values():
            work = predict_workload(scheme, profile, cuts=cuts, samples=[sizes[int(n) - 1000] for n in nodes],
                                    client_ids=[int(n) - 1000 for n in nodes], batch_size=BATCH,
                                    phi=float(extra.get("phi", 0.0)), wire=wire)
            cost = price(work, scenario, server_round=1)
            cells.append(f"{cost.round_latency_s / sim['round_latency_s']:.4f} / {cost.total_energy_j / sim['energy_j']:.4f}")
        print(f"| {scheme} (cuts {sorted(set(cuts))}) | {sim['round_latency_s']:.4f} | {sim['energy_j']:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
