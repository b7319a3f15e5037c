"""EHR studies through ``fedstudy run``, as processes on loopback with mutual TLS: sepsis early
warning with a GRU on the synthetic ICU cohort (with and without DP-SGD), and XGBoost's
federated mode on the four heart-disease hospitals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from studyprocs import fedstudy, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEART_DATA = ROOT.parent / "shared" / "data" / "heart-disease"

pytestmark = pytest.mark.slow

# The sepsis example, made quick for CI: 4 rounds of 20 steps. Measured (BENCHMARKS.md, "EHR
# models"): each site's local-only GRU (the same budget, 80 steps, on its data alone) reaches
# a mean AUROC of 0.883 over the three sites' test patients, the federated GRU 0.892. The
# floor is the local-only level less a margin for other library versions; and federation
# must not do worse than training alone.
SEPSIS_AUC_FLOOR = 0.80
# Under DP-SGD (ε = 8 per site for the whole study) the same budget reaches 0.822.
SEPSIS_DP_AUC_FLOOR = 0.75
# FLamby's published FedAvg accuracy on these hospitals (logistic regression).
HEART_FEDAVG_ACCURACY = 0.685


def run_study(doc: dict[str, Any], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = fedstudy("run", str(path), "--out", str(out), "--progress", "plain", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["rounds_completed"] == doc["spec"]["rounds"]
    return out, summary


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of a process's log (XGBoost and Opacus write plain lines too)."""
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def quick_sepsis(**spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "sepsis-early-warning.yaml").read_text())
    doc["spec"]["rounds"] = 4
    doc["spec"]["training"]["localSteps"] = 20
    doc["spec"].update(spec)
    return doc


def test_sepsis_early_warning_gru_end_to_end(tmp_path: Path) -> None:
    out, summary = run_study(quick_sepsis(), tmp_path)
    sites = summary["sites"]
    assert set(sites) == {"north", "central", "south"}
    for site in sites.values():
        assert {"auc", "auprc", "accuracy", "loss"} <= set(site["federated"])
        assert {"auc", "auprc"} <= set(site["local_only"])
    federated = summary["global"]["site_mean"]["auc"]
    local_only = float(np.mean([s["local_only"]["auc"] for s in sites.values()]))
    assert federated >= SEPSIS_AUC_FLOOR, (federated, local_only)
    assert federated >= local_only - 0.01, (federated, local_only)
    lines = read_jsonl(out / "metrics.jsonl")
    assert len(lines) == 4 * 3
    assert all("auprc" in line for line in lines)
    model = load_file(str(out / "model.safetensors"))
    assert any(name.endswith("rnn.weight_ih_l0") for name in model)


def test_sepsis_early_warning_gru_under_dp(tmp_path: Path) -> None:
    doc = quick_sepsis(privacy={"targetEpsilon": 8.0, "delta": 1.0e-5, "maxGradNorm": 1.0})
    out, summary = run_study(doc, tmp_path)
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= 8.0
        assert site["local_only"] == {}  # no baseline outside the privacy ledger
    assert summary["global"]["site_mean"]["auc"] >= SEPSIS_DP_AUC_FLOOR
    # Opacus's DPGRU sends torch's tensor names, once each.
    names = sorted(load_file(str(out / "model.safetensors")))
    assert not [n for n in names if ".l0." in n]
    assert any(n.endswith("rnn.weight_hh_l0") for n in names)
    modes = [
        e["mode"]
        for site in ("north", "central", "south")
        for e in log_events(out / "logs" / f"trainer-{site}.log")
        if e.get("event") == "privacy"
    ]
    assert modes == ["hooks"] * 3


@pytest.mark.skipif(
    not HEART_DATA.is_dir(),
    reason=f"the heart-disease data is not at {HEART_DATA} (the shared data folder is absent)",
)
def test_heart_disease_xgboost_federated_mode(tmp_path: Path) -> None:
    pytest.importorskip("xgboost", reason="the boosting extra (xgboost) is not installed")
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "heart-disease-xgboost.yaml").read_text())
    for site in doc["spec"]["sites"]:
        site["data"]["path"] = str(HEART_DATA / Path(site["data"]["path"]).name)
    out, summary = run_study(doc, tmp_path)
    sites = summary["sites"]
    federated = summary["global"]["site_mean"]["accuracy"]
    local_only = float(np.mean([s["local_only"]["accuracy"] for s in sites.values()]))
    assert federated >= HEART_FEDAVG_ACCURACY, (federated, local_only)
    # XGBoost trained on each hospital alone, with the same trees and parameters, does worse.
    assert federated >= local_only, (federated, local_only)
    for site in sites.values():
        assert site["rounds_participated"] == 20
        assert {"auc", "auprc"} <= set(site["federated"])
    # Twenty trees, one a round, grown through the tracker over mutual TLS.
    model = load_file(str(out / "model.safetensors"))
    features = next(v for k, v in model.items() if k.endswith("trees.feature"))
    assert features.shape == (20, 15)
    assert (features[:, 0] >= 0).all()
    tracker = [
        e
        for e in log_events(out / "logs" / "aggregator.log")
        if e.get("event") == "boosting-tracker"
    ]
    assert tracker[0]["mutual_tls"] is True
    assert tracker[0]["workers"] == 4
