"""Fault injection with real processes: the aggregator and trainers are killed with SIGKILL
mid-study and restarted; the study still ends with every round done exactly once."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.numpy import load_file
from studyprocs import StudyProcesses, read_jsonl

from fedstudy.audit import AUDIT_FILE, verify

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def quick_study(tmp_path: Path, localSteps: int = 3, **spec: Any) -> Path:  # noqa: N803
    """The breast-cancer example with ``localSteps`` of local training."""
    doc = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    doc["spec"]["training"]["localSteps"] = localSteps
    doc["spec"].update(spec)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    made: list[StudyProcesses] = []

    def make(**spec: Any) -> StudyProcesses:
        p = StudyProcesses(quick_study(tmp_path, **spec), tmp_path / "run")
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_aggregator_killed_five_times_at_random_points_loses_and_repeats_no_round(
    procs: Any,
) -> None:
    # A round takes 0.15-0.25 s here and a life ends at most 0.4 s after its first round,
    # so five lives close at most about 25 rounds: 40 keep the study going past the fifth kill.
    rounds = 40
    run: StudyProcesses = procs(rounds=rounds, roundTimeoutSeconds=120, localSteps=400)
    rng = random.Random(20261128)
    run.start_all()
    deadline = time.monotonic() + 600
    resumed_at = 0
    for _ in range(5):
        # Each life of the aggregator completes a round at least, then dies at a random
        # moment: mid-training, mid-stream, mid-checkpoint or between rounds.
        done = run.wait_for_rounds(resumed_at + 1, deadline)["completed_rounds"]
        time.sleep(rng.uniform(0.0, 0.4))
        run.kill(run.aggregator)
        time.sleep(rng.uniform(0.0, 1.0))
        run.start_aggregator()
        resumed_at = run.wait_for_rounds(0, deadline)["completed_rounds"]
    assert done < rounds, "the study ended before the fifth kill: make the rounds longer"
    assert run.aggregator is not None
    assert run.aggregator.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    for site, p in run.trainers.items():
        assert p.wait(timeout=60) == 0, site

    # Six lives of the aggregator. Each resumed from the last round its predecessor closed
    # (the kill may fall after a round's checkpoint and before its log line, so a round can
    # close unlogged, never unsaved), then opened the next round: no closed round is opened
    # again, and none is skipped.
    lives = run.lives("aggregator")
    assert len(lives) == 6
    last_closed = last_opened = 0
    for n, life in enumerate(lives):
        if n > 0:
            resumed = [e for e in life if e["event"] == "resumed"]
            assert len(resumed) == 1, f"life {n} did not resume from its checkpoint"
            start = resumed[0]["completed_rounds"]
            assert start >= last_closed, f"life {n} lost round {last_closed}"
            assert start <= last_opened, f"life {n} resumed past round {last_opened}"
            last_closed = start
        opened = [e["round"] for e in life if e["event"] == "round-open"]
        closed = [e["round"] for e in life if e["event"] == "round-complete"]
        assert opened == list(range(last_closed + 1, last_closed + 1 + len(opened))), n
        assert closed == opened[: len(closed)], n
        assert len(opened) - len(closed) <= 1, n
        last_closed = max(closed, default=last_closed)
        last_opened = max(opened, default=last_opened)
    assert last_closed == rounds

    summary = yaml.safe_load((run.out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["rounds_completed"] == rounds
    lines = read_jsonl(run.out / "metrics.jsonl")
    counts = Counter((line["round"], line["site"]) for line in lines)
    assert counts == Counter({(r, s): 1 for r in range(1, rounds + 1) for s in run.sites})
    assert load_file(str(run.out / "model.safetensors"))

    # The audit trail went through the six lives as one chain: it verifies up to the study's
    # end, each restart says which checkpoint it resumed from (one the trail had logged), and
    # the newest entry of each round is the model the study went on with.
    verdict = verify(run.out / AUDIT_FILE, head=summary["audit"]["study_end_hash"])
    assert verdict.ok, verdict.problem
    trail = read_jsonl(run.out / AUDIT_FILE)
    resumed = [e for e in trail if e["event"] == "resumed"]
    assert [e["model_version"] for e in resumed] == [
        next(e for e in life if e["event"] == "resumed")["completed_rounds"] for life in lives[1:]
    ]
    assert all(e["checkpoint_in_trail"] for e in resumed)
    newest = {e["round"]: e for e in trail if e["event"] == "round"}
    assert sorted(newest) == list(range(1, rounds + 1))
    assert newest[rounds]["model_digest"] == summary["model"]["sha256"]


def test_a_killed_trainer_is_left_behind_after_the_timeout_and_rejoins(procs: Any) -> None:
    rounds = 10
    run: StudyProcesses = procs(rounds=rounds, minSites=2, roundTimeoutSeconds=4)
    victim = run.sites[-1]
    others = [s for s in run.sites if s != victim]
    # The victim starts first, so it trains from round 1 on; the others join as they start.
    deadline = time.monotonic() + 400
    run.start_aggregator()
    run.start_trainer(victim)
    while not (st := run.status()) or not st["sites"][victim]["joined"]:
        assert time.monotonic() < deadline, "the site did not join"
        time.sleep(0.05)
    for site in others:
        run.start_trainer(site)
    run.wait_for_rounds(1, deadline)
    run.kill(run.trainers[victim])
    killed_after = run.wait_for_rounds(0, deadline)["completed_rounds"]
    # With the site gone, rounds close on the timeout with the sites that answered.
    back = run.wait_for_rounds(killed_after + 3, deadline)["completed_rounds"]
    run.start_trainer(victim)
    assert run.aggregator is not None
    assert run.aggregator.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    for site, p in run.trainers.items():
        assert p.wait(timeout=60) == 0, site

    closed = {e["round"]: sorted(e["sites"]) for e in run.events("aggregator", "round-complete")}
    assert sorted(closed) == list(range(1, rounds + 1))
    # The rounds after the kill (the one it interrupted may have had the site's update
    # already) waited out the timeout for it alone, then closed with the sites that answered.
    timeouts = {e["round"]: e["stragglers"] for e in run.events("aggregator", "round-timeout")}
    for r in range(killed_after + 2, back + 1):
        assert timeouts.get(r) == [victim], r
        assert victim not in closed[r], r
        assert len(closed[r]) >= 2, r
    # Restarted with its state dir, the site rejoined and trained again until the end.
    returned = [r for r, sites in closed.items() if victim in sites and r > back]
    assert returned, f"{victim} took part in no round after it was restarted"
    summary = yaml.safe_load((run.out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["rounds_completed"] == rounds
    with_victim = sum(victim in sites for sites in closed.values())
    assert summary["sites"][victim]["rounds_participated"] == with_victim
