"""Imaging studies end to end through ``fedstudy run``: the digits example with and without
DP-SGD, and a DICOM study built from the CT and MR images that pydicom ships."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from studyprocs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits-cnn.yaml"
SITES = ["north", "centre", "south"]
PLAIN = ("--progress", "plain")

pytestmark = pytest.mark.slow


def run_study(doc: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], Path]:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "fedstudy", "run", str(study), "--out", str(out), *PLAIN],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    return summary, out


def quick_example(**spec: Any) -> dict[str, Any]:
    """The digits example with half its rounds."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["rounds"] = 4
    doc["spec"].update(spec)
    return doc


def _trainer_events(out: Path, site: str) -> list[dict[str, Any]]:
    return read_jsonl(out / "logs" / f"trainer-{site}.log")


def test_digits_example_end_to_end(tmp_path: Path) -> None:
    summary, out = run_study(quick_example(), tmp_path)
    assert summary["rounds_completed"] == 4
    counts = Counter((m["round"], m["site"]) for m in read_jsonl(out / "metrics.jsonl"))
    assert counts == Counter({(r, s): 1 for r in range(1, 5) for s in SITES})
    assert summary["global"]["weighted"]["auc"] > 0.85
    sizes = [s["train_samples"] + s["test_samples"] for s in summary["sites"].values()]
    assert sum(sizes) == 1797  # the three shares cover every digit once
    for name in SITES:
        site = summary["sites"][name]
        assert "auc" in site["local_only"]
        events = _trainer_events(out, name)
        [loaded] = [e for e in events if e["event"] == "data-loaded"]
        assert loaded["source"].startswith("builtin:digits (share")
        assert loaded["input_shape"] == [1, 8, 8]
        [device] = [e for e in events if e["event"] == "device"]
        assert device["device"] in ("cpu", "cuda:0")


def test_digits_example_with_dp_end_to_end(tmp_path: Path) -> None:
    doc = quick_example(privacy={"targetEpsilon": 3.0, "delta": 1.0e-4, "maxGradNorm": 1.0})
    summary, out = run_study(doc, tmp_path)
    assert summary["rounds_completed"] == 4
    for name in SITES:
        site = summary["sites"][name]
        assert 0 < site["federated"]["epsilon"] <= 3.0 * (1 + 1e-9)
        assert not site["local_only"]  # no local-only baseline outside the ledger
        events = _trainer_events(out, name)
        [privacy] = [e for e in events if e["event"] == "privacy"]
        assert privacy["mode"] == "hooks"
    assert summary["global"]["weighted"]["auc"] > 0.6


def test_dicom_study_end_to_end(tmp_path: Path) -> None:
    """Two sites, each a folder of CT (label 1) and MR (label 0) slices from pydicom's files."""
    sys.path.insert(0, str(ROOT / "tests" / "trainer"))
    from imaging_support import write_dicom_folder

    sites = []
    for name in ("east", "west"):
        write_dicom_folder(tmp_path / name, per_class=6)
        sites.append({"name": name, "data": {"format": "dicom", "path": name}})
    doc = {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": "ct-or-mr"},
        "spec": {
            "task": {"type": "binary-classification", "label": "ct", "metric": "auc"},
            "model": {"name": "cnn", "channels": [4]},
            "rounds": 2,
            "minSites": 2,
            "roundTimeoutSeconds": 60,
            "training": {"localSteps": 3, "batchSize": 4, "learningRate": 0.05},
            "preprocessing": {"testFraction": 0.34, "image": {"size": [32, 32]}},
            "sites": sites,
        },
    }
    summary, _ = run_study(doc, tmp_path)
    assert summary["rounds_completed"] == 2
    for name in ("east", "west"):
        assert (
            summary["sites"][name]["train_samples"] + summary["sites"][name]["test_samples"] == 12
        )
