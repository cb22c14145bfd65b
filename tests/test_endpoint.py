"""The client's plane seam (issue 21, item 5): ``SplitClient`` talks to ``flsplit.planes.endpoint``,
not to the stream; the reply gate knows no plane; a third plane is one registered endpoint."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flsplit.planes import endpoint as ep
from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.planes.inprocess import SERVER_NODE_ID
from tests.helpers import model_fn, random_data

ROOT = Path(__file__).resolve().parents[1]


def _source(module: str) -> Optional[Path]:
    for path in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _flsplit_imports(module: str) -> set[str]:
    """The flsplit modules ``module`` imports, directly or through the modules it imports (read
    from the source; the ``flsplit`` package's own ``__init__`` is not followed)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (path := _source(name)) is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            todo += [n for n in names if n.startswith("flsplit.")]
    return seen - {module}


def test_the_client_imports_no_plane_and_the_gate_neither_plane_nor_scenario():
    client = _flsplit_imports("flsplit.runtime.client")
    assert not {m for m in client if m.startswith("flsplit.planes.stream")}, sorted(client)
    gate = _flsplit_imports("flsplit.wire.gate")
    assert not {m for m in gate if m.startswith(("flsplit.planes.stream", "flsplit.sim.scenario_files", "flsplit.sim.scenario"))}, sorted(gate)
    assert "flsplit.planes.endpoint" in client


def test_device_keys_are_the_device_profiles_fields():
    from dataclasses import fields

    from flsplit.sim.scenario import DeviceProfile
    from flsplit.sim.scenario_files import DEVICE_KEYS

    assert p.DEVICE_KEYS == {f.name.replace("_", "-"): f.name for f in fields(DeviceProfile)} == dict(DEVICE_KEYS)


def test_the_stream_registers_its_endpoint_and_old_names_still_import():
    from flsplit.planes.stream.endpoint import STREAM_ENDPOINT
    from flsplit.planes.stream.offer import FALLBACK, OFFER

    assert ep.endpoints()["stream"] is STREAM_ENDPOINT and STREAM_ENDPOINT.offer_record == OFFER == "split.stream"
    assert FALLBACK == p.FALLBACK == "split.stream.fallback"
    assert OFFER in ep.offer_records()


# ------------------------------------------------------------------ a third plane, in memory
class _LoopbackSession:
    """A session whose server is a function: ``serve(reply) -> next request or None`` (the
    round is done: commit it, then close the session)."""

    def __init__(self, serve: Callable[[RecordDict], Optional[RecordDict]], log: list) -> None:
        self.serve, self.log, self.pending, self.committed = serve, log, None, False

    def reply(self, content: RecordDict) -> None:
        self.log.append(content)
        self.pending = self.serve(content)

    def ack(self) -> None:
        self.log.append("ack")

    def next_call(self, idle: bool) -> ep.Call:
        if self.pending is not None:
            request, self.pending = self.pending, None
            return ep.Call(ep.CallKind.REQUEST, p.TRAIN_STEP, request)
        if not self.committed:
            self.committed = True
            return ep.Call(ep.CallKind.COMMIT)
        return ep.Call(ep.CallKind.CLOSE)

    def fail(self, reason: str) -> None:
        self.log.append(reason)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Loopback(ep.ClientEndpoint):
    name, offer_record = "loopback", "split.test.loopback"

    def __init__(self, serve) -> None:
        self.serve, self.log = serve, []

    def parse_offer(self, record: ConfigRecord):
        if "required" not in record:
            raise ValueError("malformed loopback offer")
        return SimpleNamespace(required=bool(record["required"]), refuse=bool(record.get("refuse", False)))

    def open(self, offer):
        if offer.refuse:
            raise ep.PlaneError("the loopback refused")
        return _LoopbackSession(self.serve, self.log)


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setattr(ep, "_ENDPOINTS", dict(ep._ENDPOINTS))  # registered for this test only
    return ep.register_endpoint(_Loopback(_serve))


def _config() -> ConfigRecord:
    return p.SplitConfig(server_round=1, cut=3, batch_size=4, shuffle=False).to_record()


def _serve(reply: RecordDict) -> Optional[RecordDict]:
    """A server that sends back a fixed function of the smashed data as its gradient."""
    if p.SMASHED not in reply.array_records:
        return None
    x = torch.from_numpy(reply.array_records[p.SMASHED]["x.0"].numpy().copy())
    return RecordDict({p.CONFIG: _config(), p.GRAD: ArrayRecord({"g.0": Array(0.01 * x + 0.001)})})


def _message(content: RecordDict) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    message = Message(content, 5, p.TRAIN_STEP)
    message.metadata.__dict__["_message_id"] = "m"
    return message


def _first(**offer) -> RecordDict:
    content = RecordDict({p.CONFIG: _config(), p.CLIENT_PART: ArrayRecord(model_fn().client_part(3).state_dict())})
    if offer:
        content[_Loopback.offer_record] = ConfigRecord(offer)
    return content


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _state(context: Context) -> dict:
    return {name: {k: bytes(a.data) for k, a in r.items()} for name, r in context.state.array_records.items()} | {
        name: dict(r) for name, r in context.state.config_records.items()}


def test_a_third_plane_trains_the_round_as_messages_do(loopback):
    over_messages, ctx_messages = SplitClient(model_fn, random_data(12, seed=3)), _context()
    request: Optional[RecordDict] = _first()
    while request is not None:
        reply = over_messages.train_step(_message(request), ctx_messages).content
        final, request = reply, _serve(reply)

    over_loopback, ctx_loopback = SplitClient(model_fn, random_data(12, seed=3)), _context()
    ack = over_loopback.train_step(_message(_first(required=True)), ctx_loopback)
    # 3 batches of 4, the final reply, and the commit's acknowledgement
    assert len(ack.content) == 0 and len(loopback.log) == 5 and loopback.log[-1] == "ack"
    assert loopback.log[-2][p.CLIENT_PART].keys() == final[p.CLIENT_PART].keys()
    for key in final[p.CLIENT_PART].keys():
        assert bytes(loopback.log[-2][p.CLIENT_PART][key].data) == bytes(final[p.CLIENT_PART][key].data), key
    assert _state(ctx_loopback) == _state(ctx_messages)


def test_a_refused_session_falls_back_to_messages_when_allowed(loopback):
    client, ctx = SplitClient(model_fn, random_data(8, seed=3)), _context()
    reply = client.train_step(_message(_first(required=False, refuse=True)), ctx).content
    assert dict(reply[p.FALLBACK]) == {"reason": "the loopback refused"} and p.SMASHED in reply
    with pytest.raises(ep.PlaneError, match="refused"):
        client.train_step(_message(_first(required=True, refuse=True)), _context())


def test_offers_are_checked(loopback):
    client = SplitClient(model_fn, random_data(8, seed=3))
    with pytest.raises(p.ProtocolError, match="malformed loopback offer"):
        client.train_step(_message(_first(refuse=True)), _context())
    two = _first(required=True)
    two["split.stream"] = ConfigRecord({"address": 5})
    with pytest.raises(p.ProtocolError, match="sessions on 2 planes"):
        client.train_step(_message(two), _context())
    with pytest.raises(ValueError, match="both offer sessions"):
        ep.register_endpoint(type("Clash", (_Loopback,), {"name": "clash"})(_serve))


def test_an_unregistered_offer_is_an_unexpected_record():
    client = SplitClient(model_fn, random_data(8, seed=3))
    with pytest.raises(p.ProtocolError, match="unexpected ConfigRecord 'split.test.loopback'"):
        client.train_step(_message(_first(required=True)), _context())
