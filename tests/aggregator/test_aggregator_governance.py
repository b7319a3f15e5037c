"""Governance at the aggregator: the audit trail it writes (a hash chain that survives
restarts and torn lines), the IRB gate and the model card it leaves at the end."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from aggtest import Site, StartFn, initialise, make_study, model, study_doc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fedstudy_aggregator import main as aggregator_main
from fedstudy_aggregator.server import AggregatorServer

from fedstudy.audit import AUDIT_FILE, AuditError, AuditLog, read_chain, verify
from fedstudy.certs import issue_cert, make_ca
from fedstudy.modelcard import MODEL_CARD_FILE
from fedstudy.tensors import digest
from fedstudy.tls import open_channel
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

T = pb.TaskResponse


def entries(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / AUDIT_FILE).read_text().splitlines()]


def events(out: Path) -> list[str]:
    return [e["event"] for e in entries(out)]


def play_round(sites: list[Site], r: int) -> None:
    for i, s in enumerate(sites):
        assert (s.task().kind, s.task().round) == (T.TRAIN, r)
        assert s.report(r - 1, {"loss": 0.5, "auc": 0.7}).accepted
        assert s.submit(model(float(r + i)), r, num_samples=10 * (i + 1)).accepted


def finish(sites: list[Site], version: int) -> None:
    for s in sites:
        assert s.task().kind == T.FINISH
        assert s.report(version, {"loss": 0.3, "auc": 0.8}, final=True, local_only={"auc": 0.75})


def test_a_study_writes_its_trail_from_start_to_end(start: StartFn, tmp_path: Path) -> None:
    out = tmp_path / "out"
    agg = start(make_study(2, rounds=2))
    s0, s1 = initialise(agg, "s0", "s1")
    # A refused update (its round is not open yet) is listed with its reason in the next entry.
    assert s1.submit(model(9.0), 2).reason == "future-round"
    play_round([s0, s1], 1)
    play_round([s0, s1], 2)
    finish([s0, s1], 2)
    agg.wait_for(lambda st: st["state"] == "done")

    log = entries(out)
    assert [e["event"] for e in log] == [
        "study-start",
        "site-joined",
        "site-joined",
        "initial-model",
        "round",
        "round",
        "study-end",
    ]
    assert verify(out / AUDIT_FILE).ok
    start_ = log[0]
    assert start_["sites"] == ["s0", "s1"]
    assert len(start_["spec_sha256"]) == 64
    assert log[1]["identity"] == "none"
    assert log[1]["certificate_sha256"] is None
    assert log[3]["model_digest"] == digest(model(0))
    round1 = log[4]
    assert round1["participants"] == [
        {"site": "s0", "samples": 10, "update_digest": digest(model(1.0))},
        {"site": "s1", "samples": 20, "update_digest": digest(model(2.0))},
    ]
    assert round1["samples"] == 30
    assert [(r["site"], r["round"], r["reason"]) for r in round1["refused"]] == [
        ("s1", 2, "future-round")
    ]
    assert log[5]["refused"] == []
    summary = json.loads((out / "summary.json").read_text())
    end = log[6]
    assert end["model_digest"] == summary["model"]["sha256"] == log[5]["model_digest"]
    assert end["completed"] is True
    assert summary["audit"] == {
        "file": AUDIT_FILE,
        "study_end_seq": 7,
        "study_end_hash": end["hash"],
    }
    assert (out / MODEL_CARD_FILE).is_file()


def test_a_restart_goes_on_with_the_chain_and_never_rewrites_it(
    start: StartFn, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    study = make_study(2, rounds=3)
    agg = start(study)
    sites = initialise(agg, "s0", "s1")
    play_round(sites, 1)
    agg.close()
    before = (out / AUDIT_FILE).read_bytes()

    agg = start(study)
    after = (out / AUDIT_FILE).read_bytes()
    assert after.startswith(before)
    log = entries(out)
    resumed = log[-1]
    assert resumed["event"] == "resumed"
    assert resumed["prev"] == log[-2]["hash"]
    assert (resumed["model_version"], resumed["checkpoint_in_trail"]) == (1, True)
    assert resumed["superseded_rounds"] == []
    assert resumed["earlier_entries"] == len(log) - 1
    sites = [agg.site("s0"), agg.site("s1")]
    for s in sites:
        assert s.join().accepted
    play_round(sites, 2)
    assert verify(out / AUDIT_FILE).ok
    assert events(out)[-3:] == ["site-joined", "site-joined", "round"]


def test_a_torn_last_line_is_moved_aside_and_recorded(start: StartFn, tmp_path: Path) -> None:
    out = tmp_path / "out"
    study = make_study(2, rounds=3)
    agg = start(study)
    initialise(agg, "s0", "s1")
    agg.close()
    whole = (out / AUDIT_FILE).read_bytes()
    torn = b'{"event":"round","model_digest":"ab'  # a crash in the middle of a write
    (out / AUDIT_FILE).write_bytes(whole + torn)
    assert not verify(out / AUDIT_FILE).ok

    start(study)
    assert (out / AUDIT_FILE).read_bytes().startswith(whole)
    aside = list(out.glob(f"{AUDIT_FILE}.torn-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == torn
    log = entries(out)
    recovered, resumed = log[-2], log[-1]
    assert recovered["event"] == "recovered"
    assert recovered["torn_file"] == aside[0].name
    assert recovered["torn_bytes"] == len(torn)
    assert recovered["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert resumed["event"] == "resumed"
    assert verify(out / AUDIT_FILE).ok


def test_a_trail_that_does_not_verify_stops_the_aggregator(start: StartFn, tmp_path: Path) -> None:
    out = tmp_path / "out"
    study = make_study(2)
    agg = start(study)
    initialise(agg, "s0", "s1")
    agg.close()
    text = (out / AUDIT_FILE).read_text()
    changed = text.replace('"site":"s1"', '"site":"s9"', 1)
    assert changed != text
    (out / AUDIT_FILE).write_text(changed)
    with pytest.raises(AuditError, match=r"does not verify at line 3 \(site-joined\)"):
        AggregatorServer(study, tmp_path / "state", out, log=logging.getLogger("t"))
    assert (out / AUDIT_FILE).read_text() == changed  # left for inspection


def test_a_crash_between_a_rounds_entry_and_its_checkpoint_leaves_a_valid_chain(
    start: StartFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    study = make_study(2, rounds=3)
    agg = start(study)
    sites = initialise(agg, "s0", "s1")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state"))

    # Round 1's entry is written, then its checkpoint fails: the aggregator halts.
    monkeypatch.setattr(agg.coord.persistence.store, "save", disk_full)
    assert [s.task().kind for s in sites] == [T.TRAIN, T.TRAIN]
    assert sites[0].submit(model(1.0), 1).accepted
    with pytest.raises(grpc.RpcError) as info:
        sites[1].submit(model(2.0), 1)  # the round closes: its entry, then the checkpoint
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert agg.coord.fatal is not None
    assert events(out)[-1] == "round"
    agg.close()
    monkeypatch.undo()

    start(study)
    resumed = entries(out)[-1]
    assert resumed["event"] == "resumed"
    assert resumed["model_version"] == 0
    assert resumed["superseded_rounds"] == [1]
    assert verify(out / AUDIT_FILE).ok


def test_a_failed_append_leaves_no_half_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / AUDIT_FILE)
    log.append("first", n=1)
    before = (tmp_path / AUDIT_FILE).read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        log.append("second", n=2)
    monkeypatch.undo()
    assert (tmp_path / AUDIT_FILE).read_bytes() == before
    log.append("second", n=2)
    chain = read_chain((tmp_path / AUDIT_FILE).read_bytes())
    assert chain.ok
    assert [e["event"] for e in chain.entries] == ["first", "second"]


def test_joins_under_mutual_tls_carry_the_certificate_fingerprint(
    tmp_path: Path, start: StartFn
) -> None:
    ca = make_ca("demo")
    agg = start(make_study(2), tls=issue_cert("aggregator", *ca, server=True, hosts=["127.0.0.1"]))
    creds = issue_cert("s0", *ca)
    channel = open_channel(str(agg.endpoint["grpc"]), creds)
    try:
        assert Site(pb_grpc.AggregatorStub(channel), "s0").join().accepted
    finally:
        channel.close()
    der = x509.load_pem_x509_certificate(creds.cert).public_bytes(Encoding.DER)
    joined = entries(tmp_path / "out")[-1]
    assert joined["event"] == "site-joined"
    assert joined["identity"] == "mutual-tls"
    assert joined["certificate_sha256"] == hashlib.sha256(der).hexdigest()


def test_the_aggregator_refuses_a_study_whose_irb_approval_has_lapsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yesterday = dt.date.today() - dt.timedelta(days=1)
    doc = study_doc(
        2, governance={"irb": {"protocol": "IRB-2019-12", "approvedUntil": str(yesterday)}}
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    state = tmp_path / "state"
    code = aggregator_main.main(
        ["--study", str(path), "--state-dir", str(state), "--insecure", "--listen", "127.0.0.1:0"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"IRB approval of protocol IRB-2019-12 expired on {yesterday.isoformat()}" in err
    assert "spec.governance.irb.approvedUntil" in err
    assert not state.exists()


def test_round_entries_carry_each_sites_epsilon_and_server_dp(
    start: StartFn, tmp_path: Path
) -> None:
    study = make_study(
        2,
        rounds=2,
        privacy={"targetEpsilon": 3.0, "delta": 1e-5},
        serverPrivacy={"clipNorm": 1.0, "noiseMultiplier": 1.5},
    )
    agg = start(study)
    s0, s1 = initialise(agg, "s0", "s1")
    for i, s in enumerate((s0, s1)):
        assert s.task().kind == T.TRAIN
        assert s.report(0, {"loss": 0.5, "epsilon": 0.0, "delta": 1e-5}).accepted
        assert s.submit(model(1.0 + i), 1).accepted
    for i, s in enumerate((s0, s1)):
        assert s.task().round == 2
        assert s.report(1, {"loss": 0.4, "epsilon": 1.25 + i, "delta": 1e-5}).accepted
        assert s.submit(model(2.0 + i), 2).accepted
    rounds = [e for e in entries(tmp_path / "out") if e["event"] == "round"]
    assert rounds[1]["site_epsilon"] == {
        "s0": {"epsilon": 1.25, "through_round": 1},
        "s1": {"epsilon": 2.25, "through_round": 1},
    }
    server = rounds[1]["server_privacy"]
    assert server == agg.coord.server_privacy()
    assert server["rounds"] == 2
    assert server["epsilon"] > rounds[0]["server_privacy"]["epsilon"] > 0
    assert entries(tmp_path / "out")[0]["privacy"] == {"targetEpsilon": 3.0, "delta": 1e-5}
