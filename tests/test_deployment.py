"""A real deployment on localhost: SuperLink + 2 SuperNodes as separate processes.

One round of PSL over the stream plane (one TLS session per node) and one over Flower
messages, in the same deployment: both train, and they train the same model bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def test_deployment_superlink_and_two_supernodes(tmp_path):
    bindir = Path(sys.executable).parent
    flwr_home = Path(os.environ["FLWR_HOME"])
    flwr_home.mkdir(parents=True, exist_ok=True)
    link, node0, node1 = _free_ports(3)  # the SuperLink serves all its APIs on one port
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(bindir / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))

    try:
        start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
            "--database", str(tmp_path / "state.db"),
        )
        _wait_listening(link)
        for i, port in enumerate((node0, node1)):
            start(
                f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--port", str(port), "--node-config", f"partition-id={i} num-partitions=2",
            )
        finals = {}
        for plane in ("stream", "message"):
            runs = tmp_path / f"runs-{plane}"
            config = f'num-server-rounds=1 max-steps=3 strategy="psl" data-plane="{plane}" output-dir="{runs}"'
            proc = subprocess.run(
                [str(bindir / "flwr"), "run", ".", "deploy", "--stream", "--run-config", config],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
            )
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0, output[-3000:]
            assert "round 1/1 | test acc" in output, output[-3000:]
            (history_file,) = runs.glob("*/history.json")
            history = json.loads(history_file.read_text())
            (entry,) = history["rounds"]
            assert len(entry["nodes"]) == 2 and entry["server_steps"] == 3 and not entry["errors"]
            assert entry["num_examples"] == 2 * 3 * 32  # two nodes, three batches of 32 each
            assert set(entry["data_plane"].values()) == {plane} and len(entry["data_plane"]) == 2
            finals[plane] = torch.load(history["final_model"])
        # the round over TLS sessions trains exactly the model the round over Flower messages does
        assert finals["stream"].keys() == finals["message"].keys()
        assert all(torch.equal(finals["stream"][k], finals["message"][k]) for k in finals["stream"])
    finally:
        for p in procs:  # stop exactly the processes this test started, by PID
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
