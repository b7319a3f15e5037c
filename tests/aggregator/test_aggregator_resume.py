"""Checkpoints: a restarted aggregator resumes from its last complete round."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aggtest import Running, Site, StartFn, initialise, make_study, model
from fedstudy_aggregator.checkpoint import STATE_FILE, CheckpointError

from fedstudy.tensors import digest
from fedstudy.wire import aggregator_pb2 as pb

T = pb.TaskResponse


def play_round(agg: Running, sites: list[Site], r: int) -> None:
    for i, s in enumerate(sites):
        task = s.task()
        assert (task.kind, task.round) == (T.TRAIN, r)
        assert s.report(r - 1, {"loss": 1.0 / r, "auc": 0.5 + 0.1 * i}).accepted
        receipt = s.submit(
            model(float(r + i)), r, num_samples=10 * (i + 1), update_id=f"{s.name}-{r}"
        )
        assert receipt.accepted, receipt
    assert agg.coord.status()["completed_rounds"] == r


def lines(out: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_restart_resumes_after_the_last_complete_round(start: StartFn, tmp_path: Path) -> None:
    study = make_study(sites=2, rounds=3, strategy={"name": "fedadam"})
    agg = start(study)
    sites = initialise(agg, "s0", "s1")
    play_round(agg, sites, 1)
    play_round(agg, sites, 2)
    g2 = sites[0].download(2)
    # round 3 is under way when the aggregator stops: s0's answer is lost with it
    assert sites[0].task().round == 3
    assert sites[0].report(2, {"loss": 0.3, "auc": 0.7}).accepted
    assert sites[0].submit(model(7.0), 3, update_id="s0-3-first").accepted
    agg.close()
    state_files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert state_files == ["endpoint.json", "model-000002.safetensors", STATE_FILE]
    assert [(x["round"], x["site"]) for x in lines(tmp_path / "out")] == [(1, "s0"), (1, "s1")]

    agg = start(study)
    st = agg.status()
    assert (st["state"], st["completed_rounds"], st["round"]) == ("waiting", 2, 2)
    assert st["joined"] == []
    assert st["sites"]["s0"]["rounds_participated"] == 2
    sites = [agg.site("s0"), agg.site("s1")]
    assert sites[0].task().kind == T.REJOIN
    for s in sites:
        r = s.join()
        assert (r.accepted, r.completed_rounds) == (True, 2)
    task = sites[0].task()
    assert (task.kind, task.round, task.model_version) == (T.TRAIN, 3, 2)
    assert digest(sites[0].download(2)) == digest(g2)
    # update ids from before the restart are still known
    replay = sites[1].submit(model(1.0), 3, update_id="s1-2")
    assert (replay.accepted, replay.reason) == (False, "replay")
    play_round(agg, sites, 3)

    for s in sites:
        assert s.task().kind == T.FINISH
        assert s.report(3, {"loss": 0.1, "auc": 0.9}, final=True, local_only={"auc": 0.8}).accepted
    assert [s.task().kind for s in sites] == [T.DONE, T.DONE]
    got = lines(tmp_path / "out")
    counts = Counter((x["round"], x["site"]) for x in got)
    assert counts == Counter({(r, s): 1 for r in (1, 2, 3) for s in ("s0", "s1")})
    assert got[2] == {
        "round": 2,
        "site": "s0",
        "train_samples": 10,
        "train_loss": 0.5,
        "test_samples": 40,
        "loss": 1 / 3,
        "auc": 0.5,
    }
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["refused_updates"] == {"replay": 1}
    assert summary["sites"]["s0"]["rounds_participated"] == 3


def test_a_done_study_stays_done(start: StartFn, tmp_path: Path) -> None:
    study = make_study(sites=2, rounds=1)
    agg = start(study)
    sites = initialise(agg, "s0", "s1")
    play_round(agg, sites, 1)
    for s in sites:
        assert s.report(1, {"auc": 0.9}, final=True).accepted
    assert agg.coord.status()["state"] == "done"
    agg.close()
    (tmp_path / "out" / "summary.json").unlink()

    agg = start(study, linger=0.2)
    st = agg.status()
    assert (st["state"], st["completed_rounds"], st["completed"]) == ("done", 1, True)
    assert agg.site("s0").task().kind == T.DONE  # no need to join again
    assert (tmp_path / "out" / "summary.json").exists()  # rewritten from the checkpoint
    agg.wait_for(lambda _: agg.coord.exit_due(0.2), timeout=2)


def test_checkpoint_of_the_initial_model(start: StartFn, tmp_path: Path) -> None:
    study = make_study(sites=2)
    agg = start(study)
    initialise(agg, "s0", "s1", init=model(5.0))
    agg.close()
    agg = start(study)
    a = agg.site("s0")
    a.join()
    agg.site("s1").join()
    np.testing.assert_array_equal(a.download(0)["w"], model(5.0)["w"])
    assert a.task().round == 1


def test_state_dir_of_another_study_is_refused(start: StartFn, tmp_path: Path) -> None:

    agg = start(make_study(sites=2))
    initialise(agg, "s0", "s1")
    agg.close()
    doc_study = make_study(sites=2, strategy={"name": "fedyogi"})
    with pytest.raises(CheckpointError, match="strategy 'fedavg'"):
        start(doc_study)
