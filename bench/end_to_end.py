"""End to end: the heart-disease study through ``fedstudy run``, through Flower 1.42's
``run_simulation`` and as plain in-process PyTorch FedAvg, one after another, N times.

All three run the same study: ``examples/heart-disease.yaml`` (four hospitals, FLamby's
preprocessing, logistic regression, batch 4, 100 local steps at lr 1e-3, FedAvg) with
``--rounds`` rounds (default 10) and no local-only baseline (neither Flower nor the floor
trains one). Each is timed as a whole process, from its start to its exit:

- ``fedstudy``: ``fedstudy run`` (the aggregator as a process, four trainers forked from a
  process that imported the trainer once, mutual TLS);
- ``flower``: bench/flower_heart.py in .venv-flower (skipped when missing, see
  bench/setup-flower.sh); also the seconds inside ``run_simulation``;
- ``floor``: ``fedstudy_trainer.reference.fedavg`` in one process; also the seconds of the
  FedAvg loop alone;
- ``startup``: the processes ``fedstudy run --isolated-processes`` starts (an aggregator, one
  trainer per site) started together, importing their entry points and exiting: the start-up
  cost the floor does not pay, and that ``fedstudy run`` pays once for all trainers.

    .venv/bin/python bench/end_to_end.py --repeats 5 --json bench/results/end_to_end.json

Targets: fedstudy at least 5x faster than Flower, and within 1.5x of (floor + startup).
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

from benchlib import (
    FLOWER_PYTHON,
    ROOT,
    finish_machine,
    header_line,
    machine,
    median,
    table,
    write_result,
)

EXAMPLE = ROOT / "examples" / "heart-disease.yaml"

FLOOR = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)  # as each trainer
from fedstudy_trainer.reference import fedavg, load_all_sites
from fedstudy.spec import load_study
from pathlib import Path
study = load_study(sys.argv[1])
data = load_all_sites(study, Path(sys.argv[1]).parent)
t1 = time.perf_counter()
r = fedavg(study.spec, data)
t2 = time.perf_counter()
print(json.dumps({"fedavg_s": t2 - t1, "imports_and_data_s": t1 - t0, "mean_accuracy": r.mean()}))
"""


def write_study(work: Path, rounds: int, seed: int) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["rounds"] = rounds
    spec["seed"] = seed
    spec["localBaseline"] = False
    for site in spec["sites"]:
        site["data"]["path"] = str((EXAMPLE.parent / site["data"]["path"]).resolve())
    path = work / "heart-disease.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def timed(cmd: list[str], **kw: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return seconds, r


def last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def run_fedstudy(study: Path, work: Path) -> dict[str, Any]:
    out = work / "fedstudy-out"
    launched = time.time()
    seconds, _ = timed(
        [sys.executable, "-m", "fedstudy", "run", str(study), "--out", str(out), "--progress",
         "plain"]
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    events = [
        json.loads(line)
        for line in (out / "logs" / "aggregator.log").read_text().splitlines()
        if line.startswith("{")
    ]
    opens = [e["ts"] for e in events if e["event"] == "round-open"]
    closes = [e["ts"] for e in events if e["event"] == "round-complete"]
    first = {e["event"]: e["ts"] for e in reversed(events)}
    return {
        "process_s": seconds,
        "rounds_s": closes[-1] - opens[0] if opens and closes else None,
        # Where the rest goes: launch to the aggregator listening, to the first round (the
        # trainers start, import, read their data and join), and after the last round (final
        # reports, processes exiting, the engine's report.md).
        "to_aggregator_listening_s": first["listening"] - launched,
        "to_first_round_s": opens[0] - launched if opens else None,
        "after_last_round_s": launched + seconds - closes[-1] if closes else None,
        # The study itself ends when the aggregator exits; then fedstudy run exports the
        # model to ONNX (a process of its own) and writes report.md.
        "to_aggregator_exit_s": first["exit"] - launched if "exit" in first else None,
        "after_aggregator_exit_s": launched + seconds - first["exit"] if "exit" in first else None,
        "mean_accuracy": summary["global"]["site_mean"]["accuracy"],
    }


def run_flower(study: Path, rounds: int, cpus: float) -> dict[str, Any]:
    seconds, r = timed(
        [str(FLOWER_PYTHON), str(ROOT / "bench" / "flower_heart.py"), "--study", str(study),
         "--rounds", str(rounds), "--cpus-per-client", str(cpus)]
    )  # fmt: skip
    result = last_json(r.stdout)
    return {
        "process_s": seconds,
        "inside_run_simulation_s": result["inside_run_simulation_s"],
        "mean_accuracy": result["mean_accuracy"],
    }


def run_floor(study: Path) -> dict[str, Any]:
    seconds, r = timed([sys.executable, "-c", FLOOR, str(study)])
    result = last_json(r.stdout)
    return {"process_s": seconds, **result}


def run_startup(sites: int) -> dict[str, Any]:
    """The aggregator and ``sites`` trainers started at once, each importing its entry point."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-c", f"import {m}"])
        for m in ["fedstudy_aggregator.main"] + ["fedstudy_trainer.main"] * sites
    ]
    for p in procs:
        p.wait()
    return {"process_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flower-cpus-per-client", type=float, default=1.0)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    flower = not args.no_flower and FLOWER_PYTHON.exists()
    if not flower and not args.no_flower:
        print(f"Flower skipped: {FLOWER_PYTHON} is missing (bench/setup-flower.sh makes it)")
    info = machine()
    print(header_line(info))
    runs: dict[str, list[dict[str, Any]]] = {"fedstudy": [], "flower": [], "floor": [],
                                             "startup": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedstudy-e2e-") as tmp:
        work = Path(tmp)
        study = write_study(work, args.rounds, args.seed)
        for i in range(args.repeats):
            runs["fedstudy"].append(run_fedstudy(study, work))
            if flower:
                runs["flower"].append(run_flower(study, args.rounds, args.flower_cpus_per_client))
            runs["floor"].append(run_floor(study))
            runs["startup"].append(run_startup(4))
            line = ", ".join(f"{k} {v[-1]['process_s']:.2f} s" for k, v in runs.items() if v)
            print(f"repeat {i + 1}/{args.repeats}: {line}", flush=True)

    def med(name: str, key: str = "process_s") -> float:
        return median([r[key] for r in runs[name] if r.get(key) is not None])

    fed, floor, startup = med("fedstudy"), med("floor"), med("startup")
    summary: dict[str, Any] = {
        "fedstudy_s": fed,
        "fedstudy_rounds_s": med("fedstudy", "rounds_s"),
        "fedstudy_to_aggregator_listening_s": med("fedstudy", "to_aggregator_listening_s"),
        "fedstudy_to_first_round_s": med("fedstudy", "to_first_round_s"),
        "fedstudy_after_last_round_s": med("fedstudy", "after_last_round_s"),
        "fedstudy_to_aggregator_exit_s": med("fedstudy", "to_aggregator_exit_s"),
        "fedstudy_after_aggregator_exit_s": med("fedstudy", "after_aggregator_exit_s"),
        "floor_s": floor,
        "floor_fedavg_s": med("floor", "fedavg_s"),
        "startup_s": startup,
        "fedstudy_over_floor_plus_startup": fed / (floor + startup),
        "fedstudy_accuracy": runs["fedstudy"][0]["mean_accuracy"],
        "floor_accuracy": runs["floor"][0]["mean_accuracy"],
    }
    rows = [
        ["fedstudy run (aggregator + 4 forked trainers, mTLS)", fed, summary["fedstudy_rounds_s"],
         summary["fedstudy_accuracy"]],
        ["plain PyTorch floor (1 process)", floor, summary["floor_fedavg_s"],
         summary["floor_accuracy"]],
        ["start-up of 5 processes (imports)", startup, "-", "-"],
    ]  # fmt: skip
    if runs["flower"]:
        summary["flower_s"] = med("flower")
        summary["flower_inside_s"] = med("flower", "inside_run_simulation_s")
        summary["flower_over_fedstudy"] = summary["flower_s"] / fed
        summary["flower_accuracy"] = runs["flower"][0]["mean_accuracy"]
        rows.insert(1, ["Flower 1.42 run_simulation", summary["flower_s"],
                        summary["flower_inside_s"], summary["flower_accuracy"]])  # fmt: skip
    print(table(["system", "median process s", "inner s", "mean accuracy"], rows))
    print(
        f"fedstudy run: {summary['fedstudy_to_aggregator_listening_s']:.2f} s to the aggregator "
        f"listening, {summary['fedstudy_to_first_round_s']:.2f} s to round 1, "
        f"{summary['fedstudy_rounds_s']:.2f} s of rounds, "
        f"{summary['fedstudy_after_last_round_s']:.2f} s after the last round; the aggregator "
        f"exits at {summary['fedstudy_to_aggregator_exit_s']:.2f} s, then "
        f"{summary['fedstudy_after_aggregator_exit_s']:.2f} s of ONNX export and report"
    )
    print(
        f"fedstudy / (floor + start-up) = {summary['fedstudy_over_floor_plus_startup']:.2f}"
        + (f"; Flower / fedstudy = {summary['flower_over_fedstudy']:.2f}" if flower else "")
    )
    result = {
        "benchmark": "end_to_end",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": finish_machine(info),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "summary": summary,
        "runs": runs,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
