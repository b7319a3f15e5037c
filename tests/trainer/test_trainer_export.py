"""A site's fitted preprocessing, the ONNX export and ``fedstudy predict``, in process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fedstudy_trainer import export, predict
from fedstudy_trainer.data import SiteDataset, load_site_data, read_site_table
from fedstudy_trainer.export import check_rows, export_onnx, torch_scores
from fedstudy_trainer.features import (
    FeatureError,
    read_preprocessing,
    write_preprocessing,
)
from fedstudy_trainer.models import build_model, get_weights
from fedstudy_trainer.predict import OnnxModel
from safetensors.numpy import save_file
from trainer_support import breast_cancer_sites, make_study

from fedstudy.spec import FederatedStudy

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def usable_rows(study: FederatedStudy, site: str) -> pd.DataFrame:
    """The site's raw rows that preprocessing keeps (label present; under drop-rows, no
    missing cell in a feature column)."""
    table, _ = read_site_table(study.spec, study.spec.site(site), Path("."))
    table.columns = pd.Index([str(c).strip() for c in table.columns])
    data = load_site_data(study, site, Path("."))
    assert data.transform is not None
    needed = [study.spec.task.label]
    if study.spec.preprocessing.missing == "drop-rows":
        needed += list(data.transform.columns)
    return table.dropna(subset=needed).reset_index(drop=True)


def matching_rows(features: np.ndarray, wanted: np.ndarray) -> list[int]:
    """For each row of ``wanted``, the index of an equal row of ``features`` (within 1e-5),
    each index used once (a table may hold the same row twice)."""
    out: list[int] = []
    for row in wanted:
        equal = np.flatnonzero(np.abs(features - row).max(axis=1) <= 1e-5)
        free = [int(i) for i in equal if int(i) not in out]
        assert free, f"no row of the transform matches {row}"
        out.append(free[0])
    return out


def test_the_transform_makes_the_sites_own_training_and_test_features(
    heart_study: FederatedStudy,
) -> None:
    for site in heart_study.spec.sites:
        data = load_site_data(heart_study, site.name, Path("."))
        assert data.transform is not None
        rows = usable_rows(heart_study, site.name)
        features = data.transform.apply(rows, site.name)
        assert features.shape == (data.n_train + data.n_test, data.n_features)
        matched = matching_rows(features, np.concatenate([data.X_train, data.X_test]))
        assert sorted(matched) == list(range(len(rows))), site.name


def test_imputed_cells_get_the_training_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    table = pd.DataFrame(
        {
            "age": rng.normal(60, 10, 80).round(1),
            "chol": rng.normal(240, 40, 80).round(0),
            "cp": rng.integers(1, 4, 80),
            "label": rng.integers(0, 2, 80),
        }
    ).astype(object)
    table.loc[[3, 17, 40], "age"] = "?"
    table.loc[[5, 60], "cp"] = ""
    csv = tmp_path / "site.csv"
    table.to_csv(csv, index=False)
    study = make_study(
        [{"name": "a", "data": {"format": "csv", "path": str(csv)}}],
        preprocessing={
            "naValues": ["?"],
            "missing": "impute-mean",
            "categorical": {"cp": [1, 2, 3]},
        },
    )
    data = load_site_data(study, "a", tmp_path)
    assert data.transform is not None
    assert data.transform.fill is not None
    rows = data.transform.read_csv(csv)
    features = data.transform.apply(rows, str(csv))
    matched = matching_rows(features, np.concatenate([data.X_train, data.X_test]))
    assert sorted(matched) == list(range(80))


def test_preprocessing_json_round_trips_and_bad_fields_are_named(tmp_path: Path) -> None:
    study = make_study(breast_cancer_sites(2))
    data = load_site_data(study, "site-0", Path("."))
    assert data.transform is not None
    path = tmp_path / "preprocessing.json"
    write_preprocessing(path, data.transform, study.name, "site-0")
    back, study_name, site = read_preprocessing(path)
    assert (back, study_name, site) == (data.transform, "test-study", "site-0")

    doc = json.loads(path.read_text())
    doc["transform"]["scale"] = doc["transform"]["scale"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(FeatureError, match=r"preprocessing.json: scale: not a list of 30 finite"):
        read_preprocessing(path)
    del doc["transform"]["mean"]
    path.write_text(json.dumps(doc))
    with pytest.raises(FeatureError, match=r"no field 'mean'"):
        read_preprocessing(path)


@pytest.mark.parametrize(
    "model_spec",
    [{"name": "logistic-regression"}, {"name": "mlp", "hidden": [16, 8], "dropout": 0.2}],
    ids=["logistic-regression", "mlp"],
)
def test_onnx_outputs_match_pytorch_on_the_test_rows(
    tmp_path: Path, model_spec: dict[str, Any]
) -> None:
    study = make_study(breast_cancer_sites(2), model=model_spec, seed=5)
    data = load_site_data(study, "site-1", Path("."))
    model = build_model(study.spec.model, data.input_shape, seed=study.spec.seed)
    with torch.no_grad():  # weights away from their initial scale, as after training
        for p in model.parameters():
            p.mul_(3.0)
    model.eval()
    path = tmp_path / "model.onnx"
    export_onnx(model, data.input_shape, path, {"study": study.name})
    check = check_rows(model, OnnxModel(path), "site-1", data.X_test)
    assert check.rows == data.n_test
    assert check.logit_diff <= 1e-5
    assert check.probability_diff <= 1e-5
    # Also for a single row and for a batch larger than the test split.
    onnx_model = OnnxModel(path)
    for x in (data.X_test[:1], np.concatenate([data.X_train, data.X_test])):
        assert np.abs(onnx_model.run(x)[0] - torch_scores(model, x)[0]).max() <= 1e-5


@pytest.fixture
def heart_export(
    tmp_path: Path, heart_study: FederatedStudy
) -> tuple[Path, Path, SiteDataset, torch.nn.Module]:
    """A logistic regression for the heart-disease features, exported; the preprocessing of
    site hungarian saved beside it."""
    data = load_site_data(heart_study, "hungarian", Path("."))
    assert data.transform is not None
    model = build_model(heart_study.spec.model, data.input_shape, seed=1)
    model.eval()
    onnx_path = tmp_path / "model.onnx"
    meta = {"study": heart_study.name, "feature_names": list(data.feature_names)}
    export_onnx(model, data.input_shape, onnx_path, meta)
    pre = tmp_path / "preprocessing.json"
    write_preprocessing(pre, data.transform, heart_study.name, "hungarian")
    return onnx_path, pre, data, model


def test_predict_scores_a_csv_as_pytorch_scores_the_sites_test_rows(
    tmp_path: Path,
    heart_study: FederatedStudy,
    heart_export: tuple[Path, Path, SiteDataset, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx_path, pre, data, model = heart_export
    assert data.transform is not None
    rows = usable_rows(heart_study, "hungarian")
    features = data.transform.apply(rows, "hungarian")
    test_rows = rows.iloc[matching_rows(features, data.X_test)].drop(columns=["num"])
    csv = tmp_path / "new-patients.csv"
    test_rows.to_csv(csv, index=False)
    out = tmp_path / "scores.csv"
    code = predict.main([str(onnx_path), str(csv), "--preprocessing", str(pre), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    scores = pd.read_csv(out)
    assert list(scores.columns) == ["row", "logit", "probability"]
    assert scores["row"].tolist() == list(range(1, data.n_test + 1))
    logit, prob = torch_scores(model, data.X_test)
    assert np.abs(scores["logit"].to_numpy() - logit).max() <= 1e-5
    assert np.abs(scores["probability"].to_numpy() - prob).max() <= 1e-5


def _predict_error(
    onnx_path: Path, pre: Path, csv: Path, capsys: pytest.CaptureFixture[str]
) -> str:
    code = predict.main([str(onnx_path), str(csv), "--preprocessing", str(pre)])
    assert code == 2
    return capsys.readouterr().err


def test_predict_names_a_missing_column(
    tmp_path: Path,
    heart_export: tuple[Path, Path, SiteDataset, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx_path, pre, _, _ = heart_export
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "age,sex,cp,trestbps,fbs,restecg,thalach,exang,oldpeak\n63,1,1,145,1,2,150,0,2.3\n"
    )
    err = _predict_error(onnx_path, pre, csv, capsys)
    assert f"{csv}: no column 'chol', which the model reads" in err


def test_predict_names_a_value_that_is_not_a_number(
    tmp_path: Path,
    heart_export: tuple[Path, Path, SiteDataset, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx_path, pre, _, _ = heart_export
    header = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak\n"
    csv = tmp_path / "rows.csv"
    csv.write_text(header + "63,1,1,145,233,1,2,150,0,2.3\n67,1,4,160,high,0,2,108,1,1.5\n")
    err = _predict_error(onnx_path, pre, csv, capsys)
    assert "column 'chol' holds 'high' (data row 2), which is not a number" in err
    csv.write_text(header + "63,1,7,145,233,1,2,150,0,2.3\n")
    err = _predict_error(onnx_path, pre, csv, capsys)
    assert "column 'cp' holds '7' (data row 1), which is not one of its levels [1, 2, 3, 4]" in err
    csv.write_text(header + "63,1,1,?,233,1,2,150,0,2.3\n")
    err = _predict_error(onnx_path, pre, csv, capsys)
    assert "column 'trestbps' is empty (or one of naValues) in data row 1" in err


def test_predict_refuses_a_model_made_for_other_features(
    tmp_path: Path,
    heart_export: tuple[Path, Path, SiteDataset, torch.nn.Module],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, _, _ = heart_export
    study = make_study(breast_cancer_sites(2))
    data = load_site_data(study, "site-0", Path("."))
    assert data.transform is not None
    other = tmp_path / "other.json"
    write_preprocessing(other, data.transform, study.name, "site-0")
    err = _predict_error(heart_export[0], other, tmp_path / "unused.csv", capsys)
    assert "the model is study 'heart-disease''s; the preprocessing is study 'test-study''s" in err


def test_export_of_a_model_that_is_no_torch_module_is_skipped_with_its_own_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    study = make_study(breast_cancer_sites(2))
    study_path = tmp_path / "study.yaml"
    study_path.write_text(json.dumps(study.model_dump(mode="json", exclude_none=True)))
    data = load_site_data(study, "site-0", Path("."))
    weights = get_weights(build_model(study.spec.model, data.input_shape))
    model_path = tmp_path / "model.safetensors"
    save_file({f"model/{k}": v for k, v in weights.items()}, str(model_path))
    assert export.main([str(model_path), "--study", str(study_path)]) == 0
    assert (tmp_path / "model.onnx").is_file()

    def trees(*args: Any, **kwargs: Any) -> torch.nn.Module:
        raise ValueError("model xgboost is grown by XGBoost, not built as a torch module")

    monkeypatch.setattr(export, "build_model", trees)
    (tmp_path / "model.onnx").unlink()
    assert export.main([str(model_path), "--study", str(study_path)]) == export.EXIT_NOT_EXPORTABLE
    assert "no ONNX export: model logistic-regression: model xgboost is grown" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "model.onnx").exists()
