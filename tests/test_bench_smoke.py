"""Each benchmark of bench/ runs at its smallest size and writes a sound JSON result.

No timing is asserted: these only prove the scripts work, end to end, against the real
aggregator and trainers. The Flower comparison runs only where .venv-flower exists
(bench/setup-flower.sh makes it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
FLOWER_PYTHON = ROOT / ".venv-flower" / "bin" / "python"

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str, tmp: Path, timeout: float = 120) -> dict[str, Any]:
    out = tmp / f"{Path(script).stem}.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["machine"]["load_before"] is not None
    return result


def test_aggregation_at_its_smallest_size(tmp_path: Path) -> None:
    result = run_bench(
        "aggregation.py", "--params", "100k", "--sites", "2", "--rounds", "2", "--verify",
        tmp=tmp_path,
    )  # fmt: skip
    (case,) = result["cases"]
    assert case["params"] == 100_000
    assert case["sites"] == 2
    assert case["verified"].startswith("final model matches")
    assert len(case["rounds_open_to_close_s"]) == 2
    assert case["peak_rss"] >= case["idle_rss"] > 0
    assert case["numpy_floor_s"] > 0
    assert case["raw_loopback_Bps"] > 0


def test_many_sites_at_its_smallest_size(tmp_path: Path) -> None:
    result = run_bench(
        "many_sites.py", "--sites", "3", "--rounds", "2", "--params", "1000", tmp=tmp_path
    )
    (case,) = result["cases"]
    assert case["sites"] == 3
    assert len(case["rounds_open_to_close_s"]) == 2
    assert case["peak_rss"] > 0


def test_end_to_end_without_flower_at_its_smallest_size(tmp_path: Path) -> None:
    result = run_bench(
        "end_to_end.py", "--repeats", "1", "--rounds", "1", "--no-flower", tmp=tmp_path
    )
    s = result["summary"]
    # fedstudy run and the in-process floor do the same arithmetic: the same accuracy.
    assert s["fedstudy_accuracy"] == pytest.approx(s["floor_accuracy"])
    assert len(result["runs"]["fedstudy"]) == 1
    assert not result["runs"]["flower"]


def test_flower_heart_disease_matches_the_floor(tmp_path: Path) -> None:
    if not FLOWER_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{FLOWER_PYTHON} is missing under CI: scripts/test.sh makes it")
        pytest.skip(f"{FLOWER_PYTHON} is missing: bench/setup-flower.sh makes it")
    sys.path.insert(0, str(BENCH))
    try:
        from end_to_end import write_study
    finally:
        sys.path.remove(str(BENCH))
    study = write_study(tmp_path, rounds=1, seed=0)
    r = subprocess.run(
        [str(FLOWER_PYTHON), str(BENCH / "flower_heart.py"), "--study", str(study), "--rounds",
         "1"],
        capture_output=True, text=True, timeout=180, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    flower = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    from fedstudy_trainer.reference import fedavg_study

    floor = fedavg_study(study)
    assert flower["mean_accuracy"] == pytest.approx(floor.mean())


def test_quality_at_its_smallest_size(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "quality.py"), "--seeds", "1", "--strategies", "fedavg",
         "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["load_before"] is not None
    assert set(result["local_only"]["per_site"]) == {"cleveland", "hungarian", "switzerland", "va"}
    assert 0.0 <= result["pooled"]["mean_accuracy"] <= 1.0
    assert len(result["fedavg"]["runs"]) == 1
