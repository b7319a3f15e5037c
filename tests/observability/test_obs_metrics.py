"""The aggregator's /metrics: names per the Prometheus conventions, labels bounded by the
study, a registry per aggregator, and the values the coordinator publishes."""

from __future__ import annotations

import logging
import math
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedstudy_aggregator.metrics import AggregatorMetrics, epsilon_budget_of
from fedstudy_aggregator.server import AggregatorServer
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fedstudy.spec import FederatedStudy, parse_study

SITES = ["north", "south"]
ALLOWED_LABELS = {"study", "site", "reason", "rpc", "kind", "metric", "state", "le"}
# Base units only (seconds, bytes); no milli-/kilo- prefixes, no minutes or hours.
BAD_UNITS = re.compile(r"_(milliseconds|microseconds|minutes|hours|kilobytes|megabytes|ms)(_|$)")


def study(privacy: dict[str, Any] | None = None) -> FederatedStudy:
    spec: dict[str, Any] = {
        "task": {"label": "malignant", "metric": "auc"},
        "model": {"name": "logistic-regression"},
        "rounds": 3,
        "minSites": 2,
        "sites": [
            {
                "name": name,
                "data": {
                    "format": "builtin",
                    "dataset": "breast-cancer",
                    "partition": {"index": i, "count": 2},
                },
            }
            for i, name in enumerate(SITES)
        ],
    }
    if privacy is not None:
        spec["privacy"] = privacy
    return parse_study(
        {
            "apiVersion": "fedstudy.io/v1alpha1",
            "kind": "FederatedStudy",
            "metadata": {"name": "lint"},
            "spec": spec,
        }
    )


def lint(text: str, sites: list[str]) -> list[str]:
    """Problems with an exposition, per the Prometheus naming guide and our label rules."""
    problems = []
    families = list(text_string_to_metric_families(text))
    assert families, "no metrics at all"
    for fam in families:
        if not fam.name.startswith("fedstudy_"):
            problems.append(f"{fam.name}: no fedstudy_ prefix")
        if BAD_UNITS.search(fam.name):
            problems.append(f"{fam.name}: not in base units")
        if fam.type != "counter" and fam.name.endswith("_total"):
            problems.append(f"{fam.name}: a {fam.type} must not end in _total")
        if not fam.documentation:
            problems.append(f"{fam.name}: no HELP text")
        for sample in fam.samples:
            if fam.type == "counter" and not sample.name.endswith(("_total", "_created")):
                problems.append(f"{sample.name}: a counter sample must end in _total")
            if sample.labels.get("study") != "lint":
                problems.append(f"{sample.name}: study label {sample.labels.get('study')!r}")
            extra = set(sample.labels) - ALLOWED_LABELS
            if extra:
                problems.append(f"{sample.name}: unexpected labels {sorted(extra)}")
            site = sample.labels.get("site")
            if site is not None and site not in sites:
                problems.append(f"{sample.name}: site {site!r} is not one of the study's")
    return problems


def exercised(metrics: AggregatorMetrics) -> AggregatorMetrics:
    """Every event once, a few of them for sites the study does not list."""
    state = {"round": 2.0}
    metrics.watch(
        round_fn=lambda: state["round"],
        completed_fn=lambda: 1.0,
        joined_fn=lambda: 2.0,
        answered_fn=lambda: 1.0,
        waiting_fn=lambda: 3.0,
        state_fn=lambda: "training",
    )
    metrics.round_closed(12.5)
    metrics.update_accepted("north", 1)
    metrics.update_accepted("intruder", 1)
    metrics.update_refused("replay")
    metrics.update_refused("some-new-reason")
    metrics.call_refused("identity-mismatch", "SubmitUpdate")
    metrics.bytes_received("north", 1000)
    metrics.bytes_received("intruder", 1000)
    metrics.bytes_sent("south", 2000)
    metrics.report("north", "evaluation")
    metrics.report("intruder", "evaluation")
    metrics.site_metrics("north", {"loss": 0.4, "auc": 0.9, "epsilon": 7.5})
    metrics.site_metrics("south", {"loss": None, "auc": 0.8})
    metrics.site_metrics("intruder", {"loss": 0.1, "epsilon": 1.0})
    metrics.global_metrics({"loss": 0.5, "auc": 0.85, "accuracy": 0.8})
    return metrics


def samples(metrics: AggregatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(metrics.text()):
        for s in fam.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "study"))
            out[(s.name, key)] = s.value
    return out


def test_every_name_follows_the_conventions() -> None:
    metrics = exercised(AggregatorMetrics("lint", SITES, "auc", 3, epsilon_budget=8.0))
    assert lint(metrics.text(), SITES) == []


def test_the_values_published() -> None:
    m = samples(exercised(AggregatorMetrics("lint", SITES, "auc", 3, epsilon_budget=8.0)))
    assert m[("fedstudy_round", ())] == 2
    assert m[("fedstudy_rounds_planned", ())] == 3
    assert m[("fedstudy_uploads_waiting", ())] == 3
    assert m[("fedstudy_study_state", (("state", "training"),))] == 1
    assert m[("fedstudy_study_state", (("state", "done"),))] == 0
    assert m[("fedstudy_round_duration_seconds_count", ())] == 1
    assert m[("fedstudy_round_duration_seconds_sum", ())] == 12.5
    assert m[("fedstudy_updates_accepted_total", (("site", "north"),))] == 1
    assert m[("fedstudy_site_last_round", (("site", "north"),))] == 1
    assert m[("fedstudy_site_last_round", (("site", "south"),))] == 0
    assert m[("fedstudy_updates_refused_total", (("reason", "replay"),))] == 1
    assert m[("fedstudy_updates_refused_total", (("reason", "some-new-reason"),))] == 1
    assert m[("fedstudy_updates_refused_total", (("reason", "duplicate"),))] == 0
    refused_call = (("reason", "identity-mismatch"), ("rpc", "SubmitUpdate"))
    assert m[("fedstudy_calls_refused_total", refused_call)] == 1
    assert (
        m[("fedstudy_calls_refused_total", (("reason", "identity-mismatch"), ("rpc", "Join")))] == 0
    )
    assert m[("fedstudy_received_bytes_total", (("site", "north"),))] == 1000
    assert m[("fedstudy_sent_bytes_total", (("site", "south"),))] == 2000
    assert m[("fedstudy_reports_total", (("kind", "evaluation"), ("site", "north")))] == 1
    assert m[("fedstudy_site_metric", (("metric", "auc"), ("site", "north")))] == 0.9
    assert m[("fedstudy_site_loss", (("site", "north"),))] == 0.4
    assert math.isnan(m[("fedstudy_site_loss", (("site", "south"),))])
    assert m[("fedstudy_site_epsilon", (("site", "north"),))] == 7.5
    assert m[("fedstudy_site_epsilon_budget", (("site", "south"),))] == 8.0
    assert m[("fedstudy_global_metric", (("metric", "auc"),))] == 0.85
    assert m[("fedstudy_global_loss", ())] == 0.5
    assert not any(("site", "intruder") in labels for _, labels in m)


def test_a_registry_per_aggregator() -> None:
    a = AggregatorMetrics("lint", SITES, "auc", 3)
    b = AggregatorMetrics("lint", SITES, "auc", 3)  # same names: no clash
    a.update_refused("replay")
    assert 'reason="replay",study="lint"} 1.0' in a.text()
    assert 'reason="replay",study="lint"} 0.0' in b.text()
    assert REGISTRY.get_sample_value("fedstudy_rounds_planned", {"study": "lint"}) is None


def test_the_budget_comes_from_the_privacy_section() -> None:
    assert epsilon_budget_of(study({"targetEpsilon": 3.0, "delta": 1e-5}).spec) == 3.0
    assert epsilon_budget_of(study().spec) is None
    assert epsilon_budget_of(object()) is None
    no_budget = AggregatorMetrics("lint", SITES, "auc", 3, epsilon_budget=None)
    assert "fedstudy_site_epsilon_budget{" not in no_budget.text()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AggregatorServer]:
    srv = AggregatorServer(
        study({"targetEpsilon": 3.0, "delta": 1e-5}),
        tmp_path / "state",
        tmp_path / "out",
        listen="127.0.0.1:0",
        http="127.0.0.1:0",
        log=logging.getLogger("obs-test"),
        linger=0.1,
        tick_seconds=0.05,
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_the_aggregator_serves_linted_metrics_over_http(server: AggregatorServer) -> None:
    server.coord.record_refused_call("identity-mismatch", "Join", "north", None, "test")
    with urllib.request.urlopen(f"http://{server.endpoint['http']}/metrics", timeout=5) as r:
        ctype = r.headers["Content-Type"]
        text = r.read().decode()
    assert ctype.startswith("text/plain; version=0.0.4")
    assert lint(text, SITES) == []
    assert 'fedstudy_rounds_planned{study="lint"} 3.0' in text
    assert 'fedstudy_study_state{state="waiting",study="lint"} 1.0' in text
    assert 'fedstudy_site_epsilon_budget{site="north",study="lint"} 3.0' in text
    assert 'fedstudy_sites{study="lint"} 2.0' in text
    assert 'fedstudy_round_duration_seconds_count{study="lint"} 0.0' in text
    assert (
        'fedstudy_calls_refused_total{reason="identity-mismatch",rpc="Join",study="lint"} 1.0'
        in text
    )
