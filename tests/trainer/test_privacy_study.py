"""Whole DP studies: the real aggregator and the sites' real trainers, in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fedstudy_trainer.client import SiteTrainer
from opacus.accountants import RDPAccountant
from privacy_support import StudyRun, run_study
from trainer_support import REPO, breast_cancer_sites, make_study, study_doc

from fedstudy.spec import FederatedStudy, load_study, parse_study

EXAMPLES = REPO / "examples"
PRIVACY = {"targetEpsilon": 2.0, "delta": 1e-4, "maxGradNorm": 1.0}


def dp_study(rounds: int = 3, min_sites: int = 2, **privacy: Any) -> FederatedStudy:
    return make_study(
        breast_cancer_sites(2),
        rounds=rounds,
        minSites=min_sites,
        model={"name": "mlp", "hidden": [16]},
        training={"localSteps": 10, "batchSize": 16, "optimizer": "sgd", "learningRate": 0.1},
        privacy={**PRIVACY, **privacy},
    )


def independent_epsilon(run: StudyRun, site: str, delta: float) -> float:
    """ε from the site's ledger, by an Opacus accountant stepped once per recorded step."""
    acc = RDPAccountant()
    for r in run.ledger(site)["runs"]:
        for _ in range(r["steps"]):
            acc.step(noise_multiplier=r["noise"], sample_rate=r["sample_rate"])
    return float(acc.get_epsilon(delta))


def test_epsilon_per_site_per_round_everywhere(tmp_path: Path) -> None:
    run = run_study(dp_study(), tmp_path)
    assert run.codes == {"site-0": 0, "site-1": 0}
    eps = {(line["round"], line["site"]): line["epsilon"] for line in run.lines}
    assert set(eps) == {(r, s) for r in (1, 2, 3) for s in ("site-0", "site-1")}
    summary = run.summary
    assert summary["completed"] is True
    for site in ("site-0", "site-1"):
        assert eps[1, site] < eps[2, site] < eps[3, site]
        ledger = run.ledger(site)
        assert ledger["rounds"] == [1, 2, 3]
        assert sum(r["steps"] for r in ledger["runs"]) == 30
        final = summary["sites"][site]["epsilon"]
        assert final == summary["sites"][site]["federated"]["epsilon"] == eps[3, site]
        assert final == pytest.approx(independent_epsilon(run, site, 1e-4), abs=1e-6)
        assert final <= 2.0
        assert final > 1.9  # the calibration spends the budget, it does not waste it
        assert run.status["sites"][site]["metrics"]["epsilon"] == final
        assert summary["sites"][site]["federated"]["delta"] == 1e-4
        assert summary["sites"][site]["local_only"] == {}  # no baseline outside the ledger


class Crash(Exception):
    """Stands for a trainer killed after it charged its ledger, before its update left."""


def test_a_restarted_trainer_continues_its_ledger(tmp_path: Path) -> None:
    """site-0 dies in round 2 after charging its ledger; restarted, it trains round 2 again
    (charged again: ε never goes back), and, its budget planned for three rounds, it leaves
    before round 3. With minSites 1 the study goes on with site-1."""
    study = dp_study(min_sites=1)
    seen: dict[str, float] = {}

    def crash_in_round_2(trainer: SiteTrainer) -> None:
        if trainer.site != "site-0":
            return
        submit = trainer._submit

        def crashing(round_: int, *args: Any) -> None:
            if round_ == 2:
                assert trainer.privacy is not None
                seen["before"] = trainer.privacy.epsilon()
                raise Crash
            submit(round_, *args)

        trainer._submit = crashing  # type: ignore[method-assign]

    run = run_study(study, tmp_path, trainer_hook=crash_in_round_2, restart_on=Crash)
    assert run.codes == {"site-0": 0, "site-1": 0}
    ledger = run.ledger("site-0")
    assert ledger["rounds"] == [1, 2, 2]
    assert ledger["epsilon"] >= seen["before"]
    assert ledger["epsilon"] <= 2.0
    summary = run.summary
    assert summary["completed"] is True
    assert summary["sites"]["site-0"]["left"] == "privacy-budget-exhausted"
    assert summary["sites"]["site-0"]["epsilon"] == pytest.approx(ledger["epsilon"])
    assert summary["sites"]["site-1"]["epsilon"] <= 2.0
    assert summary["sites"]["site-1"]["rounds_participated"] == 3


def test_a_budget_too_small_ends_the_study_with_the_reason(tmp_path: Path) -> None:
    # A fixed noise multiplier of 1.1: ε 1.83 after one round, 2.24 after two (target 2).
    run = run_study(dp_study(rounds=4, noiseMultiplier=1.1), tmp_path)
    assert run.codes == {"site-0": 0, "site-1": 0}
    summary = run.summary
    assert summary["completed"] is False
    assert summary["rounds_completed"] == 1
    assert "privacy-budget-exhausted" in summary["ended_reason"]
    assert "privacy budget exhausted" in summary["ended_reason"]
    # The first site to leave ends the study (the summary is written then).
    assert "privacy-budget-exhausted" in {s.get("left") for s in summary["sites"].values()}
    for site in ("site-0", "site-1"):
        assert run.ledger(site)["rounds"] == [1]
        assert summary["sites"][site]["epsilon"] <= 2.0


def test_heart_disease_at_epsilon_one(heart_study: FederatedStudy, tmp_path: Path) -> None:
    """examples/heart-disease-dp.yaml's settings on the four hospitals (FLamby protocol):
    ε = 1, δ = 1e-3; the published DP reference is 0.69-0.71 mean accuracy."""
    example = load_study(EXAMPLES / "heart-disease-dp.yaml").spec
    assert example.privacy is not None
    doc = heart_study.model_dump(mode="json", exclude_none=True)
    doc["spec"]["privacy"] = example.privacy.model_dump(mode="json", exclude_none=True)
    doc["spec"]["training"] = example.training.model_dump(mode="json")
    assert doc["spec"]["privacy"]["targetEpsilon"] == 1.0
    assert doc["spec"]["privacy"]["delta"] == 1e-3
    run = run_study(parse_study(doc), tmp_path)
    assert set(run.codes.values()) == {0}
    summary = run.summary
    assert summary["completed"] is True
    assert summary["global"]["site_mean"]["accuracy"] >= 0.68
    for site in summary["sites"].values():
        assert 0.9 < site["epsilon"] <= 1.0


@pytest.mark.slow
def test_fedstudy_run_with_dp(tmp_path: Path) -> None:
    """The whole thing through ``fedstudy run``: processes, the real CLI and outputs."""
    doc = study_doc(
        breast_cancer_sites(2),
        rounds=3,
        model={"name": "mlp", "hidden": [16]},
        training={"localSteps": 10, "batchSize": 16, "optimizer": "sgd", "learningRate": 0.1},
        privacy=PRIVACY,
        roundTimeoutSeconds=60,
        minSites=2,  # both sites train every round, however their start-ups interleave
    )
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstudy",
            "run",
            str(study),
            "--out",
            str(out),
            "--progress",
            "plain",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted((x["round"], x["site"]) for x in lines if "epsilon" in x) == [
        (r, s) for r in (1, 2, 3) for s in ("site-0", "site-1")
    ]
    summary = json.loads((out / "summary.json").read_text())
    for site in ("site-0", "site-1"):
        assert 1.9 < summary["sites"][site]["epsilon"] <= PRIVACY["targetEpsilon"]
