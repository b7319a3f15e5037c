"""Model quality on the four heart-disease hospitals, next to FLamby's published numbers.

Runs ``examples/heart-disease.yaml`` through ``fedstudy run`` (the real aggregator and
trainers as processes) once per strategy and seed, and reports the mean over hospitals of
the final model's test accuracy, averaged over seeds.

    .venv/bin/python bench/quality.py --seeds 5 --json bench/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "heart-disease.yaml"

PUBLISHED = {"fedavg": 0.685, "fedprox": 0.685, "fedadam": 0.726, "fedyogi": 0.731}

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedadam": {"name": "fedadam", "serverLearningRate": 0.03},
    "fedyogi": {"name": "fedyogi", "serverLearningRate": 0.03},
}


def run_once(strategy: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["strategy"] = strategy
    doc["spec"]["seed"] = seed
    # Paths in the example are relative to examples/: make them absolute.
    for site in doc["spec"]["sites"]:
        site["data"]["path"] = str((EXAMPLE.parent / site["data"]["path"]).resolve())
    study = workdir / f"{strategy['name']}-{seed}.yaml"
    study.write_text(yaml.safe_dump(doc))
    out = workdir / f"out-{strategy['name']}-{seed}"
    t0 = time.perf_counter()
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
        check=False,
    )
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{study.name} failed:\n{r.stdout}\n{r.stderr}")
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    sites = summary["sites"]
    return {
        "seed": seed,
        "seconds": round(seconds, 2),
        "mean_accuracy": summary["global"]["site_mean"]["accuracy"],
        "local_only_mean_accuracy": statistics.fmean(
            s["local_only"]["accuracy"] for s in sites.values()
        ),
        "per_site": {n: s["federated"]["accuracy"] for n, s in sites.items()},
        "local_only": {n: s["local_only"]["accuracy"] for n, s in sites.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            runs = [run_once(STRATEGIES[name], seed, Path(tmp)) for seed in range(args.seeds)]
            accs = [r["mean_accuracy"] for r in runs]
            results[name] = {
                "strategy": STRATEGIES[name],
                "mean_accuracy": statistics.fmean(accs),
                "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "published": PUBLISHED[name],
                "local_only_mean_accuracy": statistics.fmean(
                    r["local_only_mean_accuracy"] for r in runs
                ),
                "runs": runs,
            }
    print(f"{'strategy':10} {'mean acc':>9} {'stdev':>7} {'published':>9} {'local-only':>10}")
    for name, r in results.items():
        print(
            f"{name:10} {r['mean_accuracy']:9.3f} {r['stdev']:7.3f} {r['published']:9.3f} "
            f"{r['local_only_mean_accuracy']:10.3f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
