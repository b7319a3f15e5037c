"""The study document: valid examples pass, each malformed one fails with its own message."""

from __future__ import annotations

import copy
import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedstudy.spec import (
    StudyError,
    check_irb,
    check_local_files,
    load_study,
    parse_study,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

BASE: dict[str, Any] = {
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "heart"},
    "spec": {
        "task": {"type": "binary-classification", "label": "target", "metric": "auc"},
        "model": {"name": "mlp", "hidden": [32]},
        "rounds": 15,
        "minSites": 2,
        "roundTimeoutSeconds": 600,
        "strategy": {"name": "fedavg"},
        "training": {"localSteps": 100, "batchSize": 16, "optimizer": "sgd", "learningRate": 0.01},
        "sites": [
            {
                "name": "cleveland",
                "data": {"format": "csv", "path": "a.csv"},
                "resources": {"gpu": 1},
            },
            {"name": "hungarian", "data": {"format": "csv", "path": "b.csv"}},
            {"name": "va", "data": {"format": "parquet", "path": "c.parquet"}},
        ],
    },
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with one value set (``value=...`` deletes nothing; use _without for that)."""
    doc = copy.deepcopy(BASE)
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def _without(path: str) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    del node[parts[-1]]
    return doc


def _problems(doc: Any) -> list[str]:
    with pytest.raises(StudyError) as info:
        parse_study(doc)
    return info.value.problems


def test_base_document_is_valid() -> None:
    study = parse_study(BASE)
    assert study.name == "heart"
    assert [s.name for s in study.spec.sites] == ["cleveland", "hungarian", "va"]
    assert study.spec.site("va").data.format == "parquet"


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(example: Path) -> None:
    study = load_study(example)
    assert study.spec.rounds >= 1


MALFORMED = [
    pytest.param(
        _with("spec.rounds", 0),
        "spec.rounds: Input should be greater than or equal to 1, got 0",
        id="rounds-zero",
    ),
    pytest.param(
        _with("spec.rounds", 10**12),
        "spec.rounds: Input should be less than or equal to 1000000, got 1000000000000",
        id="rounds-beyond-the-wire",
    ),
    pytest.param(
        _with("spec.rounds", "ten"),
        "spec.rounds: Input should be a valid integer, got 'ten'",
        id="rounds-string",
    ),
    pytest.param(
        _with("spec.minSites", 4),
        "spec.minSites: 4 is more than the 3 sites the study lists",
        id="minsites-above-sites",
    ),
    pytest.param(
        _with("spec.sites.2.name", "cleveland"),
        "spec.sites[2].name: duplicate site name 'cleveland' (also sites[0])",
        id="duplicate-site",
    ),
    pytest.param(
        _with("spec.sites.1.data.formt", "csv"),
        "spec.sites[1].data.formt: unknown field (value 'csv')",
        id="unknown-nested-field",
    ),
    pytest.param(
        _with("spec.epochs", 3), "spec.epochs: unknown field (value 3)", id="unknown-spec-field"
    ),
    pytest.param(
        _with("spec.strategy.name", "fedsgd"),
        "spec.strategy.name: Input should be "
        "'fedavg', 'fedprox', 'fedadam', 'fedyogi', 'median' or 'trimmed-mean', got 'fedsgd'",
        id="unknown-strategy",
    ),
    pytest.param(
        _with("spec.strategy", {"name": "fedavg", "mu": 0.1}),
        "spec.strategy: 'mu' is FedProx's proximal coefficient; fedavg does not use it",
        id="mu-without-fedprox",
    ),
    pytest.param(
        _with("spec.training.learningRate", -0.1),
        "spec.training.learningRate: Input should be greater than 0, got -0.1",
        id="negative-lr",
    ),
    pytest.param(
        _with("spec.training.optimizer", "rmsprop"),
        "spec.training.optimizer: Input should be 'sgd' or 'adam', got 'rmsprop'",
        id="unknown-optimizer",
    ),
    pytest.param(
        _with("spec.sites.0.name", "Cleveland Clinic"),
        "spec.sites[0].name: a site name must be a DNS-1123 label",
        id="site-name-not-dns",
    ),
    pytest.param(
        _with("spec.sites.1.data", {"format": "csv"}),
        "spec.sites[1].data: format csv needs 'path'",
        id="csv-without-path",
    ),
    pytest.param(
        _with("spec.model", {"name": "mlp"}),
        "spec.model: an mlp needs at least one hidden layer size",
        id="mlp-without-hidden",
    ),
    pytest.param(
        _with("spec.model.hidden", [32, 0]),
        "spec.model.hidden[1]: Input should be greater than or equal to 1, got 0",
        id="hidden-zero",
    ),
    pytest.param(_without("spec.task"), "spec.task: required field is missing", id="missing-task"),
    pytest.param(
        _with("kind", "Study"),
        "kind: Input should be 'FederatedStudy', got 'Study'",
        id="wrong-kind",
    ),
    pytest.param(
        _with("apiVersion", "fedstudy.io/v2"),
        "apiVersion: Input should be 'fedstudy.io/v1alpha1', got 'fedstudy.io/v2'",
        id="wrong-api-version",
    ),
    pytest.param(
        _with("spec.sites", []), "spec.sites: List should have at least 1 item", id="no-sites"
    ),
    pytest.param(
        _with("spec.preprocessing", {"testFraction": 1.5}),
        "spec.preprocessing.testFraction: Input should be less than 1, got 1.5",
        id="test-fraction",
    ),
    pytest.param(
        _with("spec.preprocessing", {"categorical": {"cp": [1]}}),
        "spec.preprocessing.categorical: column 'cp' needs at least two levels",
        id="categorical-one-level",
    ),
    pytest.param(
        _with("spec.sites.0.resources.gpu", -1),
        "spec.sites[0].resources.gpu: Input should be greater than or equal to 0, got -1",
        id="negative-gpu",
    ),
    pytest.param(
        _with("metadata.name", "Heart_Study"),
        "metadata.name: a study name must be a DNS-1123 label",
        id="study-name-not-dns",
    ),
    pytest.param(
        _with(
            "spec.sites.0.data",
            {
                "format": "builtin",
                "dataset": "breast-cancer",
                "partition": {"index": 4, "count": 4},
            },
        ),
        "spec.sites[0].data.partition: index 4 must be below count 4",
        id="partition-index",
    ),
    pytest.param(
        _with("spec.governance", {"irb": {"protocol": "IRB-1", "approvedUntil": "not-a-date"}}),
        "spec.governance.irb.approvedUntil: Input should be a valid date",
        id="irb-date",
    ),
    pytest.param(["not", "a", "mapping"], "(document): a study is a mapping", id="list-doc"),
]


@pytest.mark.parametrize(("doc", "expected"), MALFORMED)
def test_malformed_document_names_field_and_value(doc: Any, expected: str) -> None:
    problems = _problems(doc)
    assert any(p.startswith(expected) for p in problems), problems


def test_every_problem_is_reported_not_just_the_first() -> None:
    doc = _with("spec.rounds", 0)
    doc["spec"]["training"]["batchSize"] = 0
    problems = _problems(doc)
    assert any(p.startswith("spec.rounds:") for p in problems)
    assert any(p.startswith("spec.training.batchSize:") for p in problems)


def test_missing_data_file_names_site_and_path(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,target\n1,0\n")
    (tmp_path / "b.csv").write_text("x,target\n1,0\n")
    study = parse_study(BASE)
    with pytest.raises(StudyError) as info:
        check_local_files(study, tmp_path)
    assert info.value.problems == [f"spec.sites[2].data.path: no such file: {tmp_path}/c.parquet"]
    # Only the named sites are checked: a site cluster checks its own file.
    check_local_files(study, tmp_path, sites=["cleveland"])


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("apiVersion: fedstudy.io/v1alpha1\nspec: [unclosed\n")
    with pytest.raises(StudyError) as info:
        load_study(p)
    assert info.value.problems[0].startswith("(document): not valid YAML at line")


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(StudyError) as info:
        load_study(tmp_path / "nope.yaml")
    assert info.value.problems == [f"(file): no such file: {tmp_path}/nope.yaml"]


def test_two_documents_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(BASE) + "---\n" + yaml.safe_dump(BASE))
    with pytest.raises(StudyError) as info:
        load_study(p)
    assert "exactly one document, found 2" in info.value.problems[0]


def test_irb_expired_names_protocol_and_date() -> None:
    doc = _with(
        "spec.governance", {"irb": {"protocol": "IRB-2026-0142", "approvedUntil": "2026-01-31"}}
    )
    study = parse_study(doc)
    check_irb(study, today=dt.date(2026, 1, 31))
    with pytest.raises(StudyError) as info:
        check_irb(study, today=dt.date(2026, 2, 1))
    assert "IRB-2026-0142" in str(info.value)
    assert "expired on 2026-01-31" in str(info.value)


def test_kubernetes_server_fields_in_metadata_pass() -> None:
    doc = copy.deepcopy(BASE)
    doc["metadata"].update(uid="abc", resourceVersion="7", generation=2, namespace="studies")
    doc["status"] = {"phase": "Running"}
    assert parse_study(doc).metadata.namespace == "studies"


def test_validate_command_reports_and_exits_non_zero(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(_with("spec.minSites", 9)))
    r = subprocess.run(
        [sys.executable, "-m", "fedstudy", "validate", "--no-files", str(p)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert "spec.minSites: 9 is more than the 3 sites the study lists" in r.stderr
    good = subprocess.run(
        [sys.executable, "-m", "fedstudy", "validate", str(EXAMPLES / "breast-cancer.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert "valid: study breast-cancer" in good.stdout


def _load_problems(tmp_path: Path, content: str | bytes) -> list[str]:
    p = tmp_path / "s.yaml"
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(StudyError) as info:
        load_study(p)
    return info.value.problems


def test_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    problems = _load_problems(tmp_path, b"apiVersion: fedstudy.io/v1alpha1\nkind: \xff\n")
    assert problems == ["(file): not UTF-8 text: byte 0xff at offset 39 (invalid start byte)"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-02-30", "'2026-02-30' is not a valid timestamp (day is out of range for month)"),
        ("!!int x", "'x' is not a valid int (invalid literal for int() with base 10: 'x')"),
        ("!!timestamp x", "'x' is not a valid timestamp"),
    ],
)
def test_yaml_value_that_cannot_be_read_names_its_line(
    tmp_path: Path, value: str, expected: str
) -> None:
    text = yaml.safe_dump(BASE).replace("rounds: 15", f"rounds: {value}")
    line = text.splitlines().index(f"  rounds: {value}") + 1
    problems = _load_problems(tmp_path, text)
    assert problems == [f"(document): not valid YAML at line {line}, column 11: {expected}"]


@pytest.mark.parametrize(
    "text",
    ["[" * 3000, "{a: " * 3000, "".join("  " * i + "- \n" for i in range(3000))],
    ids=["flow-sequences", "flow-mappings", "block-sequences"],
)
def test_yaml_nested_too_deeply_is_refused(tmp_path: Path, text: str) -> None:
    problems = _load_problems(tmp_path, text)
    assert problems == ["(document): not valid YAML: nested too deeply to read"]


def test_control_character_in_yaml_is_reported_on_one_line(tmp_path: Path) -> None:
    problems = _load_problems(tmp_path, "apiVersion: a\x07b\n")
    assert problems == [
        "(document): not valid YAML at character 14: unacceptable character #x0007: "
        "special characters are not allowed"
    ]


def test_odd_key_is_quoted_so_each_problem_is_one_line() -> None:
    problems = _problems(_with("spec.task.a\nb", 1))
    assert "spec.task['a\\nb']: unknown field (value 1)" in problems
    problems = _problems(_with("spec. ", 1))
    assert "spec[' ']: unknown field (value 1)" in problems


def test_value_too_deep_or_too_large_to_print_is_still_reported(tmp_path: Path) -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    problems = _problems(_with("spec.rounds", deep))
    assert problems == [
        "spec.rounds: Input should be a valid integer, got <list nested too deeply to show>"
    ]
    # YAML reads hexadecimal integers of any length; Python will not print them in decimal.
    text = yaml.safe_dump(BASE) + "huge: 0x" + "f" * 5000 + "\n"
    assert _load_problems(tmp_path, text) == ["huge: unknown field (value <int too large to show>)"]
