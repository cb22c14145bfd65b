"""ClientApp: echo each request's array; over a session when the request offers one.

flsplit is imported only when a request offers a session (importing it imports torch): a
request over messages then costs what Flower's message path costs, not a torch import.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

DATA = "split.data"  # the 256 KiB array, both ways
CONTROL = "bench.ctl"  # {"last": bool}: the node's last request of the round
STATUS = "split.status"  # {"done": bool}: the plane ends the session on done=True
TIMING = "bench.client"  # {"prev_reply_s": s, "cpu_s": s}: build+encode+send of the previous reply; process CPU so far
OFFER = "split.stream"  # flsplit.planes.stream.offer.OFFER

app = ClientApp()


def echo(request: RecordDict, prev_reply_s: float = 0.0) -> RecordDict:
    """The request's array back, and ``done`` when the request was the round's last."""
    last = bool(request.config_records[CONTROL].get("last", False))
    return RecordDict({DATA: request.array_records[DATA], STATUS: ConfigRecord({"done": last}),
                       TIMING: ConfigRecord({"prev_reply_s": prev_reply_s, "cpu_s": time.process_time()})})


@app.train("split_step")
def split_step(msg: Message, context: Context) -> Message:
    if OFFER not in msg.content.config_records:  # the message plane: one Flower message per step
        return Message(echo(msg.content), reply_to=msg)
    from flsplit.planes.stream.client_session import ClientSession
    from flsplit.planes.stream.offer import SessionOffer

    from flsplit.planes.endpoint import CallKind

    session = ClientSession.open(SessionOffer.from_content(msg.content))
    with session:
        request, prev, idle = msg.content, 0.0, False
        try:
            while True:  # the session lasts the run: until the server sends CLOSE
                if request is not None:
                    t = time.perf_counter()
                    session.reply(echo(request, prev))
                    prev = time.perf_counter() - t
                call = session.next_call(idle=idle)
                if call.kind is CallKind.CLOSE:
                    break
                request = call.content if call.kind is CallKind.REQUEST else None
                idle = call.kind is not CallKind.REQUEST
                if request is None:
                    session.ack()  # a round committed or forgotten
        except Exception as err:  # tell the server why (best effort), then fail the carrier
            session.fail(f"{type(err).__name__}: {err}")
            raise
    return Message(RecordDict(), reply_to=msg)
