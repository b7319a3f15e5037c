"""The round lifecycle over real gRPC: join, INIT, rounds, finishing, done, timeouts, leaving."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggtest import STUDY, StartFn, initialise, make_study, model
from safetensors import safe_open
from safetensors.numpy import load_file

from fedstudy.tensors import digest
from fedstudy.wire import aggregator_pb2 as pb

T = pb.TaskResponse


def test_join_refusals(start: StartFn) -> None:
    agg = start(make_study(sites=2))
    wrong = agg.site("s0")
    wrong.study = "other"
    r = wrong.join()
    assert (r.accepted, r.reason) == (False, "wrong-study")
    r = agg.site("nowhere").join()
    assert (r.accepted, r.reason) == (False, "unknown-site")
    assert agg.site("s0").join().accepted
    odd = model()
    odd["b"] = np.zeros(4, np.float32)
    r = agg.site("s1").join(odd)
    assert (r.accepted, r.reason) == (False, "model-mismatch")
    assert "b float32[4]" in r.message
    assert "b float32[3]" in r.message
    # joining again is harmless
    assert agg.site("s0").join().accepted
    assert agg.coord.status()["joined"] == ["s0"]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        (pb.TensorSpec(name="w", dtype="garbage", shape=[2]), "unsupported dtype 'garbage'"),
        (
            pb.TensorSpec(name="w", dtype="float32", shape=[2**32, 2**32]),
            "shape [4294967296, 4294967296] of float32 is more than an array can hold",
        ),
        (pb.TensorSpec(name="", dtype="float32", shape=[2]), "a tensor without a name"),
    ],
    ids=["unknown-dtype", "overflowing-shape", "no-name"],
)
def test_join_with_a_model_no_stream_can_carry_is_refused(
    start: StartFn, spec: pb.TensorSpec, why: str
) -> None:
    # The first join sets the study's model: such a model could never arrive (its initial
    # model would fail inside the aggregator) and every other site's join would mismatch.
    agg = start(make_study(sites=2))
    req = pb.JoinRequest(study=STUDY, site="s0", train_samples=10, test_samples=5, model=[spec])
    r = agg.stub.Join(req, timeout=5)
    assert (r.accepted, r.reason) == (False, "model-mismatch")
    assert why in r.message
    a = agg.site("s0")
    assert a.join().accepted
    assert agg.site("s1").join().accepted
    assert a.task().kind == T.INIT
    assert a.submit(model(0), 0).accepted


def test_init_lease_goes_to_one_site_at_a_time(start: StartFn) -> None:
    agg = start(make_study(sites=2, roundTimeoutSeconds=0.3))
    a, b = agg.site("s0"), agg.site("s1")
    assert b.task().kind == T.REJOIN  # not joined yet
    a.join()
    b.join()
    assert a.task().kind == T.INIT
    assert b.task().kind == T.WAIT
    assert a.task().kind == T.INIT  # the holder may ask again
    time.sleep(0.35)  # the lease lapses: the next site asking gets INIT
    assert b.task().kind == T.INIT
    assert a.task().kind == T.WAIT
    # a late initial model from the first holder still counts, once
    assert a.submit(model(0), 0).accepted
    r = b.submit(model(0), 0)
    assert (r.accepted, r.reason) == (False, "stale-round")
    assert agg.coord.status()["state"] == "training"


def test_initial_model_must_match_the_joined_signature(start: StartFn) -> None:
    agg = start(make_study(sites=2))
    a = agg.site("s0")
    a.join()
    assert a.task().kind == T.INIT
    bad = model()
    bad["b"] = np.zeros(3, np.float64)
    r = a.submit(bad, 0)
    assert (r.accepted, r.reason) == (False, "wrong-dtype")
    nan = model()
    nan["w"][0, 0] = np.nan
    assert a.submit(nan, 0).reason == "non-finite"
    assert a.task().kind == T.INIT
    assert a.submit(model(0), 0).accepted


def test_full_round_is_the_weighted_average(start: StartFn, tmp_path: Path) -> None:
    agg = start(make_study(sites=2, rounds=1))
    a, b = initialise(agg, "s0", "s1")
    ta = a.task()
    assert (ta.kind, ta.round, ta.model_version, ta.proximal_mu) == (T.TRAIN, 1, 0, 0.0)
    g0 = a.download(0)
    assert digest(g0) == digest(model(0))
    wa, wb = model(1.0), model(3.0)
    assert a.report(0, {"loss": 0.7, "auc": 0.5}).accepted
    assert a.submit(wa, 1, num_samples=1, train_loss=0.4).accepted
    assert a.task().kind == T.WAIT  # already answered
    assert b.task().kind == T.TRAIN
    assert b.report(0, {"loss": 0.9, "auc": 0.6}).accepted
    assert b.submit(wb, 1, num_samples=3, train_loss=0.2).accepted

    # (1 * wa + 3 * wb) / 4
    g1 = a.download(1)
    np.testing.assert_allclose(g1["w"], np.arange(6).reshape(2, 3) + 2.5)
    np.testing.assert_allclose(g1["b"], [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(g1["steps"], [25, 3])  # (10 + 90) / 4 = 25
    assert list(g1) == ["w", "b", "steps"]
    assert {k: v.dtype for k, v in g1.items()} == {k: v.dtype for k, v in wa.items()}
    with pytest.raises(grpc.RpcError) as err:
        a.download(0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # finishing: FINISH, FINAL reports, then DONE
    tf = a.task()
    assert (tf.kind, tf.model_version) == (T.FINISH, 1)
    assert a.report(1, {"loss": 0.3, "auc": 0.9}, final=True, local_only={"auc": 0.8}).accepted
    assert a.task().kind == T.WAIT
    assert not agg.coord.exit_due(60)
    assert b.report(
        1, {"loss": 0.5, "auc": 0.7}, final=True, local_only={"auc": 0.75}, test=60
    ).accepted
    assert a.task().kind == T.DONE
    assert not agg.coord.exit_due(60)  # b has not heard yet
    assert b.task().kind == T.DONE
    assert agg.coord.exit_due(60)

    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["ended_reason"] is None
    assert (summary["rounds_planned"], summary["rounds_completed"]) == (1, 1)
    assert summary["strategy"] == "fedavg"
    assert summary["model"] == {"file": "model.safetensors", "sha256": digest(g1), "parameters": 11}
    # weighted by test samples 40 and 60
    assert summary["global"]["weighted"]["auc"] == pytest.approx(0.4 * 0.9 + 0.6 * 0.7)
    assert summary["global"]["site_mean"]["auc"] == pytest.approx(0.8)
    assert summary["sites"]["s1"] == {
        "train_samples": 100,
        "test_samples": 40,
        "rounds_participated": 1,
        "federated": {"loss": 0.5, "auc": 0.7},
        "local_only": {"auc": 0.75},
    }
    saved = load_file(str(out / "model.safetensors"))
    for k in g1:
        np.testing.assert_array_equal(saved["model/" + k], g1[k])
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata()["study"] == STUDY
        assert f.metadata()["version"] == "1"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {
            "round": 1,
            "site": "s0",
            "train_samples": 1,
            "train_loss": 0.4,
            "test_samples": 40,
            "loss": 0.3,
            "auc": 0.9,
        },
        {
            "round": 1,
            "site": "s1",
            "train_samples": 3,
            "train_loss": 0.2,
            "test_samples": 60,
            "loss": 0.5,
            "auc": 0.7,
        },
    ]


def test_round_times_out_with_min_sites_answers(start: StartFn) -> None:
    agg = start(make_study(sites=2, minSites=1, roundTimeoutSeconds=0.5))
    a, b = initialise(agg, "s0", "s1")
    opened = time.monotonic()
    assert b.task().kind == T.TRAIN
    assert a.submit(model(4.0), 1).accepted
    assert agg.coord.status()["completed_rounds"] == 0  # s1 may still answer
    agg.wait_for(lambda s: s["completed_rounds"] == 1, timeout=5)
    assert time.monotonic() - opened >= 0.45
    np.testing.assert_allclose(a.download(1)["w"], model(4.0)["w"])
    st = agg.coord.status()
    assert st["joined"] == ["s0", "s1"]  # the straggler stays in the study
    assert st["sites"]["s1"]["last_round"] is None
    tb = b.task()
    assert (tb.kind, tb.round, tb.model_version) == (T.TRAIN, 2, 1)
    # its late round-1 update is stale now
    late = b.submit(model(9.0), 1)
    assert (late.accepted, late.reason) == (False, "stale-round")


def test_round_waits_past_timeout_until_min_sites_answer(start: StartFn) -> None:
    agg = start(make_study(sites=3, minSites=2, roundTimeoutSeconds=0.2))
    a, b, c = initialise(agg, "s0", "s1", "s2")
    assert a.submit(model(1.0), 1).accepted
    time.sleep(0.4)
    assert agg.coord.status()["completed_rounds"] == 0
    assert b.submit(model(2.0), 1).accepted
    agg.wait_for(lambda s: s["completed_rounds"] == 1)
    assert c.task().round == 2


def test_long_poll_wakes_when_the_round_opens(start: StartFn) -> None:
    agg = start(make_study(sites=2))
    a, b = agg.site("s0"), agg.site("s1")
    a.join()
    b.join()
    assert a.task().kind == T.INIT
    started = time.monotonic()
    got: list[pb.TaskResponse] = []
    t = threading.Thread(target=lambda: got.append(b.task(wait=5)))
    t.start()
    time.sleep(0.2)
    assert a.submit(model(0), 0).accepted
    t.join(timeout=5)
    assert got[0].kind == T.TRAIN
    assert time.monotonic() - started < 2
    # with nothing to do, WAIT comes after wait_seconds
    assert a.submit(model(1.0), 1).accepted
    started = time.monotonic()
    assert a.task(wait=0.3).kind == T.WAIT
    assert time.monotonic() - started >= 0.25


def test_a_site_leaving_below_min_sites_ends_the_study(start: StartFn, tmp_path: Path) -> None:
    agg = start(make_study(sites=2, rounds=3))
    a, b = initialise(agg, "s0", "s1")
    assert a.submit(model(1.0), 1).accepted
    assert b.submit(model(1.0), 1).accepted
    assert b.leave("privacy-budget", "epsilon spent").accepted
    st = agg.coord.status()
    assert st["state"] == "done"
    assert "s1 left (privacy-budget: epsilon spent)" in st["ended_reason"]
    assert a.task().kind == T.DONE
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["completed"] is False
    assert summary["rounds_completed"] == 1
    assert "privacy-budget" in summary["ended_reason"]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert agg.coord.exit_due(60)


def test_a_site_leaving_lets_the_round_close_with_the_rest(start: StartFn) -> None:
    agg = start(make_study(sites=3, minSites=2))
    a, b, c = initialise(agg, "s0", "s1", "s2")
    assert a.submit(model(1.0), 1).accepted
    assert b.submit(model(3.0), 1).accepted
    assert c.leave("data-error").accepted
    st = agg.coord.status()
    assert st["completed_rounds"] == 1
    assert st["joined"] == ["s0", "s1"]
    assert c.task().kind == T.REJOIN


def test_refused_and_accepted_counts_show_in_metrics(start: StartFn) -> None:
    agg = start(make_study(sites=2))
    a, _ = initialise(agg, "s0", "s1")
    a.submit(model(1.0), 5)
    text = agg.coord.prometheus()
    assert 'fedstudy_updates_refused_total{reason="future-round",study="demo"} 1.0' in text
    assert 'fedstudy_updates_accepted_total{site="s0",study="demo"} 1.0' in text
    assert Counter(agg.coord.status()["refused_updates"]) == Counter({"future-round": 1})
