"""A real deployment on localhost, with Flower's own security: a SuperLink and SuperNodes as
separate processes, TLS on every Flower connection and SuperNode authentication.

The certificates (a CA, the SuperLink's certificate signed by it) and the SuperNodes' key
pairs are made by ``flsplit.cli.make_certs`` (``flsplit make-certs``); two public keys are
registered with ``flwr supernode register``. One deployment serves every test:

- a SuperNode whose key is not registered, and one with no key, are refused: they exit
  without a node id and the SuperLink's registry holds exactly the two registered nodes;
- one round of PSL over the stream plane (one TLS session per node, the listener presenting
  the deployment's own certificate) and one over Flower messages both train on the two
  registered nodes, and they train the same model bit for bit;
- a U-shaped transformer trains over two rounds of run-long sessions;
- faults: a ServerApp killed mid-run leaves no ClientApp process; a SuperNode killed with
  SIGKILL mid-round is dropped at once (not at the exchange timeout) and, restarted with its
  key, rejoins in a later round.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from flsplit.cli.make_certs import DeploymentKeys, make_certs
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[1]
BINDIR = Path(sys.executable).parent
# Flower's offline settings; the module-scoped deployment starts before conftest's per-test env
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake between two in-memory endpoints (no sockets); raises what the client refuses."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typer, imported by flwr.cli
def test_make_certs_writes_what_flower_loads(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from flsplit.cli import main

    keys = make_certs(tmp_path / "keys", hosts=["edge-server.lan", "10.0.0.7"], nodes=2)
    for private in (keys.ca_key, keys.server_key, *keys.node_keys):
        assert private.stat().st_mode & 0o777 == 0o600
    # the server certificate verifies against the CA, strictly, for each of its names only
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(keys.server_cert, keys.server_key)
    client_ctx = ssl.create_default_context(cafile=str(keys.ca_cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    for host in ("127.0.0.1", "localhost", "edge-server.lan", "10.0.0.7"):
        _handshake(server_ctx, client_ctx, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "other.lan")
    # node keys: the public key flwr registers is the one flower-supernode derives from the private key
    for private, public in zip(keys.node_keys, keys.node_public_keys):
        node_key = load_ssh_private_key(private.read_bytes(), None)
        assert try_load_public_key(public) == public_key_to_bytes(node_key.public_key())
    # nothing is overwritten without --force
    assert main(["make-certs", str(tmp_path / "keys"), "--nodes", "1"]) == 1
    assert main(["make-certs", str(tmp_path / "keys"), "--nodes", "1", "--force"]) == 0


def _wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120.0) -> None:
    """Wait until ``text`` is in ``log``; fail at once (with the log) if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"{log.name}: exited with {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{log.name}: no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}")


def _write_cli_config(flwr_home: Path, link: int, ca_cert: Path) -> None:
    """The ``flwr`` CLI's connection: TLS verified against the deployment's CA, not ``insecure``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


def _cli_env(flwr_home: Path) -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BINDIR}{os.pathsep}{os.environ.get('PATH', '')}"}


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    """The JSON document a ``flwr ... --format json`` command printed."""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@dataclass
class Deployment:
    """What the tests need to know about the running deployment."""

    link: int  # the SuperLink's port (Fleet, Control and Runtime APIs)
    keys: DeploymentKeys
    node_ids: list[int]  # ids the SuperLink gave the registered keys node-0, node-1
    refused: dict[str, tuple[subprocess.Popen, Path]]  # SuperNodes that must not get in, with their logs
    nodes: list[tuple[subprocess.Popen, Path]]  # the registered SuperNodes' processes and logs
    restart_node: Callable[[int], tuple[subprocess.Popen, Path]]  # start registered SuperNode i again (its key)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """SuperLink (TLS, SuperNode auth) + 2 registered SuperNodes + 2 that are not registered."""
    tmp = tmp_path_factory.mktemp("deployment")
    keys = make_certs(tmp / "keys", nodes=3)  # node-2's key is never registered
    home = tmp / "operator-flwr-home"  # the operator's flwr CLI (registration)
    link, *node_ports = free_ports(5)  # the SuperLink serves all its APIs on one port
    _write_cli_config(home, link, keys.ca_cert)
    env = _cli_env(home)
    logs = tmp / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    link_log = logs / "superlink.log"

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = logs / f"{name}.log"
        with open(log, "w") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen([str(BINDIR / args[0]), *args[1:]], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, log

    def start_supernode(name: str, port: int, partition: int, *auth: str) -> tuple[subprocess.Popen, Path]:
        return start(
            name, "flower-supernode", "--superlink", f"127.0.0.1:{link}", "--root-certificates", str(keys.ca_cert),
            *auth, "--port", str(port), "--node-config", f"partition-id={partition} num-partitions=2",
        )

    try:
        start(
            "superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(link),
            "--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key), "--enable-supernode-auth", "--database", str(tmp / "state.db"),
        )
        _wait_listening(link)
        registrations = [  # both at once: each CLI call takes seconds to start
            subprocess.Popen([str(BINDIR / "flwr"), "supernode", "register", str(pub), "deploy", "--format", "json"],
                             cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pub in keys.node_public_keys[:2]
        ]
        procs.extend(registrations)
        node_ids = []
        for reg in registrations:
            out, err = reg.communicate(timeout=120)
            node_ids.append(int(_json_out(subprocess.CompletedProcess(reg.args, reg.returncode, out, err))["node-id"]))
        def registered_node(i: int, name: str = "") -> tuple[subprocess.Popen, Path]:
            return start_supernode(name or f"supernode{i}", node_ports[i], i, "--auth-supernode-private-key",
                                   str(keys.node_keys[i]))

        nodes = [registered_node(i) for i in range(2)]
        refused = {
            "unregistered key": start_supernode("unregistered", node_ports[2], 0,
                                                "--auth-supernode-private-key", str(keys.node_keys[2])),
            "no key": start_supernode("keyless", node_ports[3], 1),
        }
        for (proc, log), node_id in zip(nodes, node_ids):  # each node got the id its key was registered under
            _wait_for_log(proc, log, f"SuperNode ID: {node_id}")
        yield Deployment(link, keys, node_ids, refused, nodes,
                         lambda i: registered_node(i, f"supernode{i}-restarted-{time.monotonic_ns()}"))
    except BaseException:
        if link_log.exists():
            print(link_log.read_text(errors="replace")[-3000:])  # pytest shows it with the failure
        raise
    finally:
        for p in procs:  # stop exactly the processes this fixture started, by PID
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)


def test_supernodes_outside_the_registry_are_refused(deployment: Deployment):
    for what, (proc, log) in deployment.refused.items():
        returncode = proc.wait(timeout=120)  # refused nodes give up at once; generous for a busy machine
        text = log.read_text(errors="replace")
        assert returncode > 0, f"{what}: exit {returncode}\n{text[-3000:]}"
        assert "Failed to initialize the connection to the SuperLink" in text, f"{what}:\n{text[-3000:]}"
        assert "SuperNode ID:" not in text, f"{what}:\n{text[-3000:]}"
    assert "Failed to activate SuperNode" in deployment.refused["unregistered key"][1].read_text()
    assert "must be registered via the CLI" in deployment.refused["no key"][1].read_text()
    # the registry holds the two registered nodes, online, and nothing else
    flwr_home = Path(os.environ["FLWR_HOME"])
    _write_cli_config(flwr_home, deployment.link, deployment.keys.ca_cert)
    listing = _json_out(subprocess.run(
        [str(BINDIR / "flwr"), "supernode", "ls", "deploy", "--format", "json"],
        cwd=flwr_home, env=_cli_env(flwr_home), capture_output=True, text=True, timeout=120,
    ))
    assert {int(n["node-id"]): n["status"] for n in listing["nodes"]} == dict.fromkeys(deployment.node_ids, "online")


def test_deployment_streams_and_messages_train_the_same_model(deployment: Deployment, tmp_path):
    flwr_home = Path(os.environ["FLWR_HOME"])  # this test's own (conftest)
    _write_cli_config(flwr_home, deployment.link, deployment.keys.ca_cert)
    env = _cli_env(flwr_home)
    # the stream listener presents the deployment's certificate (clients pin it from the offer)
    own_cert = f'stream-certfile="{deployment.keys.server_cert}" stream-keyfile="{deployment.keys.server_key}"'
    finals = {}
    for plane in ("stream", "message"):
        runs = tmp_path / f"runs-{plane}"
        config = f'num-server-rounds=1 max-steps=3 strategy="psl" data-plane="{plane}" output-dir="{runs}" {own_cert}'
        proc = subprocess.run(
            [str(BINDIR / "flwr"), "run", ".", "deploy", "--stream", "--run-config", config],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,  # message rounds poll: slow on a busy machine
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-3000:]
        assert "round 1/1 | test acc" in output, output[-3000:]
        (history_file,) = runs.glob("*/history.json")
        history = json.loads(history_file.read_text())
        (entry,) = history["rounds"]
        assert sorted(entry["nodes"]) == sorted(deployment.node_ids)  # the registered nodes, and only they
        assert entry["server_steps"] == 3 and not entry["errors"]
        assert entry["num_examples"] == 2 * 3 * 32  # two nodes, three batches of 32 each
        assert set(entry["data_plane"].values()) == {plane} and len(entry["data_plane"]) == 2
        finals[plane] = torch.load(history["final_model"])
    # the round over TLS sessions trains exactly the model the round over Flower messages does
    assert finals["stream"].keys() == finals["message"].keys()
    assert all(torch.equal(finals["stream"][k], finals["message"][k]) for k in finals["stream"])


def test_deployed_nodes_fine_tune_a_transformer_u_shaped_over_the_stream(deployment: Deployment, tmp_path):
    """The two SuperNodes train the zoo's language model on their share of the offline text with
    the tail and the loss on the devices, over TLS sessions. (That no label or token id is in
    any frame or message of such a round is checked in-process, frame by frame, by
    tests/test_u_shape.py: here the frames are TLS-encrypted.)"""
    flwr_home = Path(os.environ["FLWR_HOME"])
    _write_cli_config(flwr_home, deployment.link, deployment.keys.ca_cert)
    runs = tmp_path / "runs"
    own_cert = f'stream-certfile="{deployment.keys.server_cert}" stream-keyfile="{deployment.keys.server_key}"'
    config = (f'num-server-rounds=2 max-steps=4 batch-size=8 strategy="psl" model="gpt-tiny" dataset="stdlib-text" '
              f'optimizer="adamw" learning-rate=0.003 momentum=0.0 cut-layer="1" tail-cut=4 data-plane="stream" '
              f'output-dir="{runs}" {own_cert}')
    proc = subprocess.run([str(BINDIR / "flwr"), "run", ".", "deploy", "--stream", "--run-config", config],
                          cwd=ROOT, env=_cli_env(flwr_home), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    (history_file,) = runs.glob("*/history.json")
    history = json.loads(history_file.read_text())
    assert history["run"]["tail-cut"] == 4
    for entry in history["rounds"]:
        assert sorted(entry["nodes"]) == sorted(deployment.node_ids) and not entry["errors"]
        assert set(entry["data_plane"].values()) == {"stream"}
        assert entry["num_examples"] == 2 * 4 * 8 and entry["server_steps"] == 4
    losses = [entry["test_loss"] for entry in history["rounds"]]
    assert losses[1] < losses[0] < math.log(256)  # the devices' tails learn: below a uniform guess, and falling


# ---------------------------------------------------------------------- faults on run-long sessions
def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _clientapps(nodes: list[tuple[subprocess.Popen, Path]]) -> list[int]:
    return [pid for proc, _ in nodes for pid in _descendants(proc.pid) if "flwr-clientapp" in _cmdline(pid)]


class _Run:
    """``flwr run . deploy --stream`` in the background, its output collected by a thread."""

    def __init__(self, config: str, env: dict) -> None:
        import threading

        self.proc = subprocess.Popen([str(BINDIR / "flwr"), "run", ".", "deploy", "--stream", "--run-config", config],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} in the run's output:\n{self.text[-3000:]}")
            time.sleep(0.2)


def test_a_serverapp_that_dies_leaves_no_client_process(deployment: Deployment, tmp_path):
    """SIGKILL the ServerApp process in the middle of a stream run: every node's ClientApp,
    which held its Flower message for the run, sees its session close and ends; none is left."""
    flwr_home = Path(os.environ["FLWR_HOME"])
    _write_cli_config(flwr_home, deployment.link, deployment.keys.ca_cert)
    config = f'num-server-rounds=50 max-steps=20 strategy="psl" data-plane="stream" output-dir="{tmp_path / "runs"}"'
    run = _Run(config, _cli_env(flwr_home))
    try:
        run.wait_for("[flsplit] round 2/50", 600)
        assert len(_clientapps(deployment.nodes)) == 2  # one ClientApp per node, held for the run
        serverapps = [pid for pid in _descendants(os.getpid()) if "flwr-serverapp" in _cmdline(pid)]
        assert len(serverapps) == 1, [_cmdline(p) for p in _descendants(os.getpid())]
        os.kill(serverapps[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _clientapps(deployment.nodes) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _clientapps(deployment.nodes) == [], [_cmdline(p) for p in _clientapps(deployment.nodes)]
    finally:
        run.proc.terminate()
        run.proc.wait(timeout=30)


def test_a_node_killed_mid_round_is_dropped_at_once_and_rejoins_later(deployment: Deployment, tmp_path):
    """SIGKILL a SuperNode and its ClientApp (a device that dies) in round 2 of a stream run with
    a 300 s exchange timeout: round 2 ends without it well before the timeout (its session's
    EOF drops it; its Flower message, which can never be answered, is not awaited), the other
    node finishes; the SuperNode restarted with its key rejoins in a later round, on a new
    session (once the SuperLink has let its old registration lapse). Last in the module: it
    replaces the deployment's node 1."""
    flwr_home = Path(os.environ["FLWR_HOME"])
    _write_cli_config(flwr_home, deployment.link, deployment.keys.ca_cert)
    runs = tmp_path / "runs"
    # 200 steps a round: round 2 lasts seconds even on an idle machine, so the kill lands in it
    config = (f'num-server-rounds=5 max-steps=200 strategy="psl" data-plane="stream" exchange-timeout=300 '
              f'output-dir="{runs}"')
    run = _Run(config, _cli_env(flwr_home))
    try:
        run.wait_for("[flsplit] round 1/5", 600)  # round 2 starts on the open sessions right after
        victim, _ = deployment.nodes[1]
        for pid in [victim.pid] + _descendants(victim.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.wait(timeout=30)
        # The SuperLink refuses a node id it still counts online (heartbeat patience): retry.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            proc, log = deployment.restart_node(1)
            deployment.nodes[1] = (proc, log)
            while proc.poll() is None and f"SuperNode ID: {deployment.node_ids[1]}" not in log.read_text(errors="replace"):
                time.sleep(0.5)
            if proc.poll() is None:
                break
            time.sleep(5.0)
        assert run.proc.wait(timeout=900) == 0, run.text[-3000:]
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    (history_file,) = runs.glob("*/history.json")
    rounds = json.loads(history_file.read_text())["rounds"]
    summary = [(r["nodes"], r["errors"], r["wall_seconds"]) for r in rounds]
    dropped = rounds[1]
    assert [e["node"] for e in dropped["errors"]] == [deployment.node_ids[1]], summary
    assert dropped["nodes_finished"] == 1 and dropped["wall_seconds"] < 150, summary
    # Until the SuperLink has seen the dead node's heartbeat lapse, it still lists the node: a
    # round may send it a carrier that Flower answers "Node Unavailable" (dropped again).
    rejoined = [r for r in rounds[2:] if sorted(r["nodes"]) == sorted(deployment.node_ids) and not r["errors"]]
    assert rejoined and set(rejoined[0]["data_plane"].values()) == {"stream"}, summary
