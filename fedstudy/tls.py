"""Mutual TLS on the gRPC link, shared by the aggregator and the trainers.

Both read their certificate, key and the study's CA from a folder: either the layout
``fedstudy certs issue NAME`` writes (``NAME.crt``, ``NAME.key``, ``ca.crt``) or that of a
mounted ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``, ``ca.crt``).
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fedstudy.certs import CA_CERT, Credentials


class TlsError(RuntimeError):
    """Certificates that cannot be used; the message says which file and what to do."""


def add_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    """``--tls-dir`` and ``--insecure``: mutual TLS is on unless ``--insecure`` says so."""
    parser.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help=f"the {who}'s certificate and key ({who}.crt/.key or tls.crt/.key) and the "
        "study's ca.crt (see fedstudy certs)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS at all: only for a network where nobody else can connect",
    )


def credentials_from_args(args: argparse.Namespace, name: str) -> Credentials | None:
    """The credentials ``--tls-dir`` names, or None with ``--insecure``."""
    if args.insecure:
        if args.tls_dir is not None:
            raise TlsError("give --tls-dir or --insecure, not both")
        return None
    if args.tls_dir is None:
        raise TlsError(
            "mutual TLS is on by default: give --tls-dir DIR with the certificate made by "
            "'fedstudy certs issue', or --insecure on a network nobody else can reach"
        )
    return load_credentials(args.tls_dir, name)


@dataclass(frozen=True)
class CredentialFiles:
    """Where a certificate, its key and the study's CA are (for libraries that read files,
    such as XGBoost's federated mode)."""

    cert: Path
    key: Path
    ca: Path


def credential_files(directory: Path, name: str) -> CredentialFiles:
    """Finds ``NAME.crt``/``NAME.key`` (or ``tls.crt``/``tls.key``) and ``ca.crt``."""
    for stem in (name, "tls"):
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        if cert.is_file() and key.is_file():
            break
    else:
        raise TlsError(
            f"no certificate for {name} in {directory}: expected {name}.crt and {name}.key "
            "(or tls.crt and tls.key from a Kubernetes Secret); make them with "
            f"'fedstudy certs issue {name}'"
        )
    ca = directory / CA_CERT
    if not ca.is_file():
        raise TlsError(f"no {CA_CERT} in {directory}: copy the study's CA certificate there")
    return CredentialFiles(cert, key, ca)


def load_credentials(directory: Path, name: str) -> Credentials:
    """Reads ``NAME.crt``/``NAME.key`` (or ``tls.crt``/``tls.key``) and ``ca.crt``."""
    files = credential_files(directory, name)
    try:
        return Credentials(files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes())
    except OSError as e:
        raise TlsError(f"cannot read the certificates in {directory}: {e.strerror}") from None


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    """Server side: present our certificate, require one signed by the study's CA."""
    return grpc.ssl_server_credentials(
        [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=True
    )


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    """Client side: trust only the study's CA, present the site's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca, private_key=creds.key, certificate_chain=creds.cert
    )


def open_channel(
    target: str, creds: Credentials | None, server_name: str | None = None
) -> grpc.Channel:
    """A channel to ``target``: mutual TLS with ``creds``, plain with None.

    ``server_name`` checks the server's certificate against that name instead of the host
    in ``target`` (an aggregator reached through an address its certificate does not list).
    """
    if creds is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, channel_credentials(creds), options=options)


def peer_name(context: grpc.ServicerContext) -> str | None:
    """The common name of the client's verified certificate, or None without TLS."""
    # At run time the values are lists of bytes (the stubs say otherwise).
    names: Any = context.auth_context().get("x509_common_name")
    if not names:
        return None
    return str(names[0].decode("utf-8", errors="replace"))


def peer_certificate_sha256(context: grpc.ServicerContext) -> str | None:
    """The SHA-256 fingerprint (of the DER form, hex) of the client's verified certificate,
    or None without TLS."""
    pems: Any = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        cert = x509.load_pem_x509_certificate(bytes(pems[0]))
    except ValueError:
        return None
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
