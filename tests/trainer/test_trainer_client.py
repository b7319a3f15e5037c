"""The trainer against a fake aggregator on loopback: the protocol, retries, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from fedstudy_trainer.client import Backoff, GaveUp
from fedstudy_trainer.data import load_site_data
from fedstudy_trainer.main import main
from fedstudy_trainer.reference import fedavg
from trainer_support import EventLog, FakeAggregator, breast_cancer_sites, study_doc

from fedstudy.wire import aggregator_pb2 as pb

ROUNDS = 3


def _study_file(tmp_path: Path, **spec: Any) -> Path:
    doc = study_doc(
        breast_cancer_sites(2, skew=0.3),
        task={"label": "malignant"},
        rounds=ROUNDS,
        training={"localSteps": 10, "batchSize": 16, "learningRate": 0.05},
        **spec,
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(study: Path, address: str, tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "--study", str(study), "--site", "site-0", "--aggregator", address,
            "--state-dir", str(tmp_path / "state"), "--wait-seconds", "0.2", "--insecure", *extra,
        ]
    )  # fmt: skip


def test_a_whole_study(tmp_path: Path, serve: Any, events: EventLog) -> None:
    study = _study_file(tmp_path)
    served = serve(FakeAggregator("test-study", ROUNDS))
    fake = served.fake
    assert _run(study, served.address, tmp_path) == 0

    join = fake.joins[0]
    assert (join.study, join.site) == ("test-study", "site-0")
    assert join.train_samples > 0
    assert [(s.name, s.dtype, list(s.shape)) for s in join.model] == [
        ("linear.weight", "float32", [1, 30]),
        ("linear.bias", "float32", [1]),
    ]
    # INIT as round 0, then one update per round, each from the previous version
    assert [(h.round, h.base_version) for h in fake.headers] == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert len({h.update_id for h in fake.headers}) == 4
    assert all(h.num_samples == join.train_samples for h in fake.headers)
    assert all(h.tensor_count == 2 and h.total_bytes == 31 * 4 for h in fake.headers)
    assert all(h.train_loss > 0 for h in fake.headers[1:])

    kinds = [(r.kind, r.model_version) for r in fake.reports]
    assert kinds == [(pb.ReportRequest.EVALUATION, v) for v in range(ROUNDS)] + [
        (pb.ReportRequest.FINAL, ROUNDS)
    ]
    final = fake.reports[-1]
    assert set(final.metrics) == {"loss", "auc", "auprc", "accuracy"}
    assert set(final.local_only_metrics) == {"loss", "auc", "auprc", "accuracy"}
    assert all(r.test_samples == join.test_samples for r in fake.reports)

    state = json.loads((tmp_path / "state" / "trainer.json").read_text())
    assert state["last_round_trained"] == ROUNDS
    assert state["last_update_id"] == fake.headers[-1].update_id
    assert state["last_update_status"] == "accepted"

    names = [n for n, _ in events.events]
    for name in ("data-loaded", "joined", "evaluated", "round-trained", "local-baseline", "done"):
        assert name in names
    trained = events.named("round-trained")
    assert [e["round"] for e in trained] == [1, 2, 3]
    assert all(e["steps"] == 10 and e["seconds"] >= 0 for e in trained)


def test_the_trainers_rounds_equal_the_in_process_reference(
    tmp_path: Path, serve: Any, events: EventLog
) -> None:
    """A one-site study through the wire lands on the reference FedAvg's weights, bit for bit."""
    study_path = _study_file(tmp_path)
    served = serve(FakeAggregator("test-study", ROUNDS))
    assert _run(study_path, served.address, tmp_path) == 0
    from fedstudy.spec import load_study

    study = load_study(study_path)
    data = load_site_data(study, "site-0", tmp_path)
    reference = fedavg(study.spec, {"site-0": data})
    final = served.fake.models[ROUNDS]
    assert all(np.array_equal(final[k], reference.weights[k]) for k in final)


def test_network_failures_are_retried(tmp_path: Path, serve: Any, events: EventLog) -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE
    fake = FakeAggregator(
        "test-study",
        ROUNDS,
        faults={
            "Join": [unavailable],
            "GetTask": [unavailable, grpc.StatusCode.DEADLINE_EXCEEDED],
            "DownloadModel": [unavailable],
            "SubmitUpdate": [unavailable],
            "Report": [unavailable],
        },
    )
    served = serve(fake)
    assert _run(_study_file(tmp_path), served.address, tmp_path) == 0
    retried = {e["call"] for e in events.named("reconnecting")}
    assert retried == {"Join", "GetTask", "DownloadModel", "SubmitUpdate", "Report"}
    assert max(fake.models) == ROUNDS


def test_refusals_and_a_forgetful_aggregator(tmp_path: Path, serve: Any, events: EventLog) -> None:
    fake = FakeAggregator(
        "test-study",
        ROUNDS,
        refuse_updates={0: ["stale-round"], 1: ["duplicate"]},
        forget_after_round=1,
        bad_model_once=True,
        faults={"DownloadModel": [grpc.StatusCode.NOT_FOUND]},
    )
    served = serve(fake)
    assert _run(_study_file(tmp_path), served.address, tmp_path) == 0
    # refused updates are logged, then the task is given again
    assert [e["reason"] for e in events.named("update-refused")] == ["stale-round", "duplicate"]
    assert [e["round"] for e in events.named("round-again")] == [1]
    # a forgotten site is told to REJOIN and joins again
    assert len(fake.joins) == 2
    assert len(events.named("rejoining")) == 1
    # a model of the wrong shape is refused, a NOT_FOUND download abandons the task
    assert events.named("download-refused")[0]["reason"] == "wrong-shape"
    assert events.named("call-failed")[0]["code"] == "NOT_FOUND"
    assert max(fake.models) == ROUNDS


def test_fedprox_mu_comes_from_the_task_and_no_baseline_when_disabled(
    tmp_path: Path, serve: Any, events: EventLog
) -> None:
    served = serve(FakeAggregator("test-study", ROUNDS, proximal_mu=0.5))
    assert _run(_study_file(tmp_path, localBaseline=False), served.address, tmp_path) == 0
    assert {e["proximal_mu"] for e in events.named("round-trained")} == {0.5}
    assert len(served.fake.reports[-1].local_only_metrics) == 0
    assert events.named("local-baseline") == []


def test_a_restarted_trainer_reads_its_state(tmp_path: Path, serve: Any, events: EventLog) -> None:
    study = _study_file(tmp_path)
    assert _run(study, serve(FakeAggregator("test-study", ROUNDS)).address, tmp_path) == 0
    last_id = json.loads((tmp_path / "state" / "trainer.json").read_text())["last_update_id"]
    assert _run(study, serve(FakeAggregator("test-study", ROUNDS)).address, tmp_path) == 0
    loaded = events.named("state-loaded")
    assert [(e["last_round_trained"], e["last_update_id"]) for e in loaded] == [(ROUNDS, last_id)]
    (tmp_path / "state" / "trainer.json").write_text("{not json")
    assert _run(study, serve(FakeAggregator("test-study", 1)).address, tmp_path) == 0
    assert len(events.named("state-unreadable")) == 1


def test_refused_join_exits_2(
    tmp_path: Path, serve: Any, events: EventLog, capsys: pytest.CaptureFixture[str]
) -> None:
    served = serve(FakeAggregator("test-study", ROUNDS, refuse_join="model-mismatch"))
    assert _run(_study_file(tmp_path), served.address, tmp_path) == 2
    assert "model-mismatch" in capsys.readouterr().err
    assert events.named("join-refused")[0]["reason"] == "model-mismatch"


def test_unreachable_aggregator_exits_3(tmp_path: Path, events: EventLog) -> None:
    started = time.monotonic()
    code = _run(_study_file(tmp_path), "127.0.0.1:1", tmp_path, "--connect-timeout", "1")
    assert code == 3
    assert time.monotonic() - started < 10
    assert len(events.named("reconnecting")) >= 2
    assert events.named("gave-up")


def test_bad_study_or_data_exits_2(
    tmp_path: Path, events: EventLog, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _study_file(tmp_path)
    assert _run(study, "127.0.0.1:1", tmp_path, "--site", "nowhere") == 2
    assert "'nowhere' is not in study" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(study.read_text().replace("rounds: 3", "rounds: zero"))
    assert _run(bad, "127.0.0.1:1", tmp_path) == 2
    assert "spec.rounds" in capsys.readouterr().err
    no_label = _study_file(tmp_path, preprocessing={"drop": ["no such column"]})
    assert _run(no_label, "127.0.0.1:1", tmp_path) == 2
    assert "'no such column'" in capsys.readouterr().err


def test_backoff_grows_with_jitter_up_to_the_cap_then_gives_up() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    backoff = Backoff(connect_timeout=30.0, clock=lambda: now[0], sleep=sleep)

    def retry_forever() -> None:
        while True:
            backoff.wait()

    with pytest.raises(GaveUp, match="for 30 s"):
        retry_forever()
    assert 0.1 <= slept[0] <= 0.2
    assert 0.2 <= slept[1] <= 0.4
    assert max(slept) <= 5.0
    assert sum(slept) == pytest.approx(30.0)
    backoff.ok()
    assert backoff.failures == 0


def test_cli_entry_point_logs_json_lines(tmp_path: Path, serve: Any) -> None:
    """The real command (`python -m fedstudy trainer ...`) in its own process."""
    served = serve(FakeAggregator("test-study", 1))
    study = _study_file(tmp_path)
    proc = subprocess.run(
        [
            sys.executable, "-m", "fedstudy", "trainer", "--study", str(study),
            "--site", "site-1", "--aggregator", served.address,
            "--state-dir", str(tmp_path / "s1"), "--wait-seconds", "0.2", "--insecure",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all(line["component"] == "fedstudy.trainer" for line in lines)
    evaluated = [line for line in lines if line["event"] == "evaluated"]
    assert [e["model_version"] for e in evaluated] == [0, 1]
    assert {"loss", "accuracy", "auc"} <= set(evaluated[-1]["metrics"])
