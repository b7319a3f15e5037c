"""Helpers of the chart tests: real helm (scripts/k8s-tools.sh puts it in .tools/bin), renders."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fedstudy"
SCENARIOS = sorted(p.stem.removesuffix("-values") for p in (CHART / "ci").glob("*-values.yaml"))
HELM = ROOT / ".tools" / "bin" / "helm"
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
NAMESPACE = "fedstudy-system"
RELEASE = "fs"

# Helm wants a writable HOME for its caches and config; one per test session.
_HOME = tempfile.mkdtemp(prefix="helm-home-")


def helm_bin() -> Path:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"helm is missing at {HELM}: run scripts/k8s-tools.sh (bootstrap runs it)")
    return HELM


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": _HOME,
        "HELM_CACHE_HOME": f"{_HOME}/cache",
        "HELM_CONFIG_HOME": f"{_HOME}/config",
        "HELM_DATA_HOME": f"{_HOME}/data",
    }
    proc = subprocess.run(
        [str(helm_bin()), *args], env=env, capture_output=True, text=True, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def scenario_file(scenario: str) -> Path:
    return CHART / "ci" / f"{scenario}-values.yaml"


def scenario_values(scenario: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(scenario_file(scenario).read_text()) or {}
    return values


@functools.cache
def render_text(scenario: str | None, *sets: str) -> str:
    """``helm template`` of the chart with a scenario's values (None: the defaults)."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if scenario is not None:
        args += ["-f", str(scenario_file(scenario))]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def render(scenario: str | None, *sets: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(scenario, *sets)) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"{len(found)} {kind} rendered, want 1"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container
