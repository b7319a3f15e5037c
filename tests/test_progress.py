"""The plain progress lines of ``fedstudy run``."""

from __future__ import annotations

import io

from rich.console import Console

from fedstudy.local import Progress
from fedstudy.spec import parse_study

STUDY = parse_study({
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "demo"},
    "spec": {
        "task": {"label": "malignant"},
        "model": {"name": "logistic-regression"},
        "rounds": 10,
        "sites": [{"name": "a", "data": {"format": "builtin", "dataset": "breast-cancer"}}],
    },
})  # fmt: skip

SUMMARY = {"rounds_completed": 10, "rounds_planned": 10, "global": {"weighted": {"auc": 0.99}}}


def _plain() -> tuple[Progress, io.StringIO]:
    out = io.StringIO()
    return Progress(STUDY, "plain", Console(file=out, width=200)), out


def test_the_last_round_is_printed_when_the_study_ended_between_two_polls() -> None:
    prog, out = _plain()
    prog.update({"completed_rounds": 6, "planned_rounds": 10, "global": {"auc": 0.9}})
    prog.finish(SUMMARY)
    lines = out.getvalue().splitlines()
    assert lines == [
        "round 6/10 complete: global auc 0.900",
        "round 10/10 complete: global auc 0.990",
    ]


def test_a_round_already_printed_is_not_printed_again() -> None:
    prog, out = _plain()
    prog.update({"completed_rounds": 10, "planned_rounds": 10, "global": {"auc": 0.99}})
    prog.finish(SUMMARY)
    assert out.getvalue().count("round 10/10 complete") == 1
