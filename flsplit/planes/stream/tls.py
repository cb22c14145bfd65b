"""TLS for the stream plane: the server's certificate, and contexts that pin it.

The server either makes an ephemeral self-signed certificate per run (an ECDSA P-256 key
that never leaves the ServerApp's memory) or loads the deployment's own certificate and key.
Either way the certificate's PEM and its SHA-256 fingerprint travel to each client inside
its session offer, i.e. inside a Flower message (authenticated by Flower, and encrypted when
the deployment runs Flower with TLS). The client trusts exactly that certificate: it is the
only trust anchor of its context, and the fingerprint of what the server presents is
compared on top. Host names are not checked: the pin is stronger than a name.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerCredentials", "ephemeral_credentials", "load_credentials", "fingerprint_of_pem", "fingerprint_of_der",
           "server_context", "client_context", "check_pin"]


@dataclass(frozen=True)
class ServerCredentials:
    """The server's certificate chain and key (PEM), and the fingerprint of its certificate."""

    cert_pem: str
    key_pem: str
    fingerprint: str


def fingerprint_of_der(der: bytes) -> str:
    """SHA-256 of a DER certificate, hex."""
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(pem: str) -> str:
    """SHA-256 of the first certificate of a PEM text, hex."""
    return fingerprint_of_der(ssl.PEM_cert_to_DER_cert(_first_cert(pem)))


def _first_cert(pem: str) -> str:
    end = "-----END CERTIFICATE-----"
    if end not in pem:
        raise ValueError("no PEM certificate found")
    return pem[: pem.index(end) + len(end)] + "\n"


def ephemeral_credentials(host: str = "127.0.0.1", days: int = 2) -> ServerCredentials:
    """A fresh self-signed certificate (ECDSA P-256) for this run only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flsplit stream plane (ephemeral)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))])
    except ValueError:
        san = x509.SubjectAlternativeName([x509.DNSName(host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return ServerCredentials(cert_pem, key_pem, fingerprint_of_pem(cert_pem))


def load_credentials(certfile: str, keyfile: str) -> ServerCredentials:
    """The deployment's own certificate (chain, leaf first) and key, from PEM files."""
    cert_pem = Path(certfile).read_text()
    key_pem = Path(keyfile).read_text()
    server_context(ServerCredentials(cert_pem, key_pem, ""))  # fail now if they do not match
    return ServerCredentials(cert_pem, key_pem, fingerprint_of_pem(cert_pem))


def server_context(creds: ServerCredentials) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting ``creds``."""
    import os
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files only; the key lives in a private temporary file for a moment.
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(os.open(cert, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(creds.cert_pem)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(creds.key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


def client_context(cert_pem: str) -> ssl.SSLContext:
    """A TLS 1.3 client context whose only trust anchor is the offered server certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # pinned to one certificate instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-signed leaf may be its own anchor
    ctx.load_verify_locations(cadata=_first_cert(cert_pem))
    return ctx


def check_pin(sock: ssl.SSLSocket, fingerprint: str) -> None:
    """Refuse a server whose certificate is not the pinned one (``ssl.SSLError``)."""
    der = sock.getpeercert(binary_form=True)
    if der is None or fingerprint_of_der(der) != fingerprint:
        raise ssl.SSLError("the server's certificate is not the one pinned in the session offer")
