"""EHR models end to end: the sepsis early-warning study (GRU, LSTM, TCN; GRU under DP-SGD)
on the synthetic ICU cohort, and XGBoost's federated mode on the heart-disease hospitals,
each through ``fedstudy run`` (processes on loopback, mutual TLS).

For every study: the federated model's AUROC, AUPRC and accuracy on each site's test split,
their mean over sites, the same for each site's local-only model (the same model and budget
on the site's data alone; none under DP), and the wall time of ``fedstudy run``.

    .venv/bin/python bench/ehr_models.py --json bench/results/ehr_models.json

``--quick`` runs only the CI-sized sepsis studies (4 rounds of 20 steps) that
tests/test_ehr_study.py runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_result

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEART_DATA = ROOT.parent / "shared" / "data" / "heart-disease"
METRICS = ("auc", "auprc", "accuracy")


def sepsis(model: dict[str, Any] | None = None, *, dp: bool = False, quick: bool = False) -> Any:
    name = "sepsis-early-warning-dp.yaml" if dp else "sepsis-early-warning.yaml"
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    if model is not None:
        doc["spec"]["model"] = model
    if quick:
        doc["spec"]["rounds"] = 4
        doc["spec"]["training"]["localSteps"] = 20
    return doc


def heart_xgboost() -> Any:
    doc = yaml.safe_load((EXAMPLES / "heart-disease-xgboost.yaml").read_text())
    for site in doc["spec"]["sites"]:
        site["data"]["path"] = str(HEART_DATA / Path(site["data"]["path"]).name)
    return doc


def run(label: str, doc: Any, work: Path) -> dict[str, Any]:
    folder = work / label
    folder.mkdir(parents=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    started = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "fedstudy", "run", str(path), "--out", str(folder / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"{label}: fedstudy run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    summary = json.loads((folder / "out" / "summary.json").read_text())
    sites = summary["sites"]

    def mean(kind: str, metric: str) -> float | None:
        values = [s[kind][metric] for s in sites.values() if metric in s.get(kind, {})]
        return sum(values) / len(values) if values and len(values) == len(sites) else None

    return {
        "study": label,
        "rounds": summary["rounds_completed"],
        "seconds": round(seconds, 1),
        "federated": {m: mean("federated", m) for m in METRICS},
        "local_only": {m: mean("local_only", m) for m in METRICS},
        "weighted": {m: summary["global"]["weighted"].get(m) for m in METRICS},
        "sites": {
            name: {
                "federated": {m: s["federated"].get(m) for m in METRICS},
                "local_only": {m: s["local_only"].get(m) for m in METRICS},
                **({"epsilon": s["epsilon"]} if "epsilon" in s else {}),
            }
            for name, s in sites.items()
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="only the CI-sized sepsis studies")
    args = p.parse_args()
    studies: list[tuple[str, Any]] = [
        ("sepsis-gru-quick", sepsis(quick=True)),
        ("sepsis-gru-dp-quick", sepsis(dp=True, quick=True)),
    ]
    if not args.quick:
        studies += [
            ("sepsis-gru", sepsis()),
            ("sepsis-lstm", sepsis({"name": "lstm", "hiddenSize": 16})),
            ("sepsis-tcn", sepsis({"name": "tcn", "hiddenSize": 16, "layers": 3})),
            ("sepsis-gru-dp", sepsis(dp=True)),
        ]
        if HEART_DATA.is_dir():
            studies.append(("heart-xgboost", heart_xgboost()))
    results = []
    with tempfile.TemporaryDirectory(prefix="fedstudy-ehr-") as tmp:
        for label, doc in studies:
            result = run(label, doc, Path(tmp))
            results.append(result)
            f, loc = result["federated"], result["local_only"]
            print(
                f"{label}: federated AUROC {f['auc']:.3f} AUPRC {f['auprc']:.3f} accuracy "
                f"{f['accuracy']:.3f}; local-only "
                + (
                    f"AUROC {loc['auc']:.3f} AUPRC {loc['auprc']:.3f} accuracy "
                    f"{loc['accuracy']:.3f}"
                    if loc["auc"] is not None
                    else "-"
                )
                + f"; {result['seconds']} s",
                flush=True,
            )
    write_result(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
