"""spec.privacy: valid settings pass; each bad value fails naming the field and the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fedstudy.spec import Privacy, StudyError, parse_study

DOC: dict[str, Any] = {
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "dp"},
    "spec": {
        "task": {"label": "target"},
        "model": {"name": "logistic-regression"},
        "rounds": 3,
        "privacy": {"targetEpsilon": 1.0, "delta": 1e-5, "maxGradNorm": 1.0},
        "sites": [{"name": "a", "data": {"format": "builtin", "dataset": "breast-cancer"}}],
    },
}


def with_privacy(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    doc["spec"]["privacy"].update(changes)
    return doc


def test_defaults_and_optional_fields() -> None:
    privacy = parse_study(DOC).spec.privacy
    assert privacy == Privacy(targetEpsilon=1.0, delta=1e-5, maxGradNorm=1.0)
    assert privacy is not None
    assert privacy.accountant == "rdp"
    assert privacy.noiseMultiplier is None
    full = parse_study(with_privacy(noiseMultiplier=1.3, accountant="prv")).spec.privacy
    assert full is not None
    assert full.noiseMultiplier == 1.3
    assert full.accountant == "prv"
    nodp = copy.deepcopy(DOC)
    del nodp["spec"]["privacy"]
    assert parse_study(nodp).spec.privacy is None


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"targetEpsilon": 0}, "spec.privacy.targetEpsilon", "above 0"),
        ({"targetEpsilon": -2.0}, "spec.privacy.targetEpsilon", "e.g. 1.0"),
        ({"delta": 1.0}, "spec.privacy.delta", "1 / (the smallest site's train rows)"),
        ({"delta": 0}, "spec.privacy.delta", "between 0 and 1"),
        ({"maxGradNorm": 0}, "spec.privacy.maxGradNorm", "1.0 is a common start"),
        ({"maxGradNorm": -1}, "spec.privacy.maxGradNorm", "above 0"),
        ({"noiseMultiplier": 0}, "spec.privacy.noiseMultiplier", "remove it"),
        ({"accountant": "moments"}, "spec.privacy.accountant", "'rdp', 'prv' or 'gdp'"),
        ({"epsilon": 1.0}, "spec.privacy.epsilon", "unknown field"),
    ],
)
def test_bad_values_name_the_field(changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(StudyError) as info:
        parse_study(with_privacy(**changes))
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(field + ":"), problems
    assert words in problems[0]


def test_required_fields() -> None:
    doc = copy.deepcopy(DOC)
    doc["spec"]["privacy"] = {"maxGradNorm": 1.0}
    with pytest.raises(StudyError) as info:
        parse_study(doc)
    assert sorted(info.value.problems) == [
        "spec.privacy.delta: required field is missing",
        "spec.privacy.targetEpsilon: required field is missing",
    ]
