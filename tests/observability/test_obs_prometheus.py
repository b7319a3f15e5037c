"""A real Prometheus server scrapes a running study's aggregator (processes on loopback, like
the local engine); afterwards every panel of the dashboard has data and every alert rule
evaluates without error."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedstudy import cli
from fedstudy.local import provision_tls
from fedstudy.spec import load_study

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "dashboards" / "fedstudy.json"
RULES = ROOT / "monitoring" / "alerts" / "fedstudy-rules.yaml"
STUDY = "obs-study"
NAMESPACE = "obs-test"
ROUNDS = 3
JOB = "fedstudy-aggregator"

pytestmark = pytest.mark.slow


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not on PATH under CI: scripts/bootstrap.sh installs it")
        pytest.skip(f"{binary} is not installed (apt-get install prometheus); CI runs this test")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class Prom:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        body = _get(url)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        result: list[dict[str, Any]] = data["result"]
        return result


def _scraped_once(prom: Prom) -> bool:
    targets = prom.api("targets")["activeTargets"]
    return any(not t.get("lastScrape", "").startswith("0001-") for t in targets)


def _private_study(tmp_path: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    doc["metadata"]["name"] = STUDY
    doc["spec"].update({"rounds": ROUNDS, "roundTimeoutSeconds": 60})
    # About 1.2 s a round: the study runs through several 1 s scrapes after both sites join.
    doc["spec"]["training"]["localSteps"] = 1500
    doc["spec"]["privacy"] = {"targetEpsilon": 8.0, "delta": 1e-3}
    # Two of the four hospitals: fewer processes importing PyTorch on a small machine.
    doc["spec"]["sites"] = doc["spec"]["sites"][:2]
    doc["spec"]["minSites"] = 2
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prom, int]]:
    """Prometheus on 127.0.0.1 scraping the aggregator's future HTTP port every second."""
    binary = _need("prometheus")
    http_port, prom_port = _free_port(), _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{http_port}"], "labels": {"namespace": NAMESPACE}}
                ],
            }
        ],
    }
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready in 30 s"
            time.sleep(0.2)
        # Targets are picked up a few seconds after start: wait for the first (failed)
        # scrape of the aggregator's port, so that the whole study is scraped.
        while not _scraped_once(Prom(base)):
            assert time.monotonic() < deadline + 30, "prometheus never tried the target"
            time.sleep(0.2)
        yield Prom(base), http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run_study(tmp_path: Path, study: Path, http_port: int) -> tuple[Path, list[str]]:
    """The aggregator and one trainer per site as processes; returns the output folder and
    the aggregator's command line."""
    sites = [s.name for s in load_study(study).spec.sites]
    tls = provision_tls(load_study(study), tmp_path / "tls")
    grpc_addr = f"127.0.0.1:{_free_port()}"
    out, state, logs = tmp_path / "out", tmp_path / "state", tmp_path / "logs"
    logs.mkdir()
    fed = [sys.executable, "-m", "fedstudy"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        p = subprocess.Popen([*fed, *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        return p

    agg_args = [
        *fed,
        "aggregator",
        "--study",
        str(study),
        "--listen",
        grpc_addr,
        "--http",
        f"127.0.0.1:{http_port}",
        "--state-dir",
        str(state / "aggregator"),
        "--out",
        str(out),
        "--linger",
        "10",
        "--tls-dir",
        str(tls["aggregator"]),
    ]
    try:
        agg = start("aggregator", agg_args[len(fed) :])
        for site in sites:
            start(
                site,
                [
                    "trainer",
                    "--study",
                    str(study),
                    "--site",
                    site,
                    "--aggregator",
                    grpc_addr,
                    "--state-dir",
                    str(state / site),
                    "--tls-dir",
                    str(tls[site]),
                ],
            )
        rc = agg.wait(timeout=180)
        assert rc == 0, (logs / "aggregator.log").read_text()[-3000:]
        for p in procs:
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out, agg_args


@contextlib.contextmanager
def _final_state_served(prom: Prom, agg_args: list[str], log: Path) -> Iterator[None]:
    """The finished study's aggregator started again on its state folder: it resumes the
    done study and serves its final state until stopped (a study's aggregator exits as soon
    as every site has heard that the study is done, sometimes before a last scrape)."""
    with open(log, "wb") as f:
        agg = subprocess.Popen([*agg_args, "--linger", "120"], stdout=f, stderr=subprocess.STDOUT)
    try:
        done = f'fedstudy_study_state{{state="done", study="{STUDY}"}} == 1'
        deadline = time.monotonic() + 30
        while not prom.query(done, time.time()):
            assert agg.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the resumed aggregator was not scraped"
            time.sleep(0.3)
        time.sleep(2.2)  # two more scrapes, for the rates
        yield
    finally:
        agg.send_signal(signal.SIGTERM)
        try:
            assert agg.wait(timeout=15) == 0, log.read_text()
        finally:
            if agg.poll() is None:
                agg.kill()
                agg.wait()


def _panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets") or []:
            queries.append((panel["title"], target["expr"]))
    return queries


def _substitute(expr: str) -> str:
    return (
        expr.replace("$namespace", NAMESPACE)
        .replace("$study", STUDY)
        .replace("$__rate_interval", "1m")
    )


def _check_final_state(prom: Prom, sel: str, at: float) -> None:
    for name in ("fedstudy_round", "fedstudy_rounds_completed", "fedstudy_rounds_planned"):
        result = prom.query(name + sel, at)
        assert [float(r["value"][1]) for r in result] == [ROUNDS], (name, result)

    for title, expr in _panel_queries():
        result = prom.query(_substitute(expr), at)
        assert result, f"panel {title!r}: no series for {expr}"

    weighted = prom.query(f"fedstudy_global_metric{sel}", at)
    assert weighted[0]["metric"]["metric"] == "auc"
    assert 0.5 < float(weighted[0]["value"][1]) <= 1.0
    eps = prom.query(f"fedstudy_site_epsilon{sel} / fedstudy_site_epsilon_budget{sel}", at)
    assert {r["metric"]["site"] for r in eps} == {"north", "south"}
    assert all(0 < float(r["value"][1]) <= 1.0 for r in eps)

    # The alert rules load and evaluate against the real series without errors.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == {
        "FedstudyStudyStalled",
        "FedstudySiteMissingRounds",
        "FedstudyPrivacyBudgetNearlySpent",
        "FedstudyUpdatesRefused",
        "FedstudyCallsRefused",
    }
    assert all(r["health"] == "ok" for r in rules), rules


def test_prometheus_scrapes_a_study_and_every_panel_has_data(
    tmp_path: Path, prometheus: tuple[Prom, int]
) -> None:
    prom, http_port = prometheus
    out, agg_args = _run_study(tmp_path, _private_study(tmp_path), http_port)
    sel = f'{{study="{STUDY}", namespace="{NAMESPACE}"}}'
    # The running study was scraped: both sites joined, rounds went by.
    now = time.time()
    joined = prom.query(f"max_over_time(fedstudy_sites_joined{sel}[5m])", now)
    assert [float(r["value"][1]) for r in joined] == [2.0]
    scrapes = prom.query(f"count_over_time(fedstudy_round{sel}[5m])", now)
    assert float(scrapes[0]["value"][1]) >= 3, "fewer than 3 scrapes during the study"

    with _final_state_served(prom, agg_args, tmp_path / "logs" / "aggregator-resumed.log"):
        at = time.time()
        _check_final_state(prom, sel, at)

    # One summary line per round, with the global metrics of the newest evaluated model.
    events = [
        json.loads(line)
        for line in (tmp_path / "logs" / "aggregator.log").read_text().splitlines()
        if line.startswith("{")
    ]
    closed = [e for e in events if e.get("event") == "round-complete"]
    assert [e["round"] for e in closed] == list(range(1, ROUNDS + 1))
    for e in closed:
        assert {"duration_s", "sites", "refused", "global_metrics", "global_version"} <= set(e)
    assert "auc" in closed[-1]["global_metrics"]

    # The report, again from the real outputs: the ε plot is there for a private study.
    assert cli.main(["report", str(out), "--study", str(tmp_path / "study.yaml")]) == 0
    report = (out / "report.md").read_text()
    for name in ("global.png", "sites.png", "epsilon.png", "local-vs-federated.png"):
        assert (out / "report" / name).stat().st_size > 0
        assert f"](report/{name})" in report
