"""Mutual TLS at the aggregator: the site's identity is its certificate's name."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from aggtest import Site, StartFn, make_study, model, study_doc
from fedstudy_aggregator.server import AggregatorServer

from fedstudy.certs import Credentials, issue_cert, make_ca
from fedstudy.tls import open_channel
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

CA = make_ca("demo")


@pytest.fixture
def server(start: StartFn) -> AggregatorServer:
    creds = issue_cert("aggregator", *CA, server=True, hosts=["127.0.0.1"])
    srv: AggregatorServer = start(make_study(2), tls=creds).server
    return srv


Connect = Callable[[Credentials, str], Site]


@pytest.fixture
def connect(server: AggregatorServer) -> Iterator[Connect]:
    channels: list[grpc.Channel] = []

    def _connect(creds: Credentials, claimed: str) -> Site:
        channel = open_channel(str(server.endpoint["grpc"]), creds)
        channels.append(channel)
        return Site(pb_grpc.AggregatorStub(channel), claimed)

    yield _connect
    for c in channels:
        c.close()


def test_site_with_its_own_certificate_joins_and_works(
    server: AggregatorServer, connect: Connect
) -> None:
    s0 = connect(issue_cert("s0", *CA), "s0")
    assert s0.join().accepted
    assert s0.task().kind == pb.TaskResponse.INIT
    assert s0.submit(model(0), 0).accepted


def test_site_claiming_another_sites_name_is_refused_and_counted(
    server: AggregatorServer, connect: Connect
) -> None:
    impostor = connect(issue_cert("s0", *CA), "s1")
    reply = impostor.join()
    assert not reply.accepted
    assert reply.reason == "identity-mismatch"
    assert "names 's0'" in reply.message
    with pytest.raises(grpc.RpcError) as info:
        impostor.task()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    grant, _ = impostor.reserve(model(0), 0)
    assert (grant.granted, grant.reason) == (False, "identity-mismatch")
    receipt = impostor.submit(model(0), 0)
    assert (receipt.accepted, receipt.reason) == (False, "identity-mismatch")
    assert not impostor.report(0, {"loss": 1.0}).accepted
    assert not impostor.leave("done").accepted
    status = server.coord.status()
    assert status["refused_calls"] == {"identity-mismatch": 6}
    assert status["joined"] == []


def test_certificate_for_a_site_outside_the_study_is_refused(
    server: AggregatorServer, connect: Connect
) -> None:
    stranger = connect(issue_cert("st-elsewhere", *CA), "st-elsewhere")
    reply = stranger.join()
    assert (reply.accepted, reply.reason) == (False, "unknown-site")


@pytest.mark.parametrize("kind", ["other-ca", "expired"])
def test_handshake_refuses_foreign_and_expired_certificates(
    server: AggregatorServer, connect: Connect, kind: str
) -> None:
    if kind == "other-ca":
        creds = issue_cert("s0", *make_ca("demo"))
        creds = Credentials(creds.cert, creds.key, CA[0])  # trusts the real CA itself
    else:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        creds = issue_cert("s0", *CA, days=1, not_before=start)
    with pytest.raises(grpc.RpcError) as info:
        connect(creds, "s0").join()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.coord.status()["joined"] == []


def test_plain_client_cannot_talk_to_a_tls_aggregator(server: AggregatorServer) -> None:
    with (
        grpc.insecure_channel(str(server.endpoint["grpc"])) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        Site(pb_grpc.AggregatorStub(channel), "s0").join()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("component", ["aggregator", "trainer"])
def test_tls_is_on_unless_insecure_is_asked_for(tmp_path: Path, component: str) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(study_doc(2)))
    args = ["--study", str(study), "--state-dir", str(tmp_path / "state")]
    if component == "trainer":
        args += ["--site", "s0", "--aggregator", "127.0.0.1:9"]
    r = subprocess.run(
        [sys.executable, "-m", "fedstudy", component, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    assert "mutual TLS is on by default: give --tls-dir" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "fedstudy", component, *args, "--tls-dir", str(empty)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2
    assert f"no certificate for {'aggregator' if component == 'aggregator' else 's0'} in" in (
        r.stderr
    )
