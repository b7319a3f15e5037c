"""The HTTP endpoints, and ``fedstudy aggregator`` as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from aggtest import Site, StartFn, initialise, model, study_doc
from fedstudy_aggregator.server import public_host, split_address

from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_healthz_status_and_metrics_over_http(start: StartFn) -> None:
    agg = start()
    http = agg.endpoint["http"]
    assert get(f"http://{http}/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    a, b = initialise(agg, "s0", "s1")
    assert a.report(0, {"loss": 0.5, "auc": 0.6}).accepted
    assert b.report(0, {"loss": 0.7, "auc": 0.8}, test=120).accepted
    assert a.submit(model(1.0), 1).accepted
    code, ctype, body = get(f"http://{http}/status")
    assert (code, ctype) == (200, "application/json")
    st = json.loads(body)
    assert st["study"] == "demo"
    assert (st["state"], st["round"], st["completed_rounds"], st["planned_rounds"]) == (
        "training",
        1,
        0,
        2,
    )
    assert (st["min_sites"], st["joined"]) == (2, ["s0", "s1"])
    assert st["sites"]["s0"]["answered"] is True
    assert st["sites"]["s1"]["answered"] is False
    assert st["sites"]["s0"]["last_round"] == 1
    assert st["sites"]["s1"]["metrics"] == {"loss": 0.7, "auc": 0.8}
    assert st["sites"]["s1"]["train_samples"] == 100
    # weighted by test samples 40 and 120
    assert st["global"]["auc"] == pytest.approx(0.25 * 0.6 + 0.75 * 0.8)
    assert st["refused_updates"] == {}
    assert st["ended_reason"] is None
    code, ctype, body = get(f"http://{http}/metrics")
    assert code == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    assert 'fedstudy_sites_answered{study="demo"} 1.0' in body
    assert get(f"http://{http}/nope")[0] == 404


def test_addresses() -> None:
    assert split_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_address("[::]:7700") == ("::", 7700)
    assert public_host("0.0.0.0") == "127.0.0.1"
    assert public_host("::") == "[::1]"
    assert public_host("localhost") == "localhost"
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address("nowhere")


def aggregator(tmp_path: Path, study: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedstudy",
            "aggregator",
            "--study",
            str(study),
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--insecure",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def endpoint(tmp_path: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    path = tmp_path / "state" / "endpoint.json"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists():
            ep: dict[str, object] = json.loads(path.read_text())
            if ep["pid"] == proc.pid:
                return ep
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no endpoint.json")


def write_study(tmp_path: Path, **spec: object) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc(**spec)))
    return path


def test_bad_study_file_exits_non_zero_with_the_problems(tmp_path: Path) -> None:
    doc = study_doc()
    doc["spec"]["rounds"] = 0
    doc["spec"]["bogus"] = 1
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = aggregator(tmp_path, path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "spec.rounds:" in err
    assert "spec.bogus: unknown field" in err
    assert not (tmp_path / "state" / "endpoint.json").exists()


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    proc = aggregator(tmp_path, write_study(tmp_path))
    try:
        ep = endpoint(tmp_path, proc)
        assert str(ep["grpc"]).startswith("127.0.0.1:")
        assert not str(ep["grpc"]).endswith(":0")
        status = json.loads(get(f"http://{ep['http']}/status")[2])
        assert status["state"] == "waiting"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert '"event": "exit"' in err


def test_process_exits_once_every_site_heard_done(tmp_path: Path) -> None:
    study = write_study(tmp_path, sites=1, minSites=1, rounds=1)
    proc = aggregator(tmp_path, study, "--out", str(tmp_path / "out"), "--linger", "30")
    try:
        ep = endpoint(tmp_path, proc)
        with grpc.insecure_channel(str(ep["grpc"])) as channel:
            s = Site(pb_grpc.AggregatorStub(channel), "s0")
            assert s.join().accepted
            assert s.task().kind == pb.TaskResponse.INIT
            assert s.submit(model(0), 0).accepted
            assert s.task().kind == pb.TaskResponse.TRAIN
            assert s.submit(model(1.0), 1).accepted
            assert s.task().kind == pb.TaskResponse.FINISH
            assert s.report(1, {"auc": 0.9}, final=True, local_only={"auc": 0.8}).accepted
            assert s.task().kind == pb.TaskResponse.DONE
        started = time.monotonic()
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - started < 10  # well before the 30 s linger
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["completed"] is True
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "round-complete" in events
    assert events[-1] == "exit"
