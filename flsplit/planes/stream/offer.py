"""The session offer: what a node's first train message carries to open its stream session."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from flwr.app import ConfigRecord, RecordDict

from flsplit.wire.protocol import FALLBACK  # a reply sent over messages instead: why (any plane's)

__all__ = ["OFFER", "FALLBACK", "SessionOffer"]

OFFER = "split.stream"  # ConfigRecord in the round's first request


@dataclass(frozen=True)
class SessionOffer:
    """Where and how to open a node's session.

    Attributes
    ----------
    address : str
        ``host:port`` of the ServerApp's listener.
    session_id, secret : str
        The session this offer opens, and its single-use secret (hex).
    cert_pem, fingerprint : str
        The server's certificate (pinned) and its SHA-256 fingerprint.
    timeout : float
        Seconds the client waits for each frame while a round is in progress.
    idle_timeout : float
        Seconds the client waits for the next frame between rounds (its session lasts the
        run; past this it ends the session as if the server had closed it).
    handshake_timeout : float
        Seconds to connect, finish TLS and be welcomed.
    max_frame : int
        Largest payload either side accepts, bytes.
    required : bool
        ``True``: a node that cannot open the session fails the request; ``False``: it
        answers over messages instead and says why.
    detach : bool
        ``True``: the ClientApp answers its Flower message as soon as the session is open and
        serves the session from a thread of its process (Flower's simulation engine, whose
        worker processes outlive a ClientApp and whose actor pool is smaller than the fleet);
        ``False``: it holds the message until the session ends (a deployment, where the
        ClientApp's process ends with its message).
    """

    address: str
    session_id: str
    secret: str
    cert_pem: str
    fingerprint: str
    timeout: float
    handshake_timeout: float
    max_frame: int
    required: bool
    idle_timeout: float = 43200.0
    detach: bool = False

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_content(cls, content: RecordDict) -> Optional["SessionOffer"]:
        """The offer in a request, or ``None`` if it carries none; ``ValueError`` if malformed."""
        record = content.config_records.get(OFFER)
        return None if record is None else cls.from_record(record)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "SessionOffer":
        """The offer an ``OFFER`` record holds; ``ValueError`` if malformed."""
        try:
            return cls(
                address=str(record["address"]),
                session_id=str(record["session_id"]),
                secret=str(record["secret"]),
                cert_pem=str(record["cert_pem"]),
                fingerprint=str(record["fingerprint"]),
                timeout=float(record["timeout"]),
                handshake_timeout=float(record["handshake_timeout"]),
                max_frame=int(record["max_frame"]),
                required=bool(record["required"]),
                idle_timeout=float(record["idle_timeout"]),
                detach=bool(record["detach"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed session offer: {err!r}") from None

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)
