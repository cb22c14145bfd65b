"""A node served over one plane session for the whole run: rounds, evaluations and queries.

``SplitClient.train_session`` opens the session a round's first Flower message offers and
hands it here. From then on the node answers the server's calls in turn
(``flsplit.planes.endpoint.Call``):

- a train request that carries ``split.client_part`` starts a round (its trainer: the client
  part, its optimizer, the data cursor, and with one batch per exchange the autograd graph of
  the pending batch, all in memory); later train requests continue it;
- ``COMMIT`` ends the round: the trainer's state goes into ``context.state`` (what a new
  round starts from, and what Flower keeps when the ClientApp ends) and the node acknowledges;
- ``DISCARD`` forgets the round in progress (the node was dropped from it): the next round
  starts from the last committed state, exactly as a node that failed mid-round;
- a request of another type (evaluation, a one-way upload, a planner's query) between
  rounds is answered from the committed state, as the Flower message would have been;
- ``CLOSE`` ends the session: the run is over, or the server renews the session.

Anything else (a request out of place, one that changes a round's settings, data that does
not fit) is a protocol error: the node tells the server why and fails, with its
``context.state`` that of its last committed round.
"""

from __future__ import annotations

import threading
import traceback
from logging import WARNING
from typing import Optional, Protocol

from flwr.app import Context, RecordDict
from flwr.common.logger import log
from torch import nn

from flsplit.planes.endpoint import CallKind, EndpointSession, PlaneError
from flsplit.runtime.trainer import ClientTrainer
from flsplit.wire import protocol as p

__all__ = ["NodeSession", "NodeHandlers"]


class NodeHandlers(Protocol):
    """What a session needs of the node's client (``flsplit.runtime.client.SplitClient``)."""

    def advance(self, trainer: ClientTrainer, content: RecordDict, new_round: bool, context: Context,
                keep_graph: bool) -> RecordDict: ...

    def save(self, trainer: ClientTrainer, context: Context) -> None: ...

    def config_and_part(self, content: RecordDict, kind: str,
                        offers: Optional[bool] = None) -> tuple[p.SplitConfig, nn.Sequential]: ...

    def trainer_for(self, content: RecordDict, cfg: p.SplitConfig, part: nn.Module,
                    context: Context) -> tuple[ClientTrainer, bool]: ...

    def check_same_round(self, request: RecordDict, cfg: p.SplitConfig) -> None: ...

    def answer(self, message_type: str, content: RecordDict, context: Context) -> RecordDict: ...


class NodeSession:
    """Serves one node over ``session`` until the server closes it (see the module docstring).

    Parameters
    ----------
    client : NodeHandlers
        The node's client (a ``SplitClient``: its data, model and handlers).
    session : EndpointSession
        The open session.
    context : Context
        The node's Flower context; ``context.state`` is written at each commit only.
    """

    def __init__(self, client: NodeHandlers, session: EndpointSession, context: Context) -> None:
        self.client, self.session, self.context = client, session, context

    def run(self, first: RecordDict, trainer: ClientTrainer) -> None:
        """Answer the carrier's request (the first round's first), then every call until the
        session closes. ``PlaneError`` if the session breaks; any other error is sent to the
        server first, then raised."""
        client, session, context = self.client, self.session, self.context
        with session:
            try:
                session.reply(client.advance(trainer, first, True, context, keep_graph=_keeps_graph(trainer)))
                current: Optional[ClientTrainer] = trainer
                while True:
                    call = session.next_call(idle=current is None)
                    if call.kind is CallKind.CLOSE:
                        return  # a round still open is forgotten: its state was never committed
                    if call.kind is CallKind.COMMIT:
                        if current is None:
                            raise p.ProtocolError("the server committed a round that is not in progress")
                        client.save(current, context)
                        current = None
                        session.ack()
                    elif call.kind is CallKind.DISCARD:
                        current = None
                        session.ack()
                    elif call.message_type == p.TRAIN_STEP:
                        current = self._train(current, call.content)
                    else:
                        if current is not None:
                            raise p.ProtocolError(f"a '{call.message_type}' request while a round is in progress")
                        session.reply(client.answer(call.message_type, call.content, context))
            except PlaneError:
                raise
            except Exception as err:  # tell the server why, then fail: context.state is the last commit
                session.fail(f"{type(err).__name__}: {err}")
                raise

    def _train(self, current: Optional[ClientTrainer], content: RecordDict) -> ClientTrainer:
        """Start a round (a request with the client part) or continue the current one; reply."""
        client, context = self.client, self.context
        if p.CLIENT_PART in content.array_records:
            if current is not None:
                raise p.ProtocolError("a new round started before the last one was committed or discarded")
            cfg, part = client.config_and_part(content, "train", offers=False)
            current, _ = client.trainer_for(content, cfg, part, context)
            new_round = True
        else:
            if current is None:
                raise p.ProtocolError(f"no round in progress: its first request must carry '{p.CLIENT_PART}'")
            client.check_same_round(content, current.cfg)
            new_round = False
        self.session.reply(client.advance(current, content, new_round, context, keep_graph=_keeps_graph(current)))
        return current

    def start(self, first: RecordDict, trainer: ClientTrainer) -> threading.Thread:
        """``run`` on a daemon thread (a detached session: the ClientApp answers its Flower
        message at once); a failure is logged, the server learns it from the session."""

        def serve() -> None:
            try:
                self.run(first, trainer)
            except Exception as err:  # noqa: BLE001  (the thread's last word)
                log(WARNING, "[flsplit] node %s: detached session ended: %s: %s", self.context.node_id,
                    type(err).__name__, err)
                log(WARNING, "%s", "".join(traceback.format_exception(err))[-2000:])

        thread = threading.Thread(target=serve, name=f"flsplit-node-{self.context.node_id}", daemon=True)
        thread.start()
        return thread


def _keeps_graph(trainer: ClientTrainer) -> bool:
    """With one batch per exchange the pending batch's graph is kept for its gradient; with
    K > 1 each batch is recomputed after the previous step."""
    return trainer.cfg.steps_per_exchange == 1
