"""One run through Flower's real simulation engine: ``flwr run .`` with the managed SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from flsplit.model.zoo import digits_cnn
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]


def _pids_with(fragment: str) -> list[int]:
    """PIDs whose command line contains ``fragment`` (to stop our own SuperLink by PID)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if fragment in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def flwr_run_env(flwr: Path) -> dict[str, str]:
    """The environment for ``flwr run`` with a managed SuperLink of the test's own: Flower's
    local SuperLink listens on fixed ports (39091, 39093) unless these variables say otherwise,
    and ``flwr run`` reuses whatever answers there, so without them a run on the same machine
    (another test session, another venv) would get this run, or stop its SuperLink under it."""
    http, control = free_ports(2)
    return {
        **os.environ,
        "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
    }


def _flwr_run(tmp_path: Path, federation: str, run_config: str) -> tuple[dict, str]:
    """``flwr run .`` in simulation; the history and the output."""
    flwr_home = Path(os.environ["FLWR_HOME"])
    runs = tmp_path / "runs"
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [
        str(flwr), "run", ".", "--stream", "--federation-config", federation,
        "--run-config", f'{run_config} output-dir="{runs}"',
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=flwr_run_env(flwr), capture_output=True, text=True, timeout=420)
    finally:
        for pid in _pids_with(str(flwr_home / "local-superlink")):
            os.kill(pid, signal.SIGTERM)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    (history_file,) = runs.glob("*/history.json")
    return json.loads(history_file.read_text()), output


def test_flwr_run_simulation_two_nodes_two_rounds(tmp_path):
    """SFL-V2 (clients independent) on Flower's default resources, one ClientApp at a time:
    ``auto`` opens each node's session as the engine gets to it. Both sessions then run at
    once (detached), so the shared server part steps on the two nodes' batches in arrival
    order, which differs from run to run; at the default learning rate (0.1, momentum 0.9)
    some orders made round 2 diverge, so this run learns at 0.05."""
    history, output = _flwr_run(tmp_path, "num-supernodes=2", 'num-server-rounds=2 strategy="sflv2" learning-rate=0.05')
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(len(r["nodes"]) == 2 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rounds)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rounds)
    assert rounds[1]["test_loss"] < rounds[0]["test_loss"] < 2.5
    assert "round 2/2 | test acc" in output  # the per-round log line reached the user
    # the final model is one state dict that loads into the unsplit model
    torch.load(history["final_model"])
    digits_cnn().load_state_dict(torch.load(history["final_model"]), strict=True)
    assert all(list(r["data_plane"].values()) == ["stream"] * 2 for r in rounds), [r["data_plane"] for r in rounds]


def test_lockstep_in_simulation_streams_on_fewer_clientapps_than_nodes(tmp_path):
    """PSL holds both nodes' sessions at once on Flower's default resources (one ClientApp at
    a time): each ClientApp answers its message once its session is open and serves it from
    its Ray worker, so both rounds stream, the second on the sessions the first opened."""
    config = 'num-server-rounds=2 max-steps=3 strategy="psl"'
    tight, output = _flwr_run(tmp_path / "tight", "num-supernodes=2", config)
    for entry in tight["rounds"]:
        assert list(entry["data_plane"].values()) == ["stream"] * 2 and not entry["errors"], entry
        assert entry["server_steps"] == 3
    assert "2 opened, first replies in" in output and "2 on sessions open since an earlier round" in output
