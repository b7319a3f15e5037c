"""A security scan of every rendered scenario with checkov (in .venv-checkov, set up by
scripts/bootstrap.sh): no failed check, and every skipped one named in the chart with a reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from chart_support import ROOT, SCENARIOS, render, render_text

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
SKIP = re.compile(r"^(CKV2?_K8S_\d+)=(.+)$")

pytestmark = pytest.mark.timeout(120)


def test_checkov_passes_every_scenario(tmp_path: Path) -> None:
    if not os.access(CHECKOV, os.X_OK):
        pytest.fail(f"checkov is missing at {CHECKOV}: run scripts/bootstrap.sh")
    for scenario in [None, *SCENARIOS]:
        (tmp_path / f"{scenario or 'defaults'}.yaml").write_text(render_text(scenario))
    proc = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert proc.stdout, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']})"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 100, "checkov checked almost nothing: was the chart rendered?"


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_every_skip_gives_a_reason(scenario: str | None) -> None:
    for doc in render(scenario):
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                m = SKIP.match(value)
                assert m, f"{doc['kind']} {key}: {value!r} is not CKV_K8S_NN=reason"
                assert len(m.group(2).split()) >= 4, f"{key}: give the reason in words"
