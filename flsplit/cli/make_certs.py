"""Make the certificates and node keys of a secure Flower deployment (``flsplit make-certs``).

``flsplit make-certs DIR [--host NAME_OR_IP ...] [--nodes N] [--days D]`` writes what Flower's
own security needs (flwr 1.41 and 1.42):

- ``ca.pem``, ``ca.key``: a certificate authority. The SuperLink gets ``ca.pem`` as
  ``--ssl-ca-certfile``, SuperNodes as ``--root-certificates``, the ``flwr`` CLI as the
  connection's ``root-certificates``. Keep ``ca.key`` offline.
- ``server.pem``, ``server.key``: the SuperLink's TLS certificate (``--ssl-certfile``,
  ``--ssl-keyfile``), signed by the CA, valid for ``127.0.0.1``, ``localhost`` and every
  ``--host`` (the names or addresses SuperNodes and the CLI dial; 127.0.0.1 is always in,
  because the SuperLink's own SuperExec connects to it over loopback).
- ``nodes/node-<i>.key``, ``nodes/node-<i>.pub``: one EC P-384 key pair per SuperNode, in
  the OpenSSH formats Flower reads (what ``ssh-keygen -t ecdsa -b 384`` writes). The public
  key is registered with ``flwr supernode register``; the private key stays on its device
  (``flower-supernode --auth-supernode-private-key``).

All keys are ECDSA (P-384); private keys are written unencrypted with mode 0600.

Exit status: 0 on success, 1 if a file would be overwritten (without ``--force``), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flsplit.cli.args import int_at_least

__all__ = ["DeploymentKeys", "make_ca", "make_server_cert", "make_node_key", "node_key_files", "make_certs",
           "add_arguments"]

#: Names the server certificate always holds: the SuperExec and local tools dial loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_CURVE = ec.SECP384R1  # a NIST curve, as Flower's node authentication requires


@dataclass(frozen=True)
class DeploymentKeys:
    """Paths of the files :func:`make_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys, OpenSSH format
    node_public_keys: tuple[Path, ...]  # public keys, OpenSSH format, same order


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)  # 5 min of clock skew


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"not a host name or IP address: {host!r}")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_ca(common_name: str = "flsplit deployment CA", days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0).

    Parameters
    ----------
    common_name : str
        Subject common name of the CA.
    days : int
        Validity in days.

    Returns
    -------
    tuple
        The CA's private key and certificate.
    """
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hosts``, signed by the CA.

    Parameters
    ----------
    ca_key, ca_cert
        The signing CA (from :func:`make_ca`).
    hosts : sequence of str
        DNS names and IP addresses the certificate is valid for (subject alternative names;
        clients check these, not the common name).
    days : int
        Validity in days.

    Returns
    -------
    tuple
        The server's private key and certificate.
    """
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    key = ec.generate_private_key(_CURVE())
    not_before, not_after = _validity(days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key (EC P-384, a NIST curve as flwr requires)."""
    return ec.generate_private_key(_CURVE())


def node_key_files(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """The private and public key in the OpenSSH formats flwr reads.

    ``flower-supernode --auth-supernode-private-key`` loads the private key with
    ``load_ssh_private_key``; ``flwr supernode register`` loads the public key with
    ``load_ssh_public_key``.
    """
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private and path.exists():
        path.unlink()  # os.open's mode applies to new files only
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with open(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certs(
    out_dir: os.PathLike[str] | str,
    hosts: Sequence[str] = (),
    nodes: int = 2,
    days: int = 365,
    force: bool = False,
) -> DeploymentKeys:
    """Write a CA, a server certificate signed by it, and ``nodes`` SuperNode key pairs.

    Parameters
    ----------
    out_dir : path
        Directory to write into (created if missing).
    hosts : sequence of str
        Extra names or addresses of the SuperLink, besides ``127.0.0.1`` and ``localhost``.
    nodes : int
        Number of SuperNode key pairs (``nodes/node-<i>.key`` / ``.pub``, ``i`` from 0).
    days : int
        Validity of the certificates in days.
    force : bool
        Overwrite existing files instead of refusing.

    Returns
    -------
    DeploymentKeys
        The paths written.
    """
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    out = Path(out_dir)
    names = [*LOOPBACK_HOSTS, *hosts]
    paths = DeploymentKeys(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        node_keys=tuple(out / "nodes" / f"node-{i}.key" for i in range(nodes)),
        node_public_keys=tuple(out / "nodes" / f"node-{i}.pub" for i in range(nodes)),
    )
    # refuse before writing anything, so a refusal leaves no half-made set
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key,
                            *paths.node_keys, *paths.node_public_keys) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists (use --force to overwrite)")
    _san(names)  # a bad host fails before any file is written
    ca_key, ca_cert = make_ca(days=days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, names, days=days)
    pem = serialization.Encoding.PEM
    _write(paths.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(pem), private=False)
    _write(paths.server_key, _pem_key(server_key), private=True)
    for key_path, pub_path in zip(paths.node_keys, paths.node_public_keys):
        private_ssh, public_ssh = node_key_files(make_node_key())
        _write(key_path, private_ssh, private=True)
        _write(pub_path, public_ssh, private=False)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``make-certs`` arguments to ``parser`` and set its handler."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("out_dir", metavar="DIR", type=Path, help="directory to write into (created if missing)")
    parser.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                        help="a name or address SuperNodes and the flwr CLI use to reach the SuperLink; "
                             "repeat for several (127.0.0.1 and localhost are always included)")
    parser.add_argument("--nodes", type=int_at_least(0), default=2, help="SuperNode key pairs to make (default 2)")
    parser.add_argument("--days", type=int_at_least(1), default=365, help="certificate validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    """Run ``flsplit make-certs``; print what was written."""
    try:
        paths = make_certs(args.out_dir, hosts=args.host, nodes=args.nodes, days=args.days, force=args.force)
    except (FileExistsError, ValueError) as exc:
        print(f"flsplit make-certs: {exc}", file=sys.stderr)
        return 1
    print(f"CA certificate      {paths.ca_cert}  (--ssl-ca-certfile, --root-certificates, root-certificates)")
    print(f"CA key              {paths.ca_key}  (keep offline)")
    print(f"server certificate  {paths.server_cert}  (--ssl-certfile)")
    print(f"server key          {paths.server_key}  (--ssl-keyfile)")
    for key, pub in zip(paths.node_keys, paths.node_public_keys):
        print(f"SuperNode key pair  {key}  (--auth-supernode-private-key), {pub}  (flwr supernode register)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``make-certs`` on its own (``python -m flsplit.cli.make_certs DIR``)."""
    parser = argparse.ArgumentParser(prog="flsplit make-certs")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
