"""Every reason the aggregator gives for a refusal is listed, with its meaning, in
``fedstudy_aggregator.rounds.checks``, and documented in docs/protocol.md."""

from __future__ import annotations

import re
from pathlib import Path

from fedstudy_aggregator.rounds import checks

ROOT = Path(__file__).resolve().parents[2]
AGGREGATOR = ROOT / "aggregator" / "fedstudy_aggregator"


def _reasons_raised(pattern: str, *files: Path) -> set[str]:
    found: set[str] = set()
    for f in files:
        found |= set(re.findall(pattern, f.read_text()))
    return found


def test_every_update_refusal_raised_is_listed() -> None:
    sources = [*AGGREGATOR.rglob("*.py"), ROOT / "fedstudy" / "tensors.py"]
    raised = _reasons_raised(r'(?:Refusal|WireError)\(\s*"([a-z-]+)"', *sources)
    assert raised, "no refusal found: the pattern no longer matches the code"
    assert raised <= set(checks.UPDATE_REFUSALS), raised - set(checks.UPDATE_REFUSALS)
    assert set(checks.UPDATE_REFUSALS) >= checks.CONTENT_REFUSALS


def test_every_join_and_report_refusal_returned_is_listed() -> None:
    text = (AGGREGATOR / "rounds" / "checks.py").read_text()
    join = text[text.index("def join_problem") : text.index("def report_problem")]
    report = text[text.index("def report_problem") : text.index("def check_sender")]
    assert set(re.findall(r'return "([a-z-]+)"', join)) == set(checks.JOIN_REFUSALS)
    assert set(re.findall(r'return "([a-z-]+)"', report)) == set(checks.REPORT_REFUSALS)


def test_every_listed_reason_is_documented_in_the_protocol() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    listed = {
        *checks.UPDATE_REFUSALS,
        *checks.RESERVATION_REFUSALS,
        *checks.JOIN_REFUSALS,
        *checks.REPORT_REFUSALS,
        *checks.CALL_REFUSALS,
    }
    missing = sorted(r for r in listed if f"`{r}`" not in doc)
    assert not missing, f"docs/protocol.md does not name: {missing}"
