"""The README's own-project app, exactly as printed, run with ``flwr run`` against the installed
flsplit: every fenced block of the section "Using a strategy in your own Flower project" whose
first line is ``# file: <path>`` is written to ``<path>`` in a folder outside the repository.
Whatever model and data the README uses, the app must train both nodes every round, write
``history.json`` and ``final_model.pt``, and beat chance on its held-out data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_simulation import _pids_with, flwr_run_env

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Using a strategy in your own Flower project"
FEDERATION = "num-supernodes=2 client-resources-num-cpus=1"


def readme_app() -> dict[str, str]:
    """``{path: text}`` of the section's ``# file:`` blocks."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else None]
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```$", section, flags=re.S | re.M):
        first = block.split("\n", 1)[0]
        if first.startswith("# file: "):
            path = first[len("# file: "):].strip()
            assert path not in files, f"README names {path} twice"
            files[path] = block
    return files


def test_the_readme_names_a_whole_app():
    files = readme_app()
    assert {"pyproject.toml", "my_app/client_app.py", "my_app/server_app.py"} <= files.keys(), sorted(files)
    assert "split_client_app(" in files["my_app/client_app.py"]
    assert "RunHistory(" in files["my_app/server_app.py"] and '"accuracy"' in files["my_app/server_app.py"]


def test_the_readme_app_runs_with_flwr_run(tmp_path):
    app_dir, runs = tmp_path / "app", tmp_path / "runs"
    assert not app_dir.resolve().is_relative_to(ROOT)
    for path, text in readme_app().items():
        (app_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / path).write_text(text)
    flwr = Path(sys.executable).with_name("flwr")
    flwr_home = Path(os.environ["FLWR_HOME"])  # the test's own (conftest)
    cmd = [str(flwr), "run", str(app_dir), "--stream", "--federation-config", FEDERATION,
           "--run-config", f'output-dir="{runs}"']
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=flwr_run_env(flwr), capture_output=True, text=True, timeout=420)
    finally:
        for pid in _pids_with(str(flwr_home / "local-superlink")):
            os.kill(pid, signal.SIGTERM)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    history = json.loads((runs / "history.json").read_text())
    rounds = history["rounds"]
    assert rounds and [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)), output[-4000:]
    for r in rounds:
        assert not r["errors"], r["errors"]
        assert len(r["nodes"]) == 2 and len(r["examples_per_node"]) == 2 and all(r["examples_per_node"].values())
    assert f"round {len(rounds)}/{len(rounds)} | test acc" in output  # the round line read evaluate_fn's keys
    # held out: the ServerApp's evaluate_fn; breast cancer's majority class is 63%, digits' 10%
    assert rounds[-1]["test_accuracy"] > 0.8 and rounds[-1]["test_loss"] < rounds[0]["test_loss"], rounds
    final = torch.load(history["final_model"])
    assert Path(history["final_model"]) == runs / "final_model.pt" and final
    # The final file loads into the README's own model, unsplit (its own parameter names).
    sys.path.insert(0, str(app_dir))
    try:
        from my_app.task import make_model  # the README's module, written above
        model = make_model()
        model.load_state_dict(final)  # strict: every parameter, under its own name
    finally:
        sys.path.remove(str(app_dir))
        for name in [m for m in sys.modules if m == "my_app" or m.startswith("my_app.")]:
            del sys.modules[name]
