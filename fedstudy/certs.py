"""A certificate authority per study, and certificates for its aggregator and sites.

A site's certificate carries the site's name as its common name: the aggregator takes the
site's identity from it. ``fedstudy certs init`` makes the CA, ``fedstudy certs issue``
a site (client) or aggregator (server) certificate, optionally as a Kubernetes Secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


@dataclass(frozen=True)
class Credentials:
    """PEM bytes of a certificate, its key and the CA that signed it."""

    cert: bytes
    key: bytes
    ca: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(study: str, days: int = 730) -> tuple[bytes, bytes]:
    """A self-signed CA for one study: (certificate PEM, key PEM)."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstudy"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedstudy study {study} CA"),
        ]
    )
    start = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_cert(
    name: str,
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    *,
    server: bool = False,
    hosts: list[str] | None = None,
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> Credentials:
    """A certificate whose common name is ``name`` (a site, or the aggregator with ``server``).

    ``hosts`` (DNS names or IP addresses) become subject alternative names; a server
    certificate needs the names its clients dial.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by fedstudy certs init")
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    for h in hosts or []:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    start = not_before or (_now() - dt.timedelta(minutes=5))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstudy"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Credentials(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), ca_cert_pem)


def init_ca_dir(study: str, directory: Path, days: int = 730, force: bool = False) -> Path:
    """Writes ``ca.crt`` and ``ca.key`` (mode 0600) into ``directory``."""
    if (directory / CA_KEY).exists() and not force:
        raise FileExistsError(f"{directory / CA_KEY} exists; pass --force to replace the CA")
    cert, key = make_ca(study, days)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_CERT).write_bytes(cert)
    _write_private(directory / CA_KEY, key)
    return directory


def write_credentials(creds: Credentials, directory: Path, name: str) -> None:
    """``<name>.crt``, ``<name>.key`` (0600) and ``ca.crt`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.crt").write_bytes(creds.cert)
    _write_private(directory / f"{name}.key", creds.key)
    (directory / CA_CERT).write_bytes(creds.ca)


def read_credentials(directory: Path, name: str) -> Credentials:
    return Credentials(
        (directory / f"{name}.crt").read_bytes(),
        (directory / f"{name}.key").read_bytes(),
        (directory / CA_CERT).read_bytes(),
    )


def secret_manifest(creds: Credentials, secret_name: str, namespace: str | None = None) -> str:
    """A ``kubernetes.io/tls`` Secret holding the certificate, key and CA."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    metadata: dict[str, object] = {
        "name": secret_name,
        "labels": {"app.kubernetes.io/part-of": "fedstudy"},
    }
    if namespace:
        metadata["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": metadata,
        "data": {"tls.crt": b64(creds.cert), "tls.key": b64(creds.key), "ca.crt": b64(creds.ca)},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def common_name(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a certificate, hex."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()
