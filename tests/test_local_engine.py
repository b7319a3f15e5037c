"""Whole studies through ``fedstudy run`` and the real entry points, as processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.numpy import load_file
from studyprocs import fedstudy, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEART_DATA = ROOT.parent / "shared" / "data" / "heart-disease"

pytestmark = pytest.mark.slow


def small_study(tmp_path: Path, **spec_changes: Any) -> Path:
    """The breast-cancer example, made quick: fewer rounds and steps."""
    doc = yaml.safe_load((EXAMPLES / "breast-cancer.yaml").read_text())
    doc["spec"].update({"rounds": 4, "roundTimeoutSeconds": 60})
    doc["spec"]["training"]["localSteps"] = 5
    doc["spec"].update(spec_changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def check_outputs(out: Path, rounds: int, sites: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["rounds_completed"] == rounds
    assert set(summary["sites"]) == set(sites)
    lines = read_jsonl(out / "metrics.jsonl")
    counts = Counter((line["round"], line["site"]) for line in lines)
    assert counts == Counter({(r, s): 1 for r in range(1, rounds + 1) for s in sites})
    model = load_file(str(out / "model.safetensors"))
    assert model, "the final model is empty"
    return summary


def test_breast_cancer_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = fedstudy(
        "run", str(EXAMPLES / "breast-cancer.yaml"), "--out", str(out), "--progress", "plain"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 10, ["north", "south", "east", "west"])
    assert summary["global"]["weighted"]["auc"] >= 0.98
    for site in summary["sites"].values():
        assert site["train_samples"] > 0
        assert site["test_samples"] > 0
        assert "auc" in site["federated"]
        assert "auc" in site["local_only"]
    assert "local only vs federated" in r.stdout
    assert "round 10/10 complete" in r.stdout


@pytest.mark.skipif(
    not HEART_DATA.is_dir(),
    reason=f"the heart-disease data is not at "
    f"{HEART_DATA} (it ships in the shared folder beside the checkout)",
)
def test_heart_disease_four_real_hospitals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = fedstudy(
        "run", str(EXAMPLES / "heart-disease.yaml"), "--out", str(out), "--progress", "plain"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 15, ["cleveland", "hungarian", "switzerland", "va"])
    sizes = {n: (s["train_samples"], s["test_samples"]) for n, s in summary["sites"].items()}
    assert sizes == {
        "cleveland": (199, 104),
        "hungarian": (172, 89),
        "switzerland": (30, 16),
        "va": (85, 45),
    }
    # FLamby's published FedAvg figure is 0.685 (mean over hospitals and 5 seeds).
    assert abs(summary["global"]["site_mean"]["accuracy"] - 0.685) <= 0.03


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedprox", "mu": 0.01},
        {"name": "fedadam", "serverLearningRate": 0.05},
        {"name": "fedyogi", "serverLearningRate": 0.05},
    ],
)
def test_each_strategy_runs_a_study(tmp_path: Path, strategy: dict[str, Any]) -> None:
    study = small_study(tmp_path, strategy=strategy)
    out = tmp_path / "out"
    r = fedstudy("run", str(study), "--out", str(out), "--progress", "plain")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 4, ["north", "south", "east", "west"])
    assert summary["strategy"] == strategy["name"]
    assert summary["global"]["weighted"]["auc"] > 0.9


def test_bad_study_fails_before_starting_anything(tmp_path: Path) -> None:
    path = small_study(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["sites"][2]["data"] = {"format": "csv", "path": str(tmp_path / "missing.csv")}
    path.write_text(yaml.safe_dump(doc))
    r = fedstudy("run", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert f"spec.sites[2].data.path: no such file: {tmp_path}/missing.csv" in r.stderr
    assert not (tmp_path / "out").exists()


def test_expired_irb_stops_the_run(tmp_path: Path) -> None:
    study = small_study(
        tmp_path, governance={"irb": {"protocol": "IRB-2020-7", "approvedUntil": "2021-01-01"}}
    )
    r = fedstudy("run", str(study), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "IRB approval of protocol IRB-2020-7 expired on 2021-01-01" in r.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def _wait_gone(text: str, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _processes_mentioning(text)
        if not left:
            return []
        time.sleep(0.1)
    return _processes_mentioning(text)


def test_a_failing_trainer_stops_everything(tmp_path: Path) -> None:
    table = tmp_path / "site.csv"
    table.write_text("a,b\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    doc = yaml.safe_load((EXAMPLES / "breast-cancer.yaml").read_text())
    # One site's table lacks the label column: its trainer fails with a clear error.
    doc["spec"]["sites"][1]["data"] = {"format": "csv", "path": str(table)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = fedstudy("run", str(path), "--out", str(out), "--progress", "plain")
    assert r.returncode == 1
    assert "trainer-south exited with code" in r.stderr
    assert "malignant" in r.stderr  # the missing label column is named
    assert _wait_gone(str(out)) == []


def test_ctrl_c_leaves_no_process_behind(tmp_path: Path) -> None:
    study = small_study(tmp_path, rounds=500)
    out = tmp_path / "out"
    proc = subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_processes_mentioning(str(out))) < 6:
        time.sleep(0.2)
    assert len(_processes_mentioning(str(out))) >= 6, "the study's processes did not start"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert _wait_gone(str(out)) == []
