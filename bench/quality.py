"""Model quality on the four heart-disease hospitals, next to FLamby's published numbers.

Runs ``examples/heart-disease.yaml`` through ``fedstudy run`` (the real aggregator and
trainers as processes) once per strategy and seed, and reports the mean over hospitals of
the final model's test accuracy, averaged over seeds.

Two baselines are trained in this process with the trainer's own code (same preprocessing,
model, optimizer and batch size):

- local only, per hospital: trained on that hospital's training rows alone for the budget of
  one federated site (``rounds x localSteps`` steps), then evaluated on every hospital's test
  split (the mean over hospitals is FLamby's "Client k" number; its own split's accuracy is
  what ``fedstudy run`` reports as the local-only baseline);
- pooled: one model on the training rows of all four hospitals together (each hospital's
  rows preprocessed by its own pipeline), for the steps of the whole federation
  (``rounds x localSteps x sites``), evaluated on each hospital's test split.

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
PUBLISHED_POOLED = 0.735
PUBLISHED_LOCAL_BEST = 0.722
PUBLISHED_LOCAL_WORST = 0.567

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedadam": {"name": "fedadam", "serverLearningRate": 0.03},
    "fedyogi": {"name": "fedyogi", "serverLearningRate": 0.03},
}


def run_once(
    strategy: dict[str, Any], seed: int, workdir: Path, rounds: int | None = None
) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["strategy"] = strategy
    doc["spec"]["seed"] = seed
    if rounds is not None:
        doc["spec"]["rounds"] = rounds
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


def baselines(seed: int, rounds: int | None = None) -> dict[str, Any]:
    """Local-only models (one per hospital, tested on every hospital) and the pooled model."""
    import numpy as np
    from fedstudy_trainer.models import build_model
    from fedstudy_trainer.reference import load_all_sites
    from fedstudy_trainer.train import BASELINE_STREAM, derive_seed, evaluate, train_local

    from fedstudy.spec import load_study

    study = load_study(EXAMPLE)
    spec = study.spec.model_copy(update={"seed": seed})
    n_rounds = spec.rounds if rounds is None else rounds
    data = load_all_sites(study, EXAMPLE.parent)
    shape = next(iter(data.values())).input_shape

    def tested(model: Any) -> dict[str, float]:
        return {s: evaluate(model, d.X_test, d.y_test)["accuracy"] for s, d in data.items()}

    local: dict[str, Any] = {}
    for site, d in data.items():
        model = build_model(spec.model, shape, seed)
        train_local(
            model,
            d.X_train,
            d.y_train,
            spec.training,
            seed=derive_seed(seed, site, BASELINE_STREAM),
            steps=n_rounds * spec.training.localSteps,
        )
        acc = tested(model)
        local[site] = {"own": acc[site], "mean_over_hospitals": statistics.fmean(acc.values())}
    pooled = build_model(spec.model, shape, seed)
    train_local(
        pooled,
        np.concatenate([d.X_train for d in data.values()]),
        np.concatenate([d.y_train for d in data.values()]),
        spec.training,
        seed=derive_seed(seed, "pooled", BASELINE_STREAM),
        steps=n_rounds * spec.training.localSteps * len(data),
    )
    acc = tested(pooled)
    return {
        "seed": seed,
        "local": local,
        "pooled": {"per_site": acc, "mean_accuracy": statistics.fmean(acc.values())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--rounds", type=int, help="override the example's 15 rounds (smoke runs)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchlib import finish_machine, machine, write_result

    info = machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies:
            runs = [
                run_once(STRATEGIES[name], seed, Path(tmp), args.rounds)
                for seed in range(args.seeds)
            ]
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
    base = [baselines(seed, args.rounds) for seed in range(args.seeds)]
    sites = list(base[0]["local"])
    local = {
        s: {
            "own": statistics.fmean(b["local"][s]["own"] for b in base),
            "mean_over_hospitals": statistics.fmean(
                b["local"][s]["mean_over_hospitals"] for b in base
            ),
        }
        for s in sites
    }
    pooled = [b["pooled"]["mean_accuracy"] for b in base]
    print(f"{'method':22} {'mean acc':>9} {'stdev':>7} {'published':>9}")
    for name, r in results.items():
        print(f"{name:22} {r['mean_accuracy']:9.3f} {r['stdev']:7.3f} {r['published']:9.3f}")
    print(
        f"{'pooled':22} {statistics.fmean(pooled):9.3f} "
        f"{statistics.stdev(pooled) if len(pooled) > 1 else 0.0:7.3f} {PUBLISHED_POOLED:9.3f}"
    )
    best = max(local, key=lambda s: local[s]["mean_over_hospitals"])
    worst = min(local, key=lambda s: local[s]["mean_over_hospitals"])
    for s, r in local.items():
        note = PUBLISHED_LOCAL_BEST if s == best else PUBLISHED_LOCAL_WORST if s == worst else None
        print(
            f"{'local only: ' + s:22} {r['mean_over_hospitals']:9.3f} {'':7} "
            f"{'' if note is None else f'{note:.3f}':>9}  (own test split {r['own']:.3f})"
        )
    results["pooled"] = {
        "mean_accuracy": statistics.fmean(pooled),
        "stdev": statistics.stdev(pooled) if len(pooled) > 1 else 0.0,
        "published": PUBLISHED_POOLED,
    }
    results["local_only"] = {
        "per_site": local,
        "published_best": PUBLISHED_LOCAL_BEST,
        "published_worst": PUBLISHED_LOCAL_WORST,
    }
    results["baseline_runs"] = base
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["machine"] = finish_machine(info)
    write_result(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
