"""The study report: report.md and its plots, from summary.json and metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from fedstudy import cli
from fedstudy.report import PLOT_DIR, PLOT_PIXELS, REPORT_FILE, choose_metric, load_outputs

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (fedstudy[report])")

SITES = {"north": (100, 40), "south": (60, 25)}
ROUNDS = 4
ALL_PLOTS = ("global.png", "sites.png", "epsilon.png", "local-vs-federated.png")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def write_outputs(out: Path, epsilon: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in range(1, ROUNDS + 1):
        for i, (site, (train, test)) in enumerate(SITES.items()):
            line: dict[str, Any] = {
                "round": r,
                "site": site,
                "train_samples": train,
                "train_loss": 0.7 - 0.1 * r,
                "test_samples": test,
                "loss": 0.6 - 0.1 * r,
                "auc": 0.7 + 0.05 * r + 0.01 * i,
                "accuracy": 0.6 + 0.05 * r,
            }
            if epsilon:
                line["epsilon"] = 1.5 * r + i
            lines.append(line)
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {
        "study": "report-test",
        "completed": True,
        "ended_reason": None,
        "rounds_planned": ROUNDS,
        "rounds_completed": ROUNDS,
        "strategy": "fedavg",
        "global": {"weighted": {"auc": 0.91}, "site_mean": {"auc": 0.905}},
        "sites": {
            site: {
                "train_samples": train,
                "test_samples": test,
                "rounds_participated": ROUNDS,
                "federated": {"auc": 0.9 + 0.01 * i, "accuracy": 0.8},
                "local_only": {"auc": 0.85 - 0.05 * i, "accuracy": 0.75},
            }
            for i, (site, (train, test)) in enumerate(SITES.items())
        },
        "refused_updates": {"replay": 1},
    }
    (out / "summary.json").write_text(json.dumps(summary))


def test_report_plots_exist_with_the_expected_size(tmp_path: Path) -> None:
    write_outputs(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    report = (tmp_path / REPORT_FILE).read_text()
    for name in ALL_PLOTS:
        png = tmp_path / PLOT_DIR / name
        assert png.stat().st_size > 1000, name
        assert png_size(png) == PLOT_PIXELS, name
        assert f"]({PLOT_DIR}/{name})" in report
    assert "# Study report: report-test" in report
    assert "| north | 100 | 40 | 0.850 | 0.900 | +0.050 |" in report
    assert "| south | 60 | 25 | 0.800 | 0.910 | +0.110 |" in report
    assert "Refused updates: replay 1" in report
    assert "| north | 6.000 |" in report  # the last ε each site reported


def test_no_epsilon_plot_without_privacy(tmp_path: Path) -> None:
    write_outputs(tmp_path, epsilon=False)
    assert cli.main(["report", str(tmp_path), "--metric", "accuracy"]) == 0
    made = sorted(p.name for p in (tmp_path / PLOT_DIR).glob("*.png"))
    assert made == ["global.png", "local-vs-federated.png", "sites.png"]
    report = (tmp_path / REPORT_FILE).read_text()
    assert "epsilon.png" not in report
    assert "Metric: accuracy" in report


def test_the_metric_defaults_to_what_the_sites_reported(tmp_path: Path) -> None:
    write_outputs(tmp_path)
    assert choose_metric(load_outputs(tmp_path)) == "auc"


def test_a_folder_without_a_summary_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report", str(tmp_path)]) == 1
    assert f"{tmp_path}/summary.json: no such file" in capsys.readouterr().err
