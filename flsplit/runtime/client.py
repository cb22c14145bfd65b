"""The ClientApp side of the split exchange over Flower messages: an adapter over the trainer.

``SplitClient`` turns Flower messages into calls on a ``flsplit.runtime.trainer.ClientTrainer`` (the
client part, its optimizer and the data cursor; no Flower types) and back. Nothing survives
in memory between messages (deployment starts a fresh process per message, simulation routes
a node's messages to different workers), so the trainer's state lives in ``context.state``:
the client part's weights, the optimizer's momentum, the data cursor. The autograd graph
cannot survive either: the trainer recomputes a batch's forward pass (same weights, data and
dropout seed) when its gradient arrives. ``context.state`` is written only once a request
has been handled without error.

A train request that offers a plane's session is different: the node is then served over
that session for the run (``flsplit.runtime.node_session``), with its trainer in memory; the
handlers' ``*_content`` forms answer the session's other requests.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from flsplit.wire import protocol as p
from flsplit.model import rng
from flsplit.model.splitting import exchanged_keys, split_model_of
from flsplit.wire.codecs import get_codec
from flsplit.data.datasets import TensorData
from flsplit.planes.endpoint import ClientEndpoint, Offer, PlaneError, offer_in, offer_records
from flsplit.model.splitting import SplitModel
from flsplit.wire.gate import check_records, check_state
from flsplit.runtime.node_session import NodeSession
from flsplit.runtime.trainer import ClientTrainer, Cursor, model_input, module_dtype, round_steps

__all__ = ["SplitClient", "MODEL_SEED"]

# The seed ``model_fn`` runs under, on a fork of torch's CPU generator: building the scratch
# modules draws nothing from the global stream (which dropout draws from). Their initial
# weights never matter: every request's weights are loaded into them.
MODEL_SEED = 0

# The records each kind of request may hold (ArrayRecords, ConfigRecords); nothing else. A
# train request may also hold one registered plane's session offer (``_request_records``).
_REQUEST_RECORDS = {
    "train": ({p.CLIENT_PART, p.GRAD, p.BCAST, p.ACTS}, {p.CONFIG, p.BCAST_CONFIG}),
    "upload": (set(), {p.CONFIG}),
    "evaluate": ({p.CLIENT_PART}, {p.CONFIG}),
}


def _request_records(kind: str, offers: bool) -> tuple[set[str], set[str]]:
    """The ArrayRecords and ConfigRecords a ``kind`` request may hold (with the planes' offer
    records when ``offers``: a round's first train request)."""
    arrays, configs = _REQUEST_RECORDS[kind]
    return arrays, (configs | offer_records()) if offers else configs

_WEIGHTS = "flsplit.client.weights"
_OPTIM = "flsplit.client.optim"
_CURSOR = "flsplit.client.cursor"


def _momentum_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """The optimizer's state tensors as arrays (keys of ``flsplit.runtime.optim.state_tensors``)."""
    return ArrayRecord({key: Array(value) for key, value in state.items()})


def _momentum_of(record: Optional[ArrayRecord]) -> dict[str, torch.Tensor]:
    if record is None:
        return {}
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def _torch_error(err: Optional[BaseException]) -> Optional[RuntimeError]:
    """The innermost ``RuntimeError`` among ``err`` and its causes (torch's own message)."""
    found, seen = None, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RuntimeError):
            found = err
        err = err.__cause__ or err.__context__
    return found


def _cursor_of(record: ConfigRecord) -> Cursor:
    return Cursor(int(record["position"]), int(record["round_end"]), [int(v) for v in record["pending"]],
                  int(record["num_examples"]))


class SplitClient:
    """Handles the split-learning messages of one ClientApp.

    Parameters
    ----------
    model_fn : callable
        Returns the full model (only its client blocks are used): a ``SplitModel``, or a plain
        ``nn.Module`` that ``flsplit.as_split_model`` splits, given the first two training
        samples (else evaluation samples) as its example batch. Called under ``MODEL_SEED``
        on a fork of torch's generator (the global stream does not move), once to check the
        data against the model and once per worker thread and cut; the module is then reused
        as scratch space, its weights always reloaded from the message or ``context.state``.
    train_data : TensorData
        The local training data.
    eval_data : TensorData, optional
        Local evaluation data for ``evaluate.split_eval``.
    salt : int, optional
        Distinguishes this client's shuffling from other clients' (e.g. the partition id).
        ``None``: under ``flsplit.split_client_app`` the node's partition id (else its node
        id), used directly 0.

    The node's first message (of any kind but ``noop``) checks the data's per-sample shape
    against the model: against the model's ``input_shape`` where it has one, else by running
    one sample through it. Data that does not fit raises ``ValueError`` naming the node and
    both shapes (or torch's message), at that message and every later one: the ServerApp gets
    an error reply, not a failure deep in the exchange.
    """

    def __init__(
        self,
        model_fn: Callable[[], SplitModel | nn.Module],
        train_data: TensorData,
        eval_data: Optional[TensorData] = None,
        salt: Optional[int] = None,
    ) -> None:
        self.model_fn = model_fn
        self.train_data = train_data
        self.eval_data = eval_data
        self.salt = salt
        self._scratch = threading.local()
        self._fit_lock = threading.Lock()
        self._misfit: Optional[tuple[Optional[str]]] = None  # (why the data does not fit, or None); None: unchecked

    # ------------------------------------------------------------------ helpers
    @property
    def _salt(self) -> int:
        return 0 if self.salt is None else int(self.salt)

    def _example_input(self) -> Optional[torch.Tensor]:
        """The first two samples of the training data, else of the evaluation data."""
        for data in (self.train_data, self.eval_data):
            if data is not None and len(data):
                return data.x[:2]
        return None

    def _build_model(self) -> SplitModel:
        """A fresh model from ``model_fn`` (split if it is a plain module), built under
        ``MODEL_SEED`` so that torch's global stream does not move."""
        with rng.seeded(MODEL_SEED):
            return split_model_of(self.model_fn(), self._example_input())

    def _client_part(self, cut: int, tail_cut: int = 0) -> nn.Sequential:
        cache = self._scratch.__dict__.setdefault("parts", {})
        if (cut, tail_cut) not in cache:
            model = self._build_model()
            if tail_cut >= model.num_blocks:
                raise p.ProtocolError(f"tail-cut {tail_cut} is outside the model: the client's tail needs at least "
                                      f"its last block (tail cuts up to {model.num_blocks - 1})")
            cache[(cut, tail_cut)] = model.client_part(cut, tail_cut)
        return cache[(cut, tail_cut)]

    def check_data(self, context: Context) -> None:
        """Raise ``ValueError`` if this client's data does not fit the model (checked once;
        the answer is kept)."""
        with self._fit_lock:
            if self._misfit is None:
                self._misfit = (self._data_misfit(),)
        if self._misfit[0] is not None:
            raise ValueError(f"node {context.node_id}: {self._misfit[0]}")

    def _data_misfit(self) -> Optional[str]:
        """Why the training or evaluation data does not fit the model, or ``None``."""
        with rng.seeded(MODEL_SEED):
            built = self.model_fn()
            example = self._example_input()
            try:
                model = split_model_of(built, example)
            except Exception as err:  # a plain module, split with this data as its example batch
                cause = _torch_error(err)
                if example is None or cause is None:
                    raise  # not the data: the model cannot be split
                return f"data of per-sample shape {tuple(example.shape[1:])} does not fit the model: {cause}"
        expected = getattr(model, "input_shape", None)
        seen = set()
        for data in (self.train_data, self.eval_data):
            if data is None or not len(data) or tuple(data.x.shape[1:]) in seen:
                continue
            shape = tuple(data.x.shape[1:])
            seen.add(shape)
            if expected is not None:
                expected = tuple(expected)
                if len(shape) != len(expected) or any(e is not None and e != s for s, e in zip(shape, expected)):
                    return f"data has per-sample shape {shape}, the model takes {expected}"
                continue
            blocks = model.blocks
            blocks.eval()  # a throwaway model: no batch-norm statistics to keep
            try:
                with torch.no_grad(), rng.seeded(MODEL_SEED):
                    blocks(model_input(data.x[:1], blocks))
            except RuntimeError as err:
                return f"data of per-sample shape {shape} does not fit the model: {err}"
        return None

    def config_and_part(self, content: RecordDict, kind: str, offers: Optional[bool] = None) -> tuple[p.SplitConfig, nn.Sequential]:
        """The request's ``SplitConfig`` and the client-part module for its cut, after checking
        that the request holds only the records a ``kind`` request may hold (a session offer
        too when ``offers``; default: for a train request, which may open a session)."""
        arrays, configs = _request_records(kind, offers=kind == "train" if offers is None else offers)
        check_records(content, arrays, set(), configs, {p.CONFIG}, f"{kind} request")
        cfg = p.SplitConfig.from_record(content.config_records[p.CONFIG])
        return cfg, self._client_part(cfg.cut, cfg.tail_cut)

    def _start_weights(self, content: RecordDict, part: nn.Module) -> dict[str, torch.Tensor]:
        """The request's client part, checked against the module: exactly its keys, shapes and
        dtypes, finite values (``load_state_dict`` alone would cast dtypes and take NaN)."""
        state, keys = part.state_dict(), exchanged_keys(part)  # frozen weights do not travel
        return check_state(content.array_records[p.CLIENT_PART], {k: state[k] for k in keys}, f"'{p.CLIENT_PART}'")

    # ------------------------------------------------------------------ train
    def train_step(self, message: Message, context: Context) -> Message:
        """One fused exchange: apply the gradients of the pending batches, send the next ones.

        A request that carries a session offer of a registered plane (``flsplit.planes.endpoint``)
        runs the node's whole round over that session instead (``train_session``).
        """
        self.check_data(context)
        offered = offer_in(message.content)  # ProtocolError if malformed
        if offered is not None:
            return self.train_session(message, context, *offered)
        cfg, part = self.config_and_part(message.content, "train")
        trainer, new_round = self.trainer_for(message.content, cfg, part, context)
        reply = self.advance(trainer, message.content, new_round, context, keep_graph=False)
        self.save(trainer, context)  # the request was handled: only now does the node's state change
        return Message(reply, reply_to=message)

    def train_session(self, message: Message, context: Context, endpoint: ClientEndpoint, offer: Offer) -> Message:
        """Serve the node over a plane's session for the run (``flsplit.runtime.node_session``):
        this round and the later ones, with the trainer in memory (and, with one batch per
        exchange, the autograd graph of the pending batch), ``context.state`` written at each
        commit. The carrier is answered with an empty acknowledgement when the session ends,
        or at once when the offer says ``detach`` (the session is then served from a thread).
        If the session does not open and the offer allows it, this request is answered over
        messages, saying why (``protocol.FALLBACK``)."""
        content = message.content
        cfg, part = self.config_and_part(content, "train")
        trainer, new_round = self.trainer_for(content, cfg, part, context)
        if not new_round:
            raise p.ProtocolError(f"a session offer must come with the round's '{p.CLIENT_PART}'")
        try:
            session = endpoint.open(offer)
        except PlaneError as err:
            if offer.required:
                raise
            reply = self.advance(trainer, content, new_round, context, keep_graph=False)
            reply[p.FALLBACK] = ConfigRecord({"reason": str(err)[:500]})
            self.save(trainer, context)
            return Message(reply, reply_to=message)
        node = NodeSession(self, session, context)
        if getattr(offer, "detach", False):
            node.start(content, trainer)
        else:
            node.run(content, trainer)
        return Message(RecordDict(), reply_to=message)

    @staticmethod
    def check_same_round(request: RecordDict, cfg: p.SplitConfig) -> None:
        """A request within a round: only the records a train request may hold, the round's
        settings unchanged, and no client part (a round starts once)."""
        arrays, configs = _request_records("train", offers=False)
        check_records(request, arrays, set(), configs, {p.CONFIG}, "train request")
        if p.SplitConfig.from_record(request.config_records[p.CONFIG]) != cfg:
            raise p.ProtocolError("a request of the session changed the round's settings")
        if p.CLIENT_PART in request.array_records:
            raise p.ProtocolError(f"a request within a session carries '{p.CLIENT_PART}': a round starts once")

    def trainer_for(self, content: RecordDict, cfg: p.SplitConfig, part: nn.Module,
                     context: Context) -> tuple[ClientTrainer, bool]:
        """The trainer a request continues: a new round's from its client part, else the one
        saved in ``context.state``."""
        state = context.state
        if p.CLIENT_PART in content.array_records:  # a new round starts from the server's client part
            cursor = state.config_records.get(_CURSOR, ConfigRecord({"position": 0}))
            momentum = _momentum_of(state.array_records.get(_OPTIM)) if cfg.carry_momentum else None
            trainer = ClientTrainer.start_round(part, self.train_data, cfg, self._salt,
                                                self._start_weights(content, part), int(cursor["position"]), momentum)
            return trainer, True
        if _WEIGHTS not in state.array_records or _CURSOR not in state.config_records:
            raise p.ProtocolError(f"no round in progress: the first request must carry '{p.CLIENT_PART}'")
        trainer = ClientTrainer(part, self.train_data, cfg, self._salt, state.array_records[_WEIGHTS].to_torch_state_dict(),
                                _cursor_of(state.config_records[_CURSOR]), _momentum_of(state.array_records.get(_OPTIM)))
        return trainer, False

    def advance(self, trainer: ClientTrainer, content: RecordDict, new_round: bool, context: Context,
                 keep_graph: bool) -> RecordDict:
        """Apply a request's gradients (or skip the pending batches) and build the reply: the
        next batches' smashed data, or the trained client part at the round's end."""
        cfg = trainer.cfg
        if p.ACTS in content.array_records:  # a U-shaped step's second exchange: the tail and the loss
            return self._tail_reply(trainer, content)
        if p.GRAD in content.array_records or p.BCAST in content.array_records:
            grads = p.assemble_grads(
                content.array_records.get(p.GRAD),
                content.array_records.get(p.BCAST),
                content.config_records.get(p.BCAST_CONFIG),
                get_codec(cfg.codec_down),
                module_dtype(trainer.part),
            )
            trainer.apply_gradients(grads)
        else:  # without gradients the pending batches were dropped by the server: skip them
            trainer.skip_pending()
        cursor = trainer.cursor
        reply = RecordDict()
        if new_round:  # tell the server who this device is
            reply[p.DEVICE] = self._device_record(context)
        if cursor.position >= cursor.round_end:
            reply[p.CLIENT_PART] = ArrayRecord(trainer.weights())
            reply[p.METRICS] = MetricRecord({"num-examples": cursor.num_examples})
            reply[p.STATUS] = ConfigRecord({"done": True, "position": cursor.position})
        else:
            position = cursor.position
            batches = trainer.next_batches(keep_graph=keep_graph)
            reply[p.SMASHED] = p.encode_batches(batches, get_codec(cfg.codec_up))
            reply[p.STATUS] = ConfigRecord({"done": False, "position": position, "remaining": cursor.round_end - position})
        return reply

    @staticmethod
    def _tail_reply(trainer: ClientTrainer, content: RecordDict) -> RecordDict:
        """Run a U-shaped split's tail on the server part's output: the gradient at the tail's
        input and the batch's loss go back; the labels stay here."""
        if p.GRAD in content.array_records or p.BCAST in content.array_records or p.CLIENT_PART in content.array_records:
            raise p.ProtocolError(f"a request with '{p.ACTS}' carries nothing else: it is a step's second exchange")
        cfg = trainer.cfg
        acts = p.decode_tensors(content.array_records[p.ACTS], "a", get_codec(cfg.codec_down), module_dtype(trainer.part),
                                p.ACTS)
        position = trainer.cursor.pending[0] if trainer.cursor.pending else trainer.cursor.position
        grads, stats = trainer.tail_step(acts)
        loss = MetricRecord({f"{key}.{i}": value for i, (total, right) in enumerate(stats)
                             for key, value in (("loss-sum", total), ("correct", right))})
        return RecordDict({p.TAIL_GRAD: p.encode_tensors(grads, "t", get_codec(cfg.codec_up)), p.LOSS: loss,
                           p.STATUS: ConfigRecord({"done": False, "position": position})})

    @staticmethod
    def save(trainer: ClientTrainer, context: Context) -> None:
        """The trainer's state into ``context.state`` (weights, momentum, data cursor)."""
        state = context.state
        state.array_records[_WEIGHTS] = ArrayRecord(trainer.weights())
        state.array_records[_OPTIM] = _momentum_record(trainer.momentum())
        state.config_records[_CURSOR] = ConfigRecord(trainer.cursor.as_dict())

    def _device_record(self, context: Context) -> ConfigRecord:
        """Partition id and the numeric device-profile keys of the node config."""
        record = {"partition-id": int(context.node_config.get("partition-id", self._salt))}
        for key in p.DEVICE_KEYS:
            if key in context.node_config:
                record[key] = float(context.node_config[key])
        return ConfigRecord(record)

    def answer(self, message_type: str, content: RecordDict, context: Context) -> RecordDict:
        """The reply to a request other than a train step (``ProtocolError`` for an unknown
        type): what its Flower handler would send, for a session's ``CALL``."""
        handlers = {p.DESCRIBE: self.describe_content, p.UPLOAD: self.upload_content,
                    p.EVALUATE: self.evaluate_content, p.NOOP: lambda content, context: RecordDict()}
        if message_type not in handlers:
            raise p.ProtocolError(f"unknown request type {message_type!r}")
        return handlers[message_type](content, context)

    def describe(self, message: Message, context: Context) -> Message:
        """Who this node is, for a planner (``query.split_device``): partition id, the device
        profile of its node config, and its numbers of training and evaluation samples."""
        return Message(self.describe_content(message.content, context), reply_to=message)

    def describe_content(self, content: RecordDict, context: Context) -> RecordDict:
        """``describe``'s reply."""
        self.check_data(context)
        record = self._device_record(context)
        record["num-train-examples"] = len(self.train_data)
        record["num-eval-examples"] = len(self.eval_data) if self.eval_data is not None else 0
        return RecordDict({p.DEVICE: record})

    # ------------------------------------------------------------------ upload
    def upload(self, message: Message, context: Context) -> Message:
        """One-way upload (async SL, state B): smashed data of a whole window, frozen client part.

        The client part is not trained and no gradient will come back: the client computes
        the window's batches with the weights it holds in ``context.state`` and sends them
        all in this one reply; only the data cursor moves.
        """
        return Message(self.upload_content(message.content, context), reply_to=message)

    def upload_content(self, content: RecordDict, context: Context) -> RecordDict:
        """``upload``'s reply (the cursor in ``context.state`` moves past the window)."""
        self.check_data(context)
        cfg, part = self.config_and_part(content, "upload")
        state = context.state
        if _WEIGHTS not in state.array_records or _CURSOR not in state.config_records:
            raise p.ProtocolError("no client part to upload with: the client has not trained yet")
        trainer = ClientTrainer(part, self.train_data, cfg, self._salt, state.array_records[_WEIGHTS].to_torch_state_dict(),
                                _cursor_of(state.config_records[_CURSOR]))
        batches = trainer.window(round_steps(cfg, len(self.train_data)))
        reply = RecordDict(
            {
                p.SMASHED: p.encode_batches(batches, get_codec(cfg.codec_up)),
                p.METRICS: MetricRecord({"num-examples": sum(int(b.y.shape[0]) for b in batches)}),
            }
        )
        state.config_records[_CURSOR] = ConfigRecord(trainer.cursor.as_dict())
        return reply

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, message: Message, context: Context) -> Message:
        """Send the smashed data of all local evaluation data (eval mode) with its labels."""
        return Message(self.evaluate_content(message.content, context), reply_to=message)

    def evaluate_content(self, content: RecordDict, context: Context) -> RecordDict:
        """``evaluate``'s reply."""
        self.check_data(context)
        cfg, part = self.config_and_part(content, "evaluate")
        if cfg.tail_cut:  # the reply would carry the labels a U-shaped split keeps here
            raise p.ProtocolError("evaluation of a U-shaped split is not supported: its reply would carry the labels")
        if p.CLIENT_PART in content.array_records:
            weights = self._start_weights(content, part)
        elif _WEIGHTS in context.state.array_records:
            weights = context.state.array_records[_WEIGHTS].to_torch_state_dict()
        else:
            raise p.ProtocolError(f"no client part to evaluate: send '{p.CLIENT_PART}'")
        part.load_state_dict(weights, strict=False)  # the exchanged keys, checked: frozen weights stay
        part.eval()
        data = self.eval_data if self.eval_data is not None else TensorData(torch.empty(0), torch.empty(0))
        batches = []
        with torch.no_grad():
            for start in range(0, len(data), cfg.batch_size):
                chunk = data.subset(slice(start, start + cfg.batch_size))
                batches.append(p.SmashedBatch(part(model_input(chunk.x, part)), chunk.y))
        reply = RecordDict(
            {p.SMASHED: p.encode_batches(batches, get_codec(cfg.codec_up)), p.METRICS: MetricRecord({"num-examples": len(data)})}
        )
        return reply

    @staticmethod
    def noop(message: Message, context: Context) -> Message:
        """Answer at once with an empty reply (measures the exchange floor)."""
        return Message(RecordDict(), reply_to=message)
