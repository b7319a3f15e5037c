"""Study CAs and certificates: the TLS handshake accepts the study's sites and nobody else."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml

from fedstudy.certs import Credentials, common_name, fingerprint, issue_cert, make_ca
from fedstudy.wire import aggregator_pb2, aggregator_pb2_grpc


class _EchoIdentity(aggregator_pb2_grpc.AggregatorServicer):
    def Join(  # noqa: N802 - gRPC method name
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        names = context.auth_context().get("x509_common_name", [])
        return aggregator_pb2.JoinResponse(accepted=True, message=b",".join(names).decode())


@pytest.fixture
def ca() -> tuple[bytes, bytes]:
    return make_ca("heart")


@pytest.fixture
def server(ca: tuple[bytes, bytes]) -> Iterator[int]:
    creds = issue_cert("aggregator", *ca, server=True, hosts=["127.0.0.1", "localhost"])
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(_EchoIdentity(), srv)
    port = srv.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(creds.key, creds.cert)], root_certificates=ca[0], require_client_auth=True
        ),
    )
    srv.start()
    yield port
    srv.stop(None)


def _join(port: int, server_ca: bytes, client: Credentials) -> str:
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(
            root_certificates=server_ca, private_key=client.key, certificate_chain=client.cert
        ),
    )
    with channel:
        stub = aggregator_pb2_grpc.AggregatorStub(channel)
        reply: aggregator_pb2.JoinResponse = stub.Join(aggregator_pb2.JoinRequest(), timeout=5)
        return reply.message


def test_site_identity_comes_from_its_certificate(server: int, ca: tuple[bytes, bytes]) -> None:
    site = issue_cert("cleveland", *ca)
    assert common_name(site.cert) == "cleveland"
    assert _join(server, ca[0], site) == "cleveland"


def test_certificate_from_another_ca_is_refused(server: int, ca: tuple[bytes, bytes]) -> None:
    stranger = issue_cert("cleveland", *make_ca("other"))
    with pytest.raises(grpc.RpcError) as info:
        _join(server, ca[0], stranger)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(server: int, ca: tuple[bytes, bytes]) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = issue_cert("cleveland", *ca, days=1, not_before=start)
    with pytest.raises(grpc.RpcError) as info:
        _join(server, ca[0], expired)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_fingerprints_differ_per_certificate(ca: tuple[bytes, bytes]) -> None:
    a, b = issue_cert("a", *ca), issue_cert("a", *ca)
    assert len(fingerprint(a.cert)) == 64
    assert fingerprint(a.cert) != fingerprint(b.cert)


def test_certs_commands_make_a_ca_a_site_certificate_and_a_secret(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fedstudy", "certs", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    d = tmp_path / "ca"
    assert run("init", "--study", "heart", "--dir", str(d)).returncode == 0
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    again = run("init", "--study", "heart", "--dir", str(d))
    assert again.returncode == 1
    assert "exists" in again.stderr
    r = run("issue", "va", "--dir", str(d), "--secret", "--study", "heart", "--namespace", "x")
    assert r.returncode == 0, r.stderr
    secret = yaml.safe_load(r.stdout)
    assert secret["kind"] == "Secret"
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"] == {
        "name": "heart-va-tls",
        "namespace": "x",
        "labels": {"app.kubernetes.io/part-of": "fedstudy"},
    }
    cert = base64.b64decode(secret["data"]["tls.crt"])
    assert common_name(cert) == "va"
    assert cert == (d / "va" / "va.crt").read_bytes()
    assert (d / "va" / "va.key").stat().st_mode & 0o777 == 0o600
    missing = run("issue", "va", "--dir", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert "run fedstudy certs init first" in missing.stderr
