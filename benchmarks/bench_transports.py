"""Transports: round-trip time of a 256 KB request/reply between two processes on 127.0.0.1.

One exchange sends ``--payload`` bytes (default 262144) from the client and gets the same number
of bytes back from an echo server started in a child process (multiprocessing, 'spawn'). Each
transport gets 50 warm-up round trips, then ``--repeats`` timed ones (``time.perf_counter``);
median, p10 and p90 are reported in milliseconds.

Transports:

1. stdlib TCP: blocking ``socket``, 4-byte length-prefixed frames, TCP_NODELAY on both ends;
2. stdlib TLS: the same wrapped by ``ssl``, TLS 1.3 only, an ephemeral self-signed certificate
   (``cryptography``) pinned by the client through ``cadata``, hostname check off;
3. gRPC bidi: one bidirectional stream (sync API, generic handlers, identity bytes serializers,
   no .proto), insecure channel; the client feeds the stream from a queue, one message a step;
4. gRPC bidi TLS: the same over ``ssl_server_credentials`` / ``ssl_channel_credentials`` with the
   same certificate and ``grpc.ssl_target_name_override``.

"Two clients" rows (stdlib TLS and gRPC TLS): one server process, two connections driven in
lockstep from one parent thread (send to both, then wait for both replies); the time is per step.

Run: ``python benchmarks/bench_transports.py [--repeats 500] [--json benchmarks/out/transports.json]``
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import multiprocessing as mp
import os
import platform
import queue
import socket
import ssl
import statistics
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
SERVER_NAME = "flsplit.bench"
SERVICE, METHOD = "flsplit.bench.Echo", "Exchange"
HEADER = struct.Struct("!I")
WARMUP = 50


def make_certificate() -> tuple[bytes, bytes]:
    """Generate an ephemeral self-signed P-256 certificate.

    Returns
    -------
    tuple of bytes
        ``(cert_pem, key_pem)``; the certificate names ``SERVER_NAME`` and ``HOST`` in its SAN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _identity(data: bytes) -> bytes:
    return data


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """Read exactly ``n`` bytes; ``None`` on a clean end of stream before the first byte."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"stream ended after {got} of {n} bytes")
        got += k
    return buf


def _send_frame(sock: socket.socket, data: bytes | bytearray) -> None:
    sock.sendall(HEADER.pack(len(data)) + data)  # one send: no small header segment


def _recv_frame(sock: socket.socket) -> bytearray | None:
    header = _recv_exact(sock, HEADER.size)
    return None if header is None else _recv_exact(sock, HEADER.unpack(header)[0])


def _serve_socket(tls: bool, cert_file: str, key_file: str, port_conn, stop) -> None:
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert_file, key_file)

    def echo(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True)
        with sock:
            while (frame := _recv_frame(sock)) is not None:
                _send_frame(sock, frame)

    def accept(listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    listener = socket.create_server((HOST, 0))
    threading.Thread(target=accept, args=(listener,), daemon=True).start()
    port_conn.send(listener.getsockname()[1])
    stop.wait()


def _echo_stream(requests, context: grpc.ServicerContext):
    yield from requests


def _serve_grpc(tls: bool, cert_file: str, key_file: str, port_conn, stop) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(
        _echo_stream, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    if tls:
        key_pem, cert_pem = Path(key_file).read_bytes(), Path(cert_file).read_bytes()
        port = server.add_secure_port(f"{HOST}:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    else:
        port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    port_conn.send(port)
    stop.wait()
    server.stop(0)


def serve(kind: str, tls: bool, cert_file: str, key_file: str, port_conn, stop) -> None:
    """Child-process entry point: run the ``kind`` echo server until ``stop`` is set."""
    (_serve_socket if kind == "socket" else _serve_grpc)(tls, cert_file, key_file, port_conn, stop)


class SocketClient:
    """Blocking stdlib TCP client, optionally TLS 1.3 pinned to ``cert_pem``."""

    def __init__(self, port: int, cert_pem: bytes | None) -> None:
        sock = socket.create_connection((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.detail = "plain"
        if cert_pem is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False
            ctx.load_verify_locations(cadata=cert_pem.decode())
            sock = ctx.wrap_socket(sock)
            self.detail = f"{sock.version()} {sock.cipher()[0]}"
        self.sock = sock

    def send(self, payload: bytes) -> None:
        _send_frame(self.sock, payload)

    def recv(self) -> int:
        frame = _recv_frame(self.sock)
        return -1 if frame is None else len(frame)

    def close(self) -> None:
        self.sock.close()


class GrpcClient:
    """One bidi stream on its own channel, fed from a queue (sync gRPC API)."""

    def __init__(self, port: int, cert_pem: bytes | None) -> None:
        options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1)]
        target = f"{HOST}:{port}"
        if cert_pem is None:
            self.channel, self.detail = grpc.insecure_channel(target, options), "insecure"
        else:
            options.append(("grpc.ssl_target_name_override", SERVER_NAME))
            creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
            self.channel, self.detail = grpc.secure_channel(target, creds, options), "TLS"
        grpc.channel_ready_future(self.channel).result(timeout=30)
        call = self.channel.stream_stream(
            f"/{SERVICE}/{METHOD}", request_serializer=_identity, response_deserializer=_identity
        )
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.responses = call(iter(self.requests.get, None))

    def send(self, payload: bytes) -> None:
        self.requests.put(payload)

    def recv(self) -> int:
        return len(next(self.responses))

    def close(self) -> None:
        self.requests.put(None)
        for _ in self.responses:
            pass
        self.channel.close()


def measure(
    kind: str, tls: bool, n_clients: int, payload: bytes, repeats: int, files: tuple[str, str]
) -> dict:
    """Time lockstep round trips of ``n_clients`` connections to one server process.

    Parameters
    ----------
    kind : {"socket", "grpc"}
        Transport; ``tls`` adds TLS with the certificate in ``files`` (``(cert_file, key_file)``).
    n_clients : int
        Connections driven in lockstep from this thread (send to all, then wait for all).
    payload : bytes
        Request; the server echoes it back. ``repeats`` timed steps follow ``WARMUP`` untimed ones.

    Returns
    -------
    dict
        Median, p10, p90 (ms) of the per-step time, plus the setup.
    """
    ctx = mp.get_context("spawn")
    port_recv, port_send = ctx.Pipe(duplex=False)
    stop = ctx.Event()
    proc = ctx.Process(target=serve, args=(kind, tls, *files, port_send, stop), daemon=True)
    proc.start()
    if not port_recv.poll(60):
        proc.terminate()
        raise RuntimeError(f"{kind} server did not start")
    port = port_recv.recv()
    cert_pem = Path(files[0]).read_bytes() if tls else None
    client_cls = SocketClient if kind == "socket" else GrpcClient
    clients: list[SocketClient | GrpcClient] = []
    times: list[float] = []
    try:
        clients = [client_cls(port, cert_pem) for _ in range(n_clients)]
        for i in range(WARMUP + repeats):
            t0 = time.perf_counter()
            for c in clients:
                c.send(payload)
            lengths = [c.recv() for c in clients]
            dt = time.perf_counter() - t0
            if any(n != len(payload) for n in lengths):
                raise RuntimeError(f"bad reply lengths {lengths}")
            if i >= WARMUP:
                times.append(dt * 1e3)
    finally:
        for c in clients:
            c.close()
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    median = statistics.median(times)
    return {
        "transport": f"{'stdlib' if kind == 'socket' else 'gRPC bidi'} {'TLS' if tls else 'plain'}",
        "kind": kind,
        "tls": tls,
        "detail": clients[0].detail if clients else "",
        "clients": n_clients,
        "median_ms": median,
        "p10_ms": deciles[0],
        "p90_ms": deciles[8],
        "mb_per_s": 2 * n_clients * len(payload) / 1e6 / (median / 1e3),
    }


def table(results: list[dict]) -> str:
    """Render ``results`` as a markdown table."""
    lines = ["| transport | detail | clients | median ms | p10 ms | p90 ms | MB/s both ways (median) |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['transport']} | {r['detail']} | {r['clients']} | {r['median_ms']:.3f} | "
              f"{r['p10_ms']:.3f} | {r['p90_ms']:.3f} | {r['mb_per_s']:.0f} |" for r in results]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=500, help="timed round trips per transport")
    parser.add_argument("--payload", type=int, default=262144, help="bytes each way")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here as JSON")
    args = parser.parse_args()

    payload = os.urandom(args.payload)
    cert_pem, key_pem = make_certificate()
    cases = [("socket", False, 1), ("socket", True, 1), ("grpc", False, 1), ("grpc", True, 1),
             ("socket", True, 2), ("grpc", True, 2)]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = (os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem"))
        Path(files[0]).write_bytes(cert_pem)
        Path(files[1]).write_bytes(key_pem)
        for kind, tls, n in cases:
            results.append(measure(kind, tls, n, payload, args.repeats, files))
            print(f"done: {results[-1]['transport']} x{n}", flush=True)

    print(f"\n{args.payload} bytes each way, {WARMUP} warm-up + {args.repeats} timed round trips\n")
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "processor": platform.processor(),
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "grpcio": grpc.__version__, "openssl": ssl.OPENSSL_VERSION}  # fmt: skip
        doc = {"payload_bytes": args.payload, "warmup": WARMUP, "repeats": args.repeats,
               "machine": machine, "results": results}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
