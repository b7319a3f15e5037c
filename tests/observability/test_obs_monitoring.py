"""The checked-in dashboard is the generator's output; the alert rules pass promtool's check
and their unit tests (each alert fires in one case and stays quiet in another)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "dashboards" / "fedstudy.json"
RULES = MONITORING / "alerts" / "fedstudy-rules.yaml"
RULE_TESTS = sorted((MONITORING / "alerts" / "tests").glob("*.yaml"))
CHART = ROOT / "charts" / "fedstudy"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", MONITORING / "build_dashboard.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not on PATH under CI: scripts/bootstrap.sh installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI runs this test")
    return path


def test_the_dashboard_is_the_generators_output() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == _generator().render(), (
        "monitoring/dashboards/fedstudy.json is stale: run python monitoring/build_dashboard.py"
    )


def test_the_dashboard_selects_one_study_in_one_namespace() -> None:
    board = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "study"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for wanted in (
        "Round progress",
        "Round duration",
        "Sites",
        "Global metric and loss",
        "Metric per site",
        "Privacy budget per site (ε)",
        "Refused updates by reason",
        "Traffic per site",
    ):
        assert wanted in titles
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'namespace="$namespace"' in t["expr"], (p["title"], t["expr"])
            assert 'study="$study"' in t["expr"], (p["title"], t["expr"])


def test_promtool_checks_the_rules() -> None:
    r = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout


@pytest.mark.parametrize("case", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_tests(case: Path) -> None:
    r = subprocess.run(
        [_promtool(), "test", "rules", case.name],
        cwd=case.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in RULE_TESTS:
        for test in yaml.safe_load(case.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == alerts
    assert quiet == alerts


@pytest.mark.parametrize(
    ("copy", "source"),
    [
        (CHART / "dashboards" / "fedstudy.json", DASHBOARD),
        (CHART / "alerts" / "fedstudy-rules.yaml", RULES),
    ],
    ids=["dashboard", "alerts"],
)
def test_the_charts_copies_are_current(copy: Path, source: Path) -> None:
    if not copy.exists():
        pytest.skip(f"the chart has no {copy.relative_to(ROOT)}")
    assert copy.read_bytes() == source.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: copy it again"
    )
