"""Security and faults of the stream data plane, against the real listener over loopback TLS.

A. ``SessionListener`` refuses every connection that does not prove an offered session
   (plain TCP, garbage, wrong / expired / replayed / unknown secrets, oversized or truncated
   HELLO frames, a peer that stalls or trickles past the handshake deadline, a flood of
   half-open handshakes), logs each reason and keeps it in ``refusals``; a client refuses a
   server that does not present the pinned certificate.
B. An admitted node that misbehaves in a real round (oversized frame, garbage payload,
   speaking out of turn, bad smashed data) is dropped or its bad replies skipped, with the
   reason in the round's errors; the others finish and the model is what the good nodes
   alone would have made (SFL-V1: one server copy per node, so that model is computed
   independently, on Flower messages, from a grid of the good partitions only). An honest
   node that connects before the plane's push of its offer has returned is kept.
C. Faults: a node that disconnects or fails mid-round is dropped at once, one that stalls
   after the plane's timeout; a dead ServerApp makes the ClientApps fail fast without
   writing ``context.state``; after a run (failed or not) no stream thread is left and the
   listener's port is closed.

Every session is a real TLS connection to ``127.0.0.1``; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import socket
import ssl
import threading
import time
from typing import Callable, Optional

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flsplit.wire import protocol as p
from flsplit.runtime.client import SplitClient
from flsplit.planes.endpoint import Call, CallKind
from flsplit.planes.inprocess import InProcessGrid
from flsplit.planes.stream import StreamDataPlane
from flsplit.planes.stream.client_session import ClientSession, SessionError
from flsplit.planes.stream.frames import HEADER, MAGIC, Kind, encode_content, recv_frame, send_frame
from flsplit.planes.stream.listener import HELLO_MAX, SessionListener
from flsplit.planes.stream.offer import OFFER, SessionOffer
from flsplit.planes.stream.tls import client_context, ephemeral_credentials
from flsplit.strategies import PSL, SFLV1
from tests.helpers import client_app_for, max_abs_diff, model_fn, random_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flsplit-stream") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_stream_thread_outlives_the_test():
    """Whatever a test opened is closed by its end: no listener or session thread is left."""
    assert stream_threads() == [], "a previous test leaked stream threads"
    yield
    assert stream_threads() == []


@pytest.fixture
def flwr_log(caplog):
    """Flower's log records (the listener and plane log through Flower's logger)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)  # in case Flower's logger does not propagate
    yield caplog
    logger.removeHandler(caplog.handler)


def port_refuses(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ====================================================================== A. refusals
class Listening:
    """A real ``SessionListener`` on loopback, recording the sessions it admits."""

    def __init__(self, **kwargs) -> None:
        self.admitted: list = []
        self.listener = SessionListener(events=queue.Queue(), on_session=self.admitted.append, **kwargs)

    def offer(self, ttl: float = 30.0) -> SessionOffer:
        return self.listener.offer(7, ttl, 5.0, True)

    def address(self) -> tuple[str, int]:
        host, _, port = self.listener.address.rpartition(":")
        return host, int(port)

    def tcp(self) -> socket.socket:
        return socket.create_connection(self.address(), timeout=5)

    def tls(self) -> ssl.SSLSocket:
        """A TLS connection that trusts (only) the listener's certificate; nothing sent yet."""
        return client_context(self.listener.credentials.cert_pem).wrap_socket(self.tcp())

    def refusals(self, count: int = 1, within: float = 5.0) -> list[str]:
        """The reasons of the first ``count`` refusals, waiting for them up to ``within`` s."""
        deadline = time.monotonic() + within
        while len(self.listener.refusals) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return [str(r["reason"]) for r in self.listener.refusals]


@pytest.fixture
def listening():
    made: list[Listening] = []

    def make(**kwargs) -> Listening:
        made.append(Listening(**kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for lst in made:
            lst.listener.close()


def assert_refused(lst: Listening, reason: str, log, count: int = 1) -> None:
    reasons = lst.refusals(count)
    assert len(reasons) == count and reason in reasons[-1], reasons
    assert all(isinstance(r["peer"], str) and r["peer"].startswith("127.0.0.1:") for r in lst.listener.refusals)
    assert f"refused connection from {lst.listener.refusals[-1]['peer']}: {reasons[-1]}" in log.text
    assert lst.admitted == []


def read_error_frame(sock: ssl.SSLSocket) -> str:
    """The reason in the ERROR frame the listener sends before hanging up."""
    kind, payload = recv_frame(sock, HELLO_MAX)
    assert kind is Kind.ERROR
    return payload.decode()


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 300, MAGIC + b"\x01" + b"\x00" * 8],
                         ids=["http", "zeros", "frame"])
def test_plain_tcp_is_refused(listening, flwr_log, data):
    """Anything but a TLS ClientHello (even a well-formed frame in the clear) is refused."""
    lst = listening()
    with lst.tcp() as s:
        s.sendall(data)
        assert_refused(lst, "SSL", flwr_log)
        s.settimeout(5)
        try:
            assert s.recv(100) == b""  # no flsplit frame to a peer that does not speak TLS
        except ConnectionResetError:
            pass


def test_tls_with_garbage_instead_of_hello_is_refused(listening, flwr_log):
    lst = listening()
    with lst.tls() as s:
        s.sendall(b"GARBAGE-NOT-A-FRAME-AT-ALL")
        assert_refused(lst, "not a flsplit frame (magic b'GARB')", flwr_log)
        assert "session refused: not a flsplit frame" in read_error_frame(s)


@pytest.mark.parametrize("kind", ["wrong", "unknown", "empty"])
def test_wrong_or_unknown_secret_is_refused(listening, flwr_log, kind):
    lst = listening()
    offer = lst.offer()
    bad = {
        "wrong": dataclasses.replace(offer, secret="00" * 32),
        "unknown": dataclasses.replace(offer, session_id="ab" * 16),
        "empty": dataclasses.replace(offer, session_id="", secret=""),
    }[kind]
    with pytest.raises(SessionError, match="session refused"):
        ClientSession.open(bad)
    assert_refused(lst, "wrong secret" if kind == "wrong" else "unknown session", flwr_log)
    # a failed guess burns nothing: the node holding the real offer still gets in, once
    with ClientSession.open(offer):
        deadline = time.monotonic() + 5
        while not lst.admitted and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [s.node_id for s in lst.admitted] == [7]


def test_expired_secret_is_refused(listening, flwr_log):
    lst = listening()
    offer = lst.offer(ttl=0.05)
    time.sleep(0.2)
    with pytest.raises(SessionError, match="expired secret"):
        ClientSession.open(offer)
    assert_refused(lst, "expired secret", flwr_log)
    with pytest.raises(SessionError, match="unknown session"):  # and it is gone for good
        ClientSession.open(offer)
    assert_refused(lst, "unknown session", flwr_log, count=2)


def test_replayed_secret_is_refused(listening, flwr_log):
    lst = listening()
    offer = lst.offer()
    with ClientSession.open(offer):
        deadline = time.monotonic() + 5
        while not lst.admitted and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(lst.admitted) == 1
        with pytest.raises(SessionError, match="replayed secret"):
            ClientSession.open(offer)  # while the first is open
    with pytest.raises(SessionError, match="replayed secret"):
        ClientSession.open(offer)  # and after it closed
    reasons = lst.refusals(2)
    assert len(reasons) == 2 and all("replayed secret" in r for r in reasons)
    assert "replayed secret" in flwr_log.text
    assert len(lst.admitted) == 1


def test_oversized_hello_is_refused_from_its_header(listening, flwr_log):
    """The length is checked before a byte of payload is read: the peer sends the header only
    and is refused at once, long before the handshake deadline."""
    lst = listening(handshake_timeout=5.0)
    with lst.tls() as s:
        start = time.monotonic()
        s.sendall(HEADER.pack(MAGIC, int(Kind.HELLO), HELLO_MAX + 1))
        assert_refused(lst, f"frame of {HELLO_MAX + 1} bytes exceeds the cap of {HELLO_MAX} bytes", flwr_log)
        assert time.monotonic() - start < 5.0  # before the deadline (the reason says so too)
        assert "exceeds the cap" in read_error_frame(s)
    with lst.tls() as s:  # a length no one could allocate: the same, at once
        s.sendall(HEADER.pack(MAGIC, int(Kind.HELLO), 2**63))
        assert_refused(lst, "exceeds the cap", flwr_log, count=2)


def test_truncated_hello_is_refused(listening, flwr_log):
    lst = listening(handshake_timeout=5.0)
    s = lst.tls()
    s.sendall(HEADER.pack(MAGIC, int(Kind.HELLO), 100) + b'{"session":')
    s.close()
    assert_refused(lst, "truncated frame: payload ended after 11 of 100 bytes", flwr_log)


def test_hello_of_another_kind_is_refused(listening, flwr_log):
    lst = listening()
    offer = lst.offer()
    with lst.tls() as s:
        send_frame(s, Kind.REPLY, b'{"session":"%s","secret":"%s"}' % (offer.session_id.encode(), offer.secret.encode()))
        assert_refused(lst, "unexpected REPLY frame (expected HELLO)", flwr_log)


@pytest.mark.parametrize("stage", ["tcp", "tls"])
def test_silent_peer_is_refused_at_the_handshake_deadline(listening, flwr_log, stage):
    """Connect (and finish TLS), then send nothing: refused once ``handshake_timeout`` passed."""
    lst = listening(handshake_timeout=0.5)
    start = time.monotonic()
    with lst.tcp() if stage == "tcp" else lst.tls():
        assert_refused(lst, "handshake deadline passed", flwr_log)
        assert 0.4 <= time.monotonic() - start < 5.0


def test_trickling_peer_is_refused_at_the_handshake_deadline(listening, flwr_log):
    """The deadline is for the whole handshake: a peer that sends its HELLO a byte at a time,
    each byte well within the deadline, must not hold its handshake slot longer."""
    lst = listening(handshake_timeout=0.5)
    offer = lst.offer()
    hello = b'{"session":"%s","secret":"%s"}' % (offer.session_id.encode(), offer.secret.encode())
    frame = HEADER.pack(MAGIC, int(Kind.HELLO), len(hello)) + hello
    start = time.monotonic()
    with lst.tls() as s:
        for byte in frame:  # one byte every 0.2 s: 0.5 s would take 3 bytes, the frame has 140
            if lst.listener.refusals or time.monotonic() - start > 8.0:
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
        took = time.monotonic() - start
        reasons = lst.refusals(1, within=5.0)
    assert took < 6.0, f"a trickling peer was still in its handshake {took:.1f} s after connecting (deadline 0.5 s)"
    assert reasons and "handshake deadline passed" in reasons[0], reasons
    assert lst.admitted == []


def test_too_many_handshakes_at_once_are_refused(listening, flwr_log):
    lst = listening(max_handshakes=2, handshake_timeout=5.0)
    idle = [lst.tcp(), lst.tcp()]  # hold both handshake slots
    try:
        time.sleep(0.2)
        with lst.tcp() as third:
            assert_refused(lst, "too many connections in their handshake", flwr_log)
            third.settimeout(5)
            try:
                assert third.recv(1) == b""  # closed at once
            except ConnectionResetError:
                pass
    finally:
        for s in idle:
            s.close()
    assert len(lst.refusals(3)) == 3  # the two idle peers, refused when they hang up
    offer = lst.offer()  # their slots are free again
    with ClientSession.open(offer):
        deadline = time.monotonic() + 5
        while not lst.admitted and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(lst.admitted) == 1


@pytest.mark.parametrize("tamper", ["fingerprint", "certificate"])
def test_client_refuses_a_server_with_another_certificate(listening, flwr_log, tamper):
    """The client pins the offered certificate: a server presenting any other one is refused
    before the secret leaves the client (the listener admits nothing), and the client hangs
    up at once (the server sees the connection end, not its handshake deadline)."""
    lst = listening(handshake_timeout=3.0)
    offer = lst.offer()
    other = ephemeral_credentials()
    bad = (dataclasses.replace(offer, fingerprint=other.fingerprint) if tamper == "fingerprint"
           else dataclasses.replace(offer, cert_pem=other.cert_pem, fingerprint=other.fingerprint))
    try:
        with pytest.raises(SessionError) as err:  # the error is kept, as a ClientApp's caller would
            ClientSession.open(bad)
        assert ("not the one pinned" if tamper == "fingerprint" else "CERTIFICATE_VERIFY_FAILED") in str(err.value)
        reasons = lst.refusals(1, within=5.0)
        assert reasons and "deadline" not in reasons[0], (
            f"the client left its connection to the unpinned server open: {reasons}")
    finally:
        del err
        gc.collect()
    assert lst.admitted == []  # no HELLO arrived: the secret was never sent
    with ClientSession.open(offer):  # the genuine offer is still unused
        deadline = time.monotonic() + 5
        while not lst.admitted and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(lst.admitted) == 1


def test_closed_listener_ends_its_sessions_and_its_port(listening):
    lst = listening()
    offer = lst.offer()
    session = ClientSession.open(offer)
    deadline = time.monotonic() + 5
    while not lst.admitted and time.monotonic() < deadline:
        time.sleep(0.005)
    lst.listener.close()
    assert stream_threads() == []
    assert port_refuses(lst.listener.address)
    with pytest.raises(SessionError, match="stream broke"):
        session.next_call(idle=False)
    session.close()


# ====================================================================== B, C. rounds
BAD = 2  # the misbehaving node is partition 2, node 1002; partitions 0 and 1 are honest
BAD_NODE = 1000 + BAD
PARTS = [random_data(48, seed) for seed in range(3)]  # 3 batches of 16 per node and round
SETTINGS = dict(input_shape=(1, 8, 8), num_classes=10, learning_rate=0.1, shuffle=False, batch_size=16, cut_layer=2)
TIMEOUT = 20.0  # the plane's exchange timeout where a test does not wait for it

Handler = Callable[[SplitClient, Message, Context], Message]


def app_with(bad: Optional[Handler], clients: Optional[list[SplitClient]] = None) -> ClientApp:
    """A ClientApp whose partitions 0 and 1 are honest ``SplitClient``s and whose partition 2
    trains with ``bad(client, msg, ctx)`` (honest too when ``bad`` is None)."""
    clients = clients or [SplitClient(model_fn, data, data, salt=i) for i, data in enumerate(PARTS)]
    app = ClientApp()

    @app.train("split_step")
    def _train(msg, ctx):
        pid = int(ctx.node_config["partition-id"])
        if pid == BAD and bad is not None:
            return bad(clients[pid], msg, ctx)
        return clients[pid].train_step(msg, ctx)

    return app


@dataclasses.dataclass
class Run:
    strategy: object
    result: object
    grid: InProcessGrid
    plane: StreamDataPlane
    seconds: float  # strategy.start, wall

    @property
    def round(self) -> dict:
        return self.strategy.history.rounds[0]

    def model(self) -> dict:
        return self.result.arrays.to_torch_state_dict()

    def errors_of(self, node: int) -> list[str]:
        return [e["error"] for e in self.round["errors"] if e["node"] == node]


@pytest.fixture
def warm():
    """Torch imports parts of itself lazily at a process's first training step (seconds on a
    busy machine): one round on messages first, so that the timings below time the plane."""
    good_only_model()


def stream_factory(timeout: float = TIMEOUT, **plane_kwargs):
    """A ``data_plane_factory`` making stream planes (mode ``stream``), and the list of them."""
    planes: list[StreamDataPlane] = []

    def factory(grid, _timeout):
        planes.append(StreamDataPlane(grid, timeout, mode="stream", **plane_kwargs))
        return planes[-1]

    return factory, planes


def run_stream(app: ClientApp, scheme=SFLV1, timeout: float = TIMEOUT, num_rounds: int = 1, intercept=None,
               plane_kwargs: Optional[dict] = None, evaluate_fn=None, **settings) -> Run:
    """``scheme`` on the stream plane over a threaded in-process grid of 3 nodes."""
    grid = InProcessGrid(app, len(PARTS), threaded=True, intercept=intercept)
    factory, planes = stream_factory(timeout, **(plane_kwargs or {}))
    strategy = scheme(model_fn=model_fn, data_plane_factory=factory, **{**SETTINGS, **settings})
    start = time.monotonic()
    try:
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=num_rounds,
                                evaluate_fn=evaluate_fn)
        seconds = time.monotonic() - start
    finally:
        grid.shutdown()
    assert_released(planes[0])
    return Run(strategy, result, grid, planes[0], seconds)


def assert_released(plane: StreamDataPlane) -> None:
    """After a run: no listener or session thread, and the listener's port is closed."""
    assert stream_threads() == []
    assert port_refuses(plane.listener.address)


_GOOD_ONLY: dict = {}


def good_only_model(scheme=SFLV1, **settings) -> dict:
    """The model one round makes with the honest nodes alone: Flower messages, a grid of
    partitions 0 and 1 only (the same node ids 1000 and 1001, cuts and data)."""
    key = (scheme, tuple(sorted(settings.items())))
    if key not in _GOOD_ONLY:
        grid = InProcessGrid(client_app_for(PARTS[:BAD]), BAD)
        strategy = scheme(model_fn=model_fn, **{**SETTINGS, **settings})
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
        assert strategy.history.rounds[0]["errors"] == []
        _GOOD_ONLY[key] = result.arrays.to_torch_state_dict()
    return _GOOD_ONLY[key]


def by_hand(on_reply: Callable[[int, ClientSession, RecordDict], None]) -> Handler:
    """A node that speaks the session protocol by hand. Each reply is what an honest client
    would send (a ``SplitClient`` on a scratch context, over the message path); ``on_reply(step,
    session, reply)`` puts it on the wire, or misbehaves (and raises to end the ClientApp)."""

    def handler(client: SplitClient, msg: Message, ctx: Context) -> Message:
        offer = SessionOffer.from_content(msg.content)
        assert offer is not None, "the round's first request carries no session offer"
        scratch = Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=dict(ctx.node_config), state=RecordDict(),
                          run_config={})
        request: Optional[RecordDict] = RecordDict({k: v for k, v in msg.content.items() if k != OFFER})
        with ClientSession.open(offer) as session:
            step, call = 0, Call(CallKind.REQUEST, p.TRAIN_STEP, request)
            while call.kind is not CallKind.CLOSE:
                if call.kind is CallKind.REQUEST:
                    reply = client.train_step(Message(call.content, ctx.node_id, p.TRAIN_STEP), scratch).content
                    on_reply(step, session, reply)
                    step += 1
                else:  # commit or discard: the session stays until the run closes it
                    session.ack()
                call = session.next_call(idle=False)
        return Message(RecordDict(), reply_to=msg)

    return handler


def hang_on(session: ClientSession, within: float = 10.0) -> None:
    """Wait until the server hangs up, then fail the ClientApp (a bad node's work is done)."""
    session.sock.settimeout(within)
    try:
        while session.sock.recv(4096):
            pass
    except OSError:
        pass
    raise ConnectionError("the server hung up on the misbehaving node")


def frame_bytes(kind: Kind, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, int(kind), len(payload)) + payload


def assert_dropped_alone(run: Run, reason, good_model: Optional[dict] = None) -> None:
    """The bad node is dropped for the round with ``reason`` (or one of a tuple of them); the
    honest nodes finish, alone make the model, and nothing is NaN."""
    reasons = reason if isinstance(reason, tuple) else (reason,)
    errors = run.errors_of(BAD_NODE)
    assert len(errors) == 1 and "node dropped for this round" in errors[0], run.round["errors"]
    assert any(r in errors[0] for r in reasons), run.round["errors"]
    assert [e["node"] for e in run.round["errors"]] == [BAD_NODE]
    assert run.round["nodes"] == [1000, 1001, 1002]
    assert run.round["examples_per_node"] == {"1000": 48, "1001": 48}  # the bad node contributed nothing
    assert run.round["num_examples"] == 96
    model = run.model()
    assert all(torch.isfinite(t).all() for t in model.values())
    if good_model is not None:
        assert max_abs_diff(model, good_model) == 0.0


def test_honest_round_on_the_stream_is_the_message_round(warm):
    """The baseline the comparisons below rest on: all three honest, stream == messages."""
    run = run_stream(app_with(None))
    assert run.round["errors"] == [] and run.round["data_plane"] == {"1000": "stream", "1001": "stream", "1002": "stream"}
    grid = InProcessGrid(client_app_for(PARTS), len(PARTS))
    strategy = SFLV1(model_fn=model_fn, **SETTINGS)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    assert max_abs_diff(run.model(), result.arrays.to_torch_state_dict()) == 0.0


class SlowPushGrid(InProcessGrid):
    """A grid whose ``push_messages`` returns only a while after a session offer went out (a
    SuperLink slow to acknowledge): the ClientApp has connected and been admitted by then."""

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if any(OFFER in m.content.config_records for m in messages):
            time.sleep(0.5)
        return ids


def test_session_admitted_before_the_carrier_push_returns_is_kept(warm):
    """A node may connect as soon as its offer is out, before the plane's ``push_messages``
    has returned: its session must be kept, not closed as one the plane no longer wants."""
    grid = SlowPushGrid(app_with(None), len(PARTS), threaded=True)
    factory, planes = stream_factory()
    strategy = SFLV1(model_fn=model_fn, data_plane_factory=factory, **SETTINGS)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
    finally:
        grid.shutdown()
    assert_released(planes[0])
    first = strategy.history.rounds[0]
    assert first["errors"] == [] and first["examples_per_node"] == {"1000": 48, "1001": 48, "1002": 48}


# ---------------------------------------------------------------------- B. misbehaving, admitted
def test_oversized_reply_frame_is_refused_from_its_header(warm, flwr_log):
    """The plane's frame cap applies to admitted sessions: a header announcing more than
    ``max_frame`` drops the node at once (the payload is never awaited)."""
    cap = 1 << 20  # every honest frame of this model and batch fits

    def oversized(step, session, reply):
        session.sock.sendall(HEADER.pack(MAGIC, int(Kind.REPLY), cap + 1))
        hang_on(session)

    run = run_stream(app_with(by_hand(oversized)), plane_kwargs={"max_frame": cap})
    reason = f"frame of {cap + 1} bytes exceeds the cap of {cap} bytes"
    assert_dropped_alone(run, reason, good_only_model())
    assert run.seconds < TIMEOUT / 2
    assert f"node {BAD_NODE}: stream session closed: stream: {reason}" in flwr_log.text


@pytest.mark.parametrize("payload", [b"\xff" * 64, b'{"not": "a RecordDict"}'], ids=["bytes", "json"])
def test_garbage_reply_payload_drops_the_node(warm, flwr_log, payload):
    def garbage(step, session, reply):
        send_frame(session.sock, Kind.REPLY, payload)
        hang_on(session)

    run = run_stream(app_with(by_hand(garbage)))
    assert_dropped_alone(run, "payload is not a serialized RecordDict", good_only_model())
    assert run.seconds < TIMEOUT / 2
    assert f"node {BAD_NODE}: stream session closed: stream: payload is not a serialized RecordDict" in flwr_log.text


def test_reply_out_of_turn_drops_the_node(warm):
    """Two replies to one request (sent together, so the second is there before the next
    request would go out): the node is dropped; its first, well-formed batch was trained on
    by its own server copy, which SFL-V1 must not average in (the node did not finish)."""

    def twice(step, session, reply):
        payload = encode_content(reply)
        session.sock.sendall(frame_bytes(Kind.REPLY, payload) + frame_bytes(Kind.REPLY, payload))
        hang_on(session)

    run = run_stream(app_with(by_hand(twice)))
    assert_dropped_alone(run, "client spoke out of turn (REPLY frame while no request was pending)", good_only_model())
    assert run.seconds < TIMEOUT / 2


def spoil(kind: str, reply: RecordDict) -> None:
    record = reply.array_records[p.SMASHED]
    x = torch.from_numpy(record["x.0"].numpy()).clone()
    if kind == "nan":
        x[0, 0, 0, 0] = float("nan")
    else:
        x = x[:, :, :2]
    record["x.0"] = Array(x)


@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_bad_smashed_data_on_the_stream_never_reaches_the_model(warm, kind):
    """The bad node's first batch is spoilt: the reply gate refuses it (as on messages), the
    node sits out the rest of the round, its session is aborted at once, and the model is
    the honest nodes' alone."""
    sent = []

    def spoilt(step, session, reply):
        if p.SMASHED in reply.array_records:
            spoil(kind, reply)
            sent.append(step)
        session.reply(reply)

    run = run_stream(app_with(by_hand(spoilt)))
    errors = run.errors_of(BAD_NODE)
    expected = "contains NaN or infinite values" if kind == "nan" else "wrong shape"
    assert len(errors) == len(sent) == 1, errors
    assert expected in errors[0] and "sits out the rest of the round" in errors[0], errors
    assert [e["node"] for e in run.round["errors"]] == [BAD_NODE]
    assert run.round["examples_per_node"] == {"1000": 48, "1001": 48}
    assert run.round["data_plane"][str(BAD_NODE)] == "stream"
    model = run.model()
    assert all(torch.isfinite(t).all() for t in model.values())
    assert max_abs_diff(model, good_only_model()) == 0.0


# ---------------------------------------------------------------------- C. faults
def snapshot(state: RecordDict) -> dict:
    """A deep copy of a ``context.state`` for comparison."""
    return {
        "arrays": {name: {k: a.numpy().copy() for k, a in rec.items()} for name, rec in state.array_records.items()},
        "configs": {name: dict(rec) for name, rec in state.config_records.items()},
        "metrics": {name: dict(rec) for name, rec in state.metric_records.items()},
    }


def same_state(a: dict, b: dict) -> bool:
    if a["configs"] != b["configs"] or a["metrics"] != b["metrics"] or a["arrays"].keys() != b["arrays"].keys():
        return False
    return all(a["arrays"][n].keys() == b["arrays"][n].keys()
               and all((a["arrays"][n][k] == b["arrays"][n][k]).all() for k in a["arrays"][n]) for n in a["arrays"])


EMPTY = snapshot(RecordDict())


class CrashingModel:
    """``model_fn`` for a client whose forward pass fails at its ``at``-th training call
    (counted over all its client parts; ``at`` None: never). Eval-mode calls, such as the
    client's check that its data fits the model, do not count."""

    def __init__(self, at: Optional[int] = None) -> None:
        self.at, self.calls = at, 0

    def _hook(self, module, inputs):
        if not module.training:
            return
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            raise RuntimeError(f"the client crashed at its forward pass {self.calls}")

    def __call__(self):
        model = model_fn()
        model.blocks[0].register_forward_pre_hook(self._hook)
        return model


def crashing_clients(crash: CrashingModel) -> list[SplitClient]:
    return [SplitClient(crash if i == BAD else model_fn, data, data, salt=i) for i, data in enumerate(PARTS)]


class Carriers:
    """``intercept`` of the grid: how each node's ClientApp answered its messages."""

    def __init__(self) -> None:
        self.replies: dict[int, list[Message]] = {}
        self.times: dict[int, list[float]] = {}

    def __call__(self, node_id: int, reply: Message) -> Message:
        self.replies.setdefault(node_id, []).append(reply)
        self.times.setdefault(node_id, []).append(time.monotonic())
        return reply

    def errors(self, node_id: int) -> list[str]:
        return [r.error.reason for r in self.replies.get(node_id, []) if r.has_error()]


@pytest.mark.parametrize("how", ["hangs-up", "raises"])
def test_node_failing_mid_round_is_dropped_at_once(warm, how):
    """A node that hangs up right after its second reply, or whose ClientApp raises at its
    third batch, is dropped at once (long before the timeout), the others finish, nothing of
    its partial round is averaged (SFL-V1: neither its client part nor its server copy, which
    had trained on its first batch(es)), and its ``context.state`` is not written."""
    carriers = Carriers()
    if how == "hangs-up":
        def hang_up(step, session, reply):
            session.reply(reply)
            if step == 1:
                session.sock.close()
                raise ConnectionError("the node crashed")

        # the session's end (EOF; or a reset or failed send when the next request was already on
        # its way) and the ClientApp's failed message race: whichever the plane sees first drops it
        app, reason = app_with(by_hand(hang_up)), ("stream: ", "the client ended its session")
    else:
        app, reason = app_with(None, crashing_clients(CrashingModel(at=3))), "client error: RuntimeError: the client crashed"
    run = run_stream(app, intercept=carriers)
    assert run.seconds < TIMEOUT / 2
    trained = run.strategy.copies[BAD_NODE].stats.samples  # its server copy trained before it failed
    assert trained == 32 if how == "raises" else trained >= 16
    assert len(carriers.errors(BAD_NODE)) == 1  # its ClientApp failed its message
    assert same_state(snapshot(run.grid.contexts[BAD_NODE].state), EMPTY)
    assert all(not same_state(snapshot(run.grid.contexts[n].state), EMPTY) for n in (1000, 1001))
    assert_dropped_alone(run, reason, good_only_model())


def test_state_of_a_node_failing_in_its_second_round_is_that_of_its_first(warm):
    """A node whose ClientApp fails in round 2 keeps the ``context.state`` it committed at the
    end of round 1 (weights, momentum, data cursor), exactly."""
    crash = CrashingModel()
    carriers = Carriers()
    grid = InProcessGrid(app_with(None, crashing_clients(crash)), len(PARTS), threaded=True, intercept=carriers)
    after_first: dict = {}

    def between_rounds(server_round, arrays):
        if server_round == 1:  # every node has committed round 1: crash at round 2's second batch
            after_first.update(snapshot(grid.contexts[BAD_NODE].state))
            crash.at = crash.calls + 2
        return None

    factory, planes = stream_factory()
    strategy = SFLV1(model_fn=model_fn, data_plane_factory=factory, **SETTINGS)
    start = time.monotonic()
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=2,
                       evaluate_fn=between_rounds)
    finally:
        grid.shutdown()
    assert time.monotonic() - start < TIMEOUT / 2
    assert_released(planes[0])
    first, second = strategy.history.rounds
    assert first["errors"] == [] and first["examples_per_node"] == {"1000": 48, "1001": 48, "1002": 48}
    assert [e["node"] for e in second["errors"]] == [BAD_NODE] and "the client crashed" in second["errors"][0]["error"]
    assert second["examples_per_node"] == {"1000": 48, "1001": 48}
    assert after_first and not same_state(after_first, EMPTY)
    assert same_state(snapshot(grid.contexts[BAD_NODE].state), after_first)
    assert len(carriers.errors(BAD_NODE)) == 1


# SFL-V1: in about half the runs on this machine every node is dropped at the timeout, not the
# stalled one alone; reproduced on 612e7f5 too (3 of 4 runs), so older than issue 20/21's changes
# and not understood yet (a 6 s timeout fails the same way, so it is not start-up time): a
# stalled node may hold up the honest ones on the stream plane under SFL-V1. Tracked in the
# issue note; strict=False so a pass is not an error.
@pytest.mark.parametrize("scheme", [SFLV1, PSL], ids=["sflv1", "psl"])
def test_stalled_node_is_dropped_after_the_timeout(warm, scheme):
    """A node that reads its request and never answers is dropped once the plane's timeout
    has passed, not before; the others go on (also in lockstep, where they wait for it). Under
    SFL-V1 the others finish first: their commits are polled while the stalled step is out
    (before the fix about half the runs dropped every node at the timeout)."""
    timeout = 2.0

    def stall(step, session, reply):
        session.reply(reply)
        hang_on(session, within=30.0)

    run = run_stream(app_with(by_hand(stall)), scheme=scheme, timeout=timeout)
    assert timeout <= run.seconds < timeout + 15.0
    assert_dropped_alone(run, f"no reply within {timeout:.0f} s", good_only_model() if scheme is SFLV1 else None)


def test_clients_fail_fast_when_the_server_side_closes_mid_session(warm):
    """The ServerApp's side goes away (``plane.close()``) while every node holds an open
    session, each waiting for its next request: every ClientApp fails its message at once
    (not at its frame timeout) and no ``context.state`` is written."""
    carriers = Carriers()
    grid = InProcessGrid(client_app_for(PARTS), len(PARTS), threaded=True, intercept=carriers)
    plane = StreamDataPlane(grid, TIMEOUT, mode="stream")
    try:
        strategy = SFLV1(model_fn=model_fn, **SETTINGS)  # only to build the round's first requests
        messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
        for message in messages:
            plane.push(message.metadata.dst_node_id, message.content, p.TRAIN_STEP, "1")
        first: dict = {}
        deadline = time.monotonic() + TIMEOUT
        while len(first) < len(PARTS) and time.monotonic() < deadline:
            first.update({r.node_id: r for r in plane.pull()})
        assert all(r.error is None and p.SMASHED in r.content.array_records for r in first.values())
        assert len(first) == len(PARTS)
    finally:
        died = time.monotonic()
        plane.close()
        grid.shutdown()
    assert_released(plane)
    for node in grid.node_ids:
        assert len(carriers.replies[node]) == 1, node
        (error,) = carriers.errors(node)
        assert "SessionError" in error and "stream broke" in error, error
        assert carriers.times[node][0] - died < TIMEOUT / 2
        assert same_state(snapshot(grid.contexts[node].state), EMPTY)


class CrashingServer(SFLV1):
    """SFL-V1 whose ServerApp fails at its second batch (no node can have finished): the
    round's exchange, which the schedule hands every reply, raises there."""

    admitted = 0

    def new_round(self, server_round):
        exchange = super().new_round(server_round)
        admit = exchange.admit

        def crashing_admit(node_id, reply):
            self.admitted += 1
            if self.admitted == 2:
                raise RuntimeError("the ServerApp crashed mid-round")
            return admit(node_id, reply)

        exchange.admit = crashing_admit
        return exchange


def test_serverapp_crash_mid_round_releases_everything_and_clients_write_nothing(warm):
    """``strategy.start`` fails mid-round: the plane is closed on the way out (no stream thread,
    the port closed), every ClientApp fails fast (session broken, or not opened when the
    listener was already gone) and no node's ``context.state`` is written."""
    carriers = Carriers()
    grid = InProcessGrid(client_app_for(PARTS), len(PARTS), threaded=True, intercept=carriers)
    factory, planes = stream_factory()
    strategy = CrashingServer(model_fn=model_fn, data_plane_factory=factory, **SETTINGS)
    try:
        with pytest.raises(RuntimeError, match="the ServerApp crashed mid-round"):
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().blocks.state_dict()), num_rounds=1)
        died = time.monotonic()
        assert_released(planes[0])
    finally:
        grid.shutdown()
    assert time.monotonic() - died < TIMEOUT / 2
    for node in grid.node_ids:
        assert len(carriers.replies[node]) == 1, node
        (error,) = carriers.errors(node)
        assert "SessionError" in error, error
        assert same_state(snapshot(grid.contexts[node].state), EMPTY)


def test_listener_of_a_finished_run_is_gone(warm):
    """After a clean run: no stream thread, the port closed, offers of the run are void."""
    run = run_stream(app_with(None))
    assert run.round["errors"] == []
    offer = SessionOffer(run.plane.listener.address, "ab" * 16, "cd" * 32, run.plane.listener.credentials.cert_pem,
                         run.plane.listener.credentials.fingerprint, 2.0, 2.0, 1 << 20, True)
    with pytest.raises(SessionError, match="could not open"):
        ClientSession.open(offer)
