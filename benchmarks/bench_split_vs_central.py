"""Split versus centralized, in one run.

Wall time of ONE epoch of split training driven through the real client and server
runtimes in-process (``flsplit.planes.inprocess.InProcessGrid`` + ``flsplit.runtime.client.SplitClient`` +
the strategies from ``strategies``, ``num_rounds=1``, ``local_epochs=1``), next to plain
centralized training of the same unsplit model on the same batches with the same SGD,
measured interleaved in the same process.

Methods (one epoch over all N samples each; interleaved, every repeat runs all of them):

``central-sl``
    plain loop ``zero_grad / model(x) / loss / backward / step`` over the batches SL uses
    (client 0's batches of 64, then client 1's, ...): the reference for ``sl``.
``central-psl``
    the same loop over PSL's batches: step ``j`` is the concatenation of every client's
    ``j``-th batch (4 x 64 = 256 samples), one mean loss, one SGD step. PSL's server step
    is defined to equal exactly this: the reference for ``psl``.
``central-sl+fwd``, ``central-psl+fwd``
    the same loops plus one extra no-grad forward of the client part (blocks ``[0, cut)``)
    per client batch: the compute a split step does on top of centralized training, because
    the client recomputes its forward when the gradient arrives (by design: nothing survives
    between messages). ``split / central+fwd`` is then the framework's own overhead
    (messages, encoding, checks, state in ``context.state``), ``central+fwd / central`` the
    recompute's.
``psl``
    PSL with ``--clients`` nodes (lockstep; one server step over the union per exchange).
``sl``
    SL with ``--clients`` nodes relayed sequentially (node 0 trains through its partition,
    hands its client part to node 1, ...); every exchange is one batch of 64.
``psl-stream``, ``sl-stream``
    the same over the stream plane (``flsplit.planes.stream.StreamDataPlane``, mode ``stream``): one
    TLS session per node and round on loopback, the ClientApps on worker threads of a
    threaded ``InProcessGrid``; the client keeps its part, optimizer and autograd graph for
    the round (no recompute, no per-batch ``context.state``). Target: at most 1.05 x the
    centralized epoch.

Batches are reproduced exactly from the client's seeded order (``SeedSequence([seed,
partition, epoch])`` -> ``randperm``), so the centralized loops see the same samples in the
same grouping. Data: the MNIST test set (10,000 images) parsed from the official IDX files,
IID-partitioned over the clients; ``--data digits`` falls back to scikit-learn's 8x8 digits
(1,797 images) where MNIST is not available.

Run:  python benchmarks/bench_split_vs_central.py            (about 3 minutes on 2 cores)
      python benchmarks/bench_split_vs_central.py --methods central-sl,sl,sl-stream,central-psl,psl,psl-stream
      python benchmarks/bench_split_vs_central.py --data digits --model digits-cnn --cut 2  (no MNIST)
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import inspect
import io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from flsplit.runtime.client import SplitClient
from flsplit.data.datasets import TensorData
from flsplit.planes.inprocess import InProcessGrid
from flsplit.planes.stream import StreamDataPlane
from flsplit.model.zoo import build_model
from flsplit.strategies import PSL, SL

_MNIST_CANDIDATES = [Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")]
MNIST_DIR = next((d for d in _MNIST_CANDIDATES if (d / "t10k-images-idx3-ubyte.gz").exists()), _MNIST_CANDIDATES[0])


# ---------------------------------------------------------------------------- data
def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian magic (dtype code, ndim), ndim sizes, then the data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_data(name: str, mnist_dir: Path) -> tuple[TensorData, int, str]:
    """All samples as one TensorData, the image side, and a description."""
    if name == "mnist":
        images = _read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
        labels = _read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
        x = ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
        data = TensorData(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels.astype(np.int64)))
        return data, 28, f"MNIST test set ({len(data)} images, 28x28) from {mnist_dir}"
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    data = TensorData(torch.from_numpy(x), torch.from_numpy(bunch.target.astype(np.int64)))
    return data, 8, f"scikit-learn digits ({len(data)} images, 8x8), MNIST fallback"


def partitions(data: TensorData, num: int, seed: int) -> list[TensorData]:
    """IID partitions (seeded shuffle, near-equal sizes)."""
    order = np.random.default_rng(seed).permutation(len(data))
    return [data.subset(torch.from_numpy(idx)) for idx in np.array_split(order, num)]


def client_batches(n: int, batch_size: int, seed: int, salt: int, epoch: int = 0) -> list[torch.Tensor]:
    """The index batches ``SplitClient`` draws in ``epoch`` (same formula as ``SplitClient._batch``)."""
    s = int(np.random.SeedSequence([seed, salt, epoch]).generate_state(1)[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(s))
    return [order[j : j + batch_size] for j in range(0, n, batch_size)]


# ---------------------------------------------------------------------------- probes
class Probes:
    """Wraps library and torch functions with wall-clock timers for one instrumented run.

    Each wrapped call adds its inclusive time under ``"<side>: <label>"``, the side being
    ``client`` inside ``SplitClient.train_step`` and ``server`` elsewhere (strategy driver,
    data plane, server part). Nested probes overlap (e.g. ``_forward`` includes
    ``torch.manual_seed``). Everything is restored on exit. Cost: two ``perf_counter`` calls
    per wrapped call.
    """

    def __init__(self) -> None:
        import flwr.app.message.arrayrecord as arrayrecord_mod
        from flwr.app import Message

        import flsplit.runtime.client as client_mod
        import flsplit.wire.protocol as protocol_mod
        import flsplit.runtime.server as server_mod

        self.targets = [
            (client_mod.SplitClient, "train_step", "SplitClient.train_step (whole)"),
            (client_mod.SplitClient, "_forward", "SplitClient._forward (send + recompute)"),
            (client_mod.SplitClient, "_batch", "SplitClient._batch (SeedSequence + randperm + gather)"),
            (torch, "manual_seed", "torch.manual_seed"),
            (torch, "save", "torch.save (optimizer state)"),
            (torch, "load", "torch.load (optimizer state)"),
            (torch.Tensor, "backward", "Tensor.backward"),
            (torch.optim.SGD, "step", "SGD.step"),
            (torch.optim.Optimizer, "load_state_dict", "Optimizer.load_state_dict"),
            (torch.nn.Module, "load_state_dict", "Module.load_state_dict"),
            (arrayrecord_mod.ArrayRecord, "__init__", "ArrayRecord.__init__ (serialize)"),
            (arrayrecord_mod.ArrayRecord, "to_torch_state_dict", "ArrayRecord.to_torch_state_dict"),
            (protocol_mod, "encode_batches", "protocol.encode_batches"),
            (protocol_mod, "decode_smashed", "protocol.decode_smashed (incl. checks)"),
            (protocol_mod, "encode_grads", "protocol.encode_grads"),
            (protocol_mod, "decode_grads", "protocol.decode_grads"),
            (protocol_mod, "check_tensor", "protocol.check_tensor (torch.isfinite)"),
            (server_mod.ServerPart, "step_each", "ServerPart.step_each"),
            (server_mod.ServerPart, "step_union", "ServerPart.step_union"),
            (Message, "__init__", "Message.__init__"),
        ]
        try:
            from flsplit.wire.codecs import Codec

            self.targets += [(Codec, "encode_into", "Codec.encode_into (isfinite + Array)"),
                             (Codec, "decode_from", "Codec.decode_from")]
        except ImportError:
            pass
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: list[tuple[object, str, object]] = []
        self._in_client = False

    def _wrap(self, owner, name: str, label: str) -> None:
        raw = owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)
        self._saved.append((owner, name, raw))
        func = raw.__func__ if isinstance(raw, staticmethod) else raw
        probes = self
        is_client_entry = label.startswith("SplitClient.train_step")

        def wrapper(*args, **kwargs):
            outer = probes._in_client
            if is_client_entry:
                probes._in_client = True
            side = "client" if probes._in_client else "server"
            t = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                key = f"{side}: {label}"
                probes.seconds[key] += time.perf_counter() - t
                probes.calls[key] += 1
                probes._in_client = outer

        setattr(owner, name, staticmethod(wrapper) if isinstance(raw, staticmethod) else wrapper)

    def __enter__(self) -> "Probes":
        for owner, name, label in self.targets:
            self._wrap(owner, name, label)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, raw in reversed(self._saved):
            setattr(owner, name, raw)
        self._saved.clear()


# ---------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.data, side, self.data_desc = load_data(args.data, Path(args.mnist_dir))
        if args.max_samples:
            self.data = self.data.subset(slice(0, args.max_samples))
        self.side = side
        self.parts = partitions(self.data, args.clients, args.seed)
        self.model_fn = self._model_fn
        self.clients = [SplitClient(self.model_fn, train_data=part, salt=i) for i, part in enumerate(self.parts)]
        self.app = ClientApp()

        @self.app.train("split_step")
        def split_step(msg: Message, ctx: Context) -> Message:
            return self.clients[int(ctx.node_config["partition-id"])].train_step(msg, ctx)

        # Same batches as the clients draw (epoch 0, seeded by partition id).
        b = args.batch_size
        self.batches = [
            [part.subset(idx) for idx in client_batches(len(part), b, args.seed, i)]
            for i, part in enumerate(self.parts)
        ]
        # A step: (the batch trained on, the client batches it is made of).
        self.sl_steps = [(batch, [batch]) for per_client in self.batches for batch in per_client]
        self.psl_steps = []
        for j in range(max(len(bs) for bs in self.batches)):
            chunk = [bs[j] for bs in self.batches if j < len(bs)]
            union = TensorData(torch.cat([c.x for c in chunk]), torch.cat([c.y for c in chunk]))
            self.psl_steps.append((union, chunk))
        self.client_batches = sum(len(bs) for bs in self.batches)
        self.last_models: dict[str, torch.nn.Module] = {}

    def _model_fn(self):
        torch.manual_seed(self.args.seed)
        return build_model(self.args.model, 10, 1, self.side)

    # --- centralized
    def central(self, steps: list[tuple[TensorData, list[TensorData]]], extra_fwd: bool = False) -> tuple[float, float]:
        model = self.model_fn().blocks
        model.train()
        client_part = model[: self.args.cut]
        opt = torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=self.args.momentum)
        loss_fn = torch.nn.CrossEntropyLoss()
        t, c = time.perf_counter(), time.process_time()
        for batch, parts in steps:
            if extra_fwd:  # what the split client computes twice: its part's forward
                with torch.no_grad():
                    for part in parts:
                        client_part(part.x)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch.x), batch.y)
            loss.backward()
            opt.step()
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        self.last_models["central"] = model
        return seconds, cpu

    # --- split
    def strategy(self, name: str):
        cls = {"psl": PSL, "sl": SL}[name]
        return cls(
            model_fn=self.model_fn,
            input_shape=(1, self.side, self.side),
            num_classes=10,
            cut_layer=self.args.cut,
            batch_size=self.args.batch_size,
            local_epochs=1,
            learning_rate=self.args.lr,
            momentum=self.args.momentum,
            seed=self.args.seed,
            min_available_nodes=self.args.clients,
            min_train_nodes=self.args.clients,
        )

    def split(self, name: str) -> tuple[float, float, dict]:
        stream = name.endswith("-stream")
        strategy = self.strategy(name.removesuffix("-stream"))
        if stream:
            strategy.data_plane_factory = lambda grid, timeout: StreamDataPlane(grid, timeout, mode="stream")
        grid = InProcessGrid(self.app, self.args.clients, threaded=stream)
        initial = ArrayRecord(self.model_fn().blocks.state_dict())
        t, c = time.perf_counter(), time.process_time()
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        grid.shutdown()
        model = self.model_fn().blocks
        model.load_state_dict(result.arrays.to_torch_state_dict())
        self.last_models[name] = model
        rec = strategy.history.rounds[-1]
        return seconds, cpu, {"server_steps": rec["server_steps"], "messages": rec["messages"],
                         "num_examples": rec["num_examples"], "train_loss": rec["train_loss"]}

    @torch.no_grad()
    def full_loss(self, model: torch.nn.Module) -> tuple[float, float]:
        model.eval()
        logits = torch.cat([model(self.data.x[i : i + 1000]) for i in range(0, len(self.data), 1000)])
        return (torch.nn.functional.cross_entropy(logits, self.data.y).item(),
                (logits.argmax(1) == self.data.y).double().mean().item())


def run_method(bench: Bench, method: str) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds of this process, details."""
    if method.startswith("central-"):
        steps = bench.sl_steps if method.startswith("central-sl") else bench.psl_steps
        return (*bench.central(steps, extra_fwd=method.endswith("+fwd")), {"steps": len(steps)})
    return bench.split(method)


def breakdown(bench: Bench, method: str, cprofile_top: int = 0) -> dict:
    """Instrumented runs of one split method: where the time of a client batch goes.

    Three runs: plain (the reference total), with ``Probes`` (inclusive times per function
    and side), and optionally under cProfile (its own-time top list; it inflates
    Python-heavy code, so read it for shape, not for absolute values).
    """
    n = bench.client_batches
    plain = bench.split(method)[0]
    with Probes() as probes:
        t = time.perf_counter()
        bench.split(method)
        probed = time.perf_counter() - t
    rows = {k: {"seconds": v, "calls": probes.calls[k], "ms_per_call": 1e3 * v / probes.calls[k],
                "ms_per_client_batch": 1e3 * v / n}
            for k, v in sorted(probes.seconds.items(), key=lambda kv: -kv[1])}
    client = probes.seconds.get("client: SplitClient.train_step (whole)", 0.0)
    server_step = sum(v for k, v in probes.seconds.items() if k.startswith("server: ServerPart.step_"))
    out = {"client_batches": n, "plain_s": plain, "probed_s": probed, "rows": rows,
           "client_train_step_s": client, "server_step_s": server_step,
           "driver_rest_s": probed - client - server_step}
    if cprofile_top:
        prof = cProfile.Profile()
        prof.enable()
        bench.split(method)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(cprofile_top)
        out["cprofile_top_tottime"] = buf.getvalue()
    return out


def _ms(fn, n: int = 100) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def pieces(bench: Bench) -> dict[str, float]:
    """Milliseconds per call of the pieces a split step is made of, at this model/cut/batch.

    Calls the library's own functions on tensors of the benchmark's shapes, so the sum can be
    set against the measured per-step overhead.
    """
    from flwr.app import ConfigRecord

    from flsplit.wire import protocol as p

    args = bench.args
    client = bench.clients[0]
    cfg = p.SplitConfig(server_round=1, cut=args.cut, batch_size=args.batch_size, momentum=args.momentum,
                        learning_rate=args.lr, seed=args.seed)
    part = bench.model_fn().client_part(args.cut)
    x, y = client._batch(cfg, 1)
    out = part(x)
    grad = torch.randn_like(out)
    opt = torch.optim.SGD(part.parameters(), lr=args.lr, momentum=args.momentum)
    out.backward(grad)
    opt.step()  # momentum buffers exist, as in the state a client saves
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    optim_bytes = buf.getvalue()
    weights = ArrayRecord(part.state_dict())
    # The wire API with or without codecs (flsplit.wire.codecs arrived while this was written).
    try:
        from flsplit.wire.codecs import get_codec

        native = get_codec("native")
    except ImportError:
        native = None
    with_codec = native is not None and "codec" in inspect.signature(p.encode_batches).parameters
    if with_codec:
        encode_batches = lambda b: p.encode_batches(b, native)  # noqa: E731
        encode_grads = lambda g: p.encode_grads(g, native)  # noqa: E731
        decode_smashed = lambda r, shape: p.decode_smashed(r, shape, torch.float32, 10, native)  # noqa: E731
        decode_grads = lambda r: p.decode_grads(r, native, torch.float32)  # noqa: E731
    else:
        encode_batches, encode_grads = p.encode_batches, p.encode_grads
        decode_smashed = lambda r, shape: p.decode_smashed(r, shape, torch.float32, 10)  # noqa: E731
        decode_grads = p.decode_grads
    try:  # a wire API that changed again is reported as n/a
        smashed = encode_batches([p.SmashedBatch(out.detach(), y)])
        grads = encode_grads([grad])
    except Exception:  # noqa: BLE001
        smashed = grads = None
    shape = tuple(out.shape[1:])
    full = bench.model_fn().blocks

    def fwd_bwd():
        o = part(x)
        o.backward(grad)

    def full_step():
        full.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(full(x), y).backward()

    def save_opt():
        b = io.BytesIO()
        torch.save(opt.state_dict(), b)
        ConfigRecord({"state": b.getvalue()})

    def load_opt():
        o = torch.optim.SGD(part.parameters(), lr=args.lr, momentum=args.momentum)
        o.load_state_dict(torch.load(io.BytesIO(optim_bytes), weights_only=True))

    def no_grad_forward():
        with torch.no_grad():
            part(x)

    cases = [
        ("client part forward, no grad (next batch)", no_grad_forward),
        ("client part forward with grad (the recompute)", lambda: part(x)),
        ("client part forward+backward", fwd_bwd),
        ("whole model forward+backward, batch (reference)", full_step),
        ("torch.manual_seed (in _forward, x2 per step)", lambda: torch.manual_seed(1)),
        ("  alternative: torch.default_generator.manual_seed", lambda: torch.default_generator.manual_seed(1)),
        ("_batch (SeedSequence + randperm + gather)", lambda: client._batch(cfg, 1)),
        ("optimizer state torch.save -> ConfigRecord", save_opt),
        ("SGD() + torch.load optimizer state", load_opt),
        ("weights ArrayRecord(state_dict)", lambda: ArrayRecord(part.state_dict())),
        ("weights to_torch_state_dict + load_state_dict", lambda: part.load_state_dict(weights.to_torch_state_dict())),
        ("encode_batches (1 smashed batch)", lambda: encode_batches([p.SmashedBatch(out.detach(), y)])),
        ("decode_smashed (1 batch, checks included)", lambda: decode_smashed(smashed, shape)),
        ("encode_grads (1 batch)", lambda: encode_grads([grad])),
        ("decode_grads (1 batch)", lambda: decode_grads(grads)),
        ("check_tensor: torch.isfinite(t).all() on smashed", lambda: bool(torch.isfinite(out).all())),
        ("  alternative: np.isfinite(t.numpy()).all()", lambda: bool(np.isfinite(out.detach().numpy()).all())),
    ]
    out_ms: dict[str, float | None] = {}
    for label, fn in cases:
        try:
            out_ms[label] = _ms(fn)
        except Exception:  # noqa: BLE001  (an API that changed under the benchmark)
            out_ms[label] = None
    return out_ms


def machine() -> dict:
    import flwr

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__, "torch_threads": torch.get_num_threads()}


TARGETS = {("psl", "central-psl"): 1.15, ("sl", "central-sl"): 1.15,
           ("psl-stream", "central-psl"): 1.05, ("sl-stream", "central-sl"): 1.05}
DECOMPOSITION = [  # (label, numerator, denominator)
    ("target: PSL over the stream / centralized on PSL's batches", "psl-stream", "central-psl"),
    ("target: SL over the stream / centralized on SL's batches", "sl-stream", "central-sl"),
    ("stream plane / message plane, PSL", "psl-stream", "psl"),
    ("stream plane / message plane, SL", "sl-stream", "sl"),
    ("target: PSL / centralized on PSL's union batches", "psl", "central-psl"),
    ("target: SL / centralized on SL's batches", "sl", "central-sl"),
    ("PSL / centralized on SL's batches (same samples, batch 64)", "psl", "central-sl"),
    ("recompute: central-psl+fwd / central-psl", "central-psl+fwd", "central-psl"),
    ("recompute: central-sl+fwd / central-sl", "central-sl+fwd", "central-sl"),
    ("framework: PSL / central-psl+fwd", "psl", "central-psl+fwd"),
    ("framework: SL / central-sl+fwd", "sl", "central-sl+fwd"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["mnist", "digits"], default="mnist",
                    help="mnist: the MNIST test set from --mnist-dir; digits: sklearn fallback")
    ap.add_argument("--mnist-dir", default=str(MNIST_DIR))
    ap.add_argument("--max-samples", type=int, default=0, help="use only the first N samples (0 = all)")
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--cut", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="central-sl,central-sl+fwd,sl,central-psl,central-psl+fwd,psl")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the instrumented runs and the pieces")
    ap.add_argument("--profile-top", type=int, default=0, help="also cProfile the split runs, print the top N by own time")
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO block per strategy.start otherwise
    if args.data == "mnist" and not (Path(args.mnist_dir) / "t10k-images-idx3-ubyte.gz").exists():
        print(f"MNIST not found under {args.mnist_dir}: use --data digits", file=sys.stderr)
        return 2
    bench = Bench(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    info = machine()
    load_before = os.getloadavg()
    print(f"# {bench.data_desc}; {args.clients} IID partitions of ~{len(bench.parts[0])}")
    print(f"# model {args.model}, cut {args.cut}, batch {args.batch_size}, SGD lr {args.lr} momentum {args.momentum}")
    print(f"# {info}")
    print(f"# SL = {args.clients} clients relayed sequentially; PSL = {args.clients} clients in lockstep; "
          f"{bench.client_batches} client batches per epoch")
    print(f"# load average before: {load_before[0]:.2f}", flush=True)

    # warm-up (allocator, lazy imports, per-thread client parts), not measured
    for m in methods:
        run_method(bench, m)

    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    extra: dict[str, dict] = {}
    for r in range(args.repeats):
        row = []
        for m in methods:
            seconds, cpu_s, ex = run_method(bench, m)
            times[m].append(seconds)
            cpu[m].append(cpu_s)
            extra[m] = ex
            row.append(f"{m} {seconds:.3f}")
        print(f"repeat {r + 1}/{args.repeats} (s): " + ", ".join(row), flush=True)
    load_after = os.getloadavg()

    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    ratios = {}
    for label, a, b in DECOMPOSITION:
        if a in times and b in times:
            per_repeat = [x / y for x, y in zip(times[a], times[b])]
            per_repeat_cpu = [x / y for x, y in zip(cpu[a], cpu[b])]
            ratios[f"{a}/{b}"] = {"label": label, "median_of_ratios": statistics.median(per_repeat),
                                  "ratio_of_medians": med[a] / med[b], "min": min(per_repeat), "max": max(per_repeat),
                                  "cpu_median_of_ratios": statistics.median(per_repeat_cpu)}

    print("\nmethod            median_s    min_s    max_s  median_cpu_s  steps")
    for m in methods:
        ex = extra[m]
        steps = ex.get("steps", ex.get("server_steps"))
        print(f"{m:16s} {med[m]:8.3f} {min(times[m]):8.3f} {max(times[m]):8.3f} {med_cpu[m]:10.3f}     {steps}"
              + (f" server steps, {ex['messages']} messages" if "messages" in ex else ""))
    print("\nratio (per repeat, same run)                               median  [min, max]       CPU-time median")
    for key, v in ratios.items():
        a, b = key.split("/")
        target = ""
        if (a, b) in TARGETS:
            goal = TARGETS[(a, b)]
            target = f"   target <= {goal}: " + ("met" if v["median_of_ratios"] <= goal else "MISSED")
        print(f"{v['label']:58s} {v['median_of_ratios']:6.3f}  [{v['min']:.3f}, {v['max']:.3f}]  {v['cpu_median_of_ratios']:6.3f}{target}")
    print(f"# load average after: {load_after[0]:.2f}")

    # sanity: the models trained (loss on all samples after the epoch)
    print("\nsanity (loss/accuracy on all samples after one epoch):")
    sanity = {}
    weights = {}
    for m in methods:
        if m.endswith("+fwd"):
            continue
        run_method(bench, m)
        model = bench.last_models["central" if m.startswith("central") else m]
        weights[m] = torch.cat([t.flatten() for t in model.state_dict().values()])
        loss, acc = bench.full_loss(model)
        sanity[m] = {"loss": loss, "accuracy": acc}
        print(f"  {m:16s} loss {loss:.4f} acc {acc:.4f}")
    for a, b in TARGETS:
        if a in weights and b in weights:
            diff = float((weights[a] - weights[b]).abs().max())
            sanity[f"max_abs_weight_diff {a} vs {b}"] = diff
            print(f"  max |w_{a} - w_{b}| = {diff:.2e}"
                  + ("  (SL equals centralized when momentum is 0; with momentum the relay restarts "
                     "each client's momentum)" if a.startswith("sl") else "  (PSL client parts train apart between averagings)"))

    results = {"machine": info, "args": vars(args), "data": bench.data_desc, "load_average": [load_before, load_after],
               "times_s": times, "cpu_s": cpu, "median_s": med, "median_cpu_s": med_cpu, "ratios": ratios,
               "sanity": sanity, "extra": extra}
    if not args.no_breakdown:
        results["breakdown"] = {}
        for m in ("psl", "sl"):
            if m not in methods:
                continue
            bd = breakdown(bench, m, args.profile_top)
            results["breakdown"][m] = bd
            n = bd["client_batches"]
            print(f"\nbreakdown {m}: {bd['plain_s']:.3f}s plain, {bd['probed_s']:.3f}s probed = "
                  f"{1e3 * bd['probed_s'] / n:.2f} ms per client batch ({n} batches)")
            print(f"  client train_step {1e3 * bd['client_train_step_s'] / n:6.2f} ms/batch, server step "
                  f"{1e3 * bd['server_step_s'] / n:6.2f} ms/batch, driver + data plane + rest "
                  f"{1e3 * bd['driver_rest_s'] / n:6.2f} ms/batch")
            print(f"  {'probe (inclusive; nested probes overlap)':66s} {'calls':>6s} {'ms/call':>8s} {'ms/batch':>9s}")
            for label, r in bd["rows"].items():
                print(f"  {label:66s} {r['calls']:6d} {r['ms_per_call']:8.3f} {r['ms_per_client_batch']:9.3f}")
            if args.profile_top:
                print(bd["cprofile_top_tottime"])
        results["pieces_ms"] = pc = pieces(bench)
        print("\nper-call cost of the pieces (ms, this model/cut/batch, one at a time in a loop):")
        for label, v in pc.items():
            print(f"  {label:52s} " + (f"{v:8.3f}" if v is not None else "     n/a"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
