"""The study document's sequence and XGBoost fields: each mistake is one message naming its
field and value."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedstudy.spec import StudyError, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]

SEQUENCE: dict[str, Any] = {
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "ehr"},
    "spec": {
        "task": {"label": "sepsis", "metric": "auprc"},
        "model": {"name": "gru", "hiddenSize": 8, "layers": 2},
        "rounds": 2,
        "preprocessing": {
            "sequence": {
                "idColumn": "patient_id",
                "timeColumn": "hour",
                "labels": "early-warning",
                "window": 6,
                "horizon": 4,
                "stride": 2,
            }
        },
        "sites": [
            {"name": "a", "data": {"format": "builtin", "dataset": "synthetic-sepsis"}},
            {"name": "b", "data": {"format": "csv", "path": "b.csv"}},
        ],
    },
}

TREES: dict[str, Any] = {
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "trees"},
    "spec": {
        "task": {"label": "malignant"},
        "model": {"name": "xgboost", "maxDepth": 3, "learningRate": 0.2, "maxBin": 64},
        "rounds": 5,
        "minSites": 2,
        "sites": [
            {"name": "a", "data": {"format": "builtin", "dataset": "breast-cancer"}},
            {"name": "b", "data": {"format": "csv", "path": "b.csv"}},
        ],
    },
}


def problems(base: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> list[str]:
    doc = copy.deepcopy(base)
    edit(doc["spec"])
    with pytest.raises(StudyError) as e:
        parse_study(doc)
    return e.value.problems


def test_the_base_documents_are_valid() -> None:
    study = parse_study(SEQUENCE)
    assert study.spec.model.hidden_size == 8
    assert study.spec.preprocessing.sequence is not None
    assert study.spec.preprocessing.sequence.step_stride == 2
    trees = parse_study(TREES)
    assert trees.spec.model.maxDepth == 3


@pytest.mark.parametrize(
    "path",
    ["sepsis-early-warning.yaml", "sepsis-early-warning-dp.yaml", "heart-disease-xgboost.yaml"],
)
def test_the_examples_are_valid(path: str) -> None:
    load_study(ROOT / "examples" / path)


def _parent(spec: dict[str, Any], path: str) -> tuple[Any, Any]:
    """The container of ``path`` (dots between keys, numbers for list items) and its key."""
    *parents, last = path.split(".")
    node: Any = spec
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, int(last) if isinstance(node, list) else last


def set_in(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        node, key = _parent(spec, path)
        node[key] = value

    return edit


def drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        node, key = _parent(spec, path)
        del node[key]

    return edit


SEQUENCE_CASES = [
    (
        set_in("model.kernelSize", 3),
        "spec.model.kernelSize: 3: 'kernelSize' belongs to tcn; gru does not use it",
    ),
    (
        set_in("model.hidden", [8]),
        "spec.model.hidden: gru takes no 'hidden' list ([8]); size it with 'hiddenSize' and "
        "'layers'",
    ),
    (
        set_in("model.hiddenSize", 0),
        "spec.model.hiddenSize: Input should be greater than or equal to 1, got 0",
    ),
    (
        set_in("model.layers", "two"),
        "spec.model.layers: Input should be a valid integer, got 'two'",
    ),
    (
        drop("preprocessing.sequence"),
        "spec.preprocessing.sequence: model gru reads sequences: describe the long-format "
        "table here (idColumn, timeColumn, labels, window)",
    ),
    (
        set_in("model", {"name": "mlp", "hidden": [4]}),
        "spec.preprocessing.sequence: sequences need a sequence model (gru, lstm, tcn); "
        "model mlp reads a table's rows",
    ),
    (
        drop("preprocessing.sequence.horizon"),
        "spec.preprocessing.sequence.horizon: early-warning labels need 'horizon' "
        "(e.g. horizon: 6)",
    ),
    (
        set_in("preprocessing.sequence.labels", "per-patient"),
        "spec.preprocessing.sequence.horizon: 4.0: 'horizon' belongs to early-warning labels; "
        "per-patient labels make one example per patient",
    ),
    (
        set_in("preprocessing.sequence.labels", "per-step"),
        "spec.preprocessing.sequence.labels: Input should be 'per-patient' or "
        "'early-warning', got 'per-step'",
    ),
    (
        set_in("preprocessing.sequence.timeColumn", "patient_id"),
        "spec.preprocessing.sequence.timeColumn: 'patient_id' is also the idColumn; name the "
        "column of the times",
    ),
    (
        set_in("preprocessing.sequence.window", 0),
        "spec.preprocessing.sequence.window: Input should be greater than or equal to 1, got 0",
    ),
    (
        set_in("preprocessing.sequence.idColumn", "sepsis"),
        "spec.preprocessing.sequence.idColumn: 'sepsis' is also the label column (task.label)",
    ),
    (
        set_in("preprocessing.missing", "impute-mean"),
        "spec.preprocessing.missing: 'impute-mean': sequences carry a patient's last value "
        "forward and mark every missing cell in a mask channel; remove 'missing'",
    ),
    (
        set_in("preprocessing.categorical", {"sex": ["f", "m"]}),
        "spec.preprocessing.categorical: sequences take numeric columns only; code a "
        "categorical column as numbers or drop it (preprocessing.drop)",
    ),
    (
        set_in("preprocessing.drop", ["hour"]),
        "spec.preprocessing.drop: 'hour' is the sequence's timeColumn; it cannot be dropped",
    ),
    (
        set_in("sites.1.data", {"format": "builtin", "dataset": "breast-cancer"}),
        "spec.sites[1].data.dataset: breast-cancer holds no time steps; sequences come from csv "
        "or parquet files or a built-in sequence dataset (synthetic-sepsis)",
    ),
    (
        set_in("sites.1.data.labels", "labels.csv"),
        "spec.sites[1].data.labels: early-warning labels come from the label column of every "
        "time step; a labels table holds one label per patient (labels: per-patient)",
    ),
    (
        set_in("preprocessing.columns", ["patient_id", "sepsis", "heart_rate"]),
        "spec.preprocessing.columns: the declared columns must include idColumn 'patient_id' "
        "and timeColumn 'hour'",
    ),
    (
        set_in("task.metric", "f1"),
        "spec.task.metric: Input should be 'auc', 'auprc', 'accuracy' or 'loss', got 'f1'",
    ),
]


@pytest.mark.parametrize(("edit", "message"), SEQUENCE_CASES)
def test_sequence_mistakes(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    assert problems(SEQUENCE, edit) == [message]


def test_a_sequence_dataset_needs_a_sequence_study() -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["model"] = {"name": "mlp", "hidden": [4]}
        del spec["preprocessing"]

    assert problems(SEQUENCE, edit) == [
        "spec.sites[0].data.dataset: synthetic-sepsis is a long-format table of time steps: "
        "set preprocessing.sequence and a sequence model (gru, lstm, tcn)"
    ]


def test_a_labels_table_belongs_to_sequences() -> None:
    def edit(spec: dict[str, Any]) -> None:
        spec["sites"][1]["data"]["labels"] = "labels.csv"

    assert problems(TREES, edit) == [
        "spec.sites[1].data.labels: a labels table belongs to per-patient sequences "
        "(preprocessing.sequence); a table's label is its task.label column"
    ]


def test_per_patient_sequences_take_a_labels_table() -> None:
    doc = copy.deepcopy(SEQUENCE)
    seq = doc["spec"]["preprocessing"]["sequence"]
    for field in ("horizon", "stride"):
        del seq[field]
    seq["labels"] = "per-patient"
    doc["spec"]["sites"][1]["data"]["labels"] = "labels.csv"
    assert parse_study(doc).spec.sites[1].data.labels == "labels.csv"


TREE_CASES = [
    (
        set_in("privacy", {"targetEpsilon": 1.0, "delta": 1e-5}),
        "spec.privacy: DP-SGD clips and noises gradient steps; xgboost grows trees from the "
        "sites' gradient histograms: remove spec.privacy",
    ),
    (
        set_in("serverPrivacy", {"clipNorm": 1.0, "noiseMultiplier": 1.0}),
        "spec.serverPrivacy: server-side DP noises the sites' model changes; xgboost's trees "
        "are built together, not averaged: remove spec.serverPrivacy",
    ),
    (
        set_in("strategy", {"name": "fedadam"}),
        "spec.strategy: 'fedadam': xgboost's sites build every tree together (XGBoost's "
        "federated mode), so there is nothing to average: remove spec.strategy",
    ),
    (
        set_in("training", {"localSteps": 5}),
        "spec.training: xgboost takes its settings in spec.model (maxDepth, learningRate, "
        "minChildWeight, regLambda, maxBin): remove spec.training",
    ),
    (
        set_in("minSites", 1),
        "spec.minSites: 1: xgboost's federated mode needs every site in every round; set "
        "minSites to the number of sites, 2",
    ),
    (
        set_in("model.hiddenSize", 8),
        "spec.model.hiddenSize: 8: 'hiddenSize' belongs to gru, lstm or tcn; xgboost does not "
        "use it",
    ),
    (
        set_in("model.dropout", 0.2),
        "spec.model.dropout: 0.2: xgboost grows trees and has no dropout; remove it",
    ),
    (
        set_in("model.maxDepth", 11),
        "spec.model.maxDepth: Input should be less than or equal to 10, got 11",
    ),
    (
        set_in("model.learningRate", 0),
        "spec.model.learningRate: Input should be greater than 0, got 0",
    ),
    (
        set_in("model", {"name": "mlp", "hidden": [4], "maxDepth": 3}),
        "spec.model.maxDepth: 3: 'maxDepth' belongs to xgboost; mlp does not use it",
    ),
]


@pytest.mark.parametrize(("edit", "message"), TREE_CASES)
def test_xgboost_mistakes(edit: Callable[[dict[str, Any]], None], message: str) -> None:
    assert problems(TREES, edit) == [message]


def test_strategy_and_training_at_their_defaults_pass_for_xgboost() -> None:
    doc = copy.deepcopy(TREES)
    doc["spec"]["strategy"] = {"name": "fedavg"}
    doc["spec"]["training"] = {"localSteps": 100}
    assert parse_study(doc).spec.model.name == "xgboost"
