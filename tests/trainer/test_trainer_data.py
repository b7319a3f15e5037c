"""The site data pipeline: reading tables, preprocessing, splits, built-in partitions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fedstudy_trainer.data import (
    DataError,
    SiteDataset,
    builtin_table,
    load_site_data,
    partition_rows,
)
from trainer_support import HEART_FILES, breast_cancer_sites, make_study

from fedstudy.spec import FederatedStudy, parse_study

# --- heart disease (FLamby) -----------------------------------------------------------------

FLAMBY_SIZES = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16),
                "va": (85, 45)}  # fmt: skip


def _heart(study: FederatedStudy, site: str) -> SiteDataset:
    return load_site_data(study, site, Path("/"))


def test_heart_disease_splits_match_flamby(heart_study: FederatedStudy) -> None:
    for site, (n_train, n_test) in FLAMBY_SIZES.items():
        data = _heart(heart_study, site)
        assert (data.n_train, data.n_test) == (n_train, n_test), site
    assert sum(sum(s) for s in FLAMBY_SIZES.values()) == 740


def test_heart_disease_features_are_identical_at_every_site(heart_study: FederatedStudy) -> None:
    names = {site: _heart(heart_study, site).feature_names for site in HEART_FILES}
    numeric = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
    one_hot = ("cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
    for site, features in names.items():
        assert features == numeric + one_hot, site


def test_heart_disease_standardised_with_training_statistics(heart_study: FederatedStudy) -> None:
    raw_doc = heart_study.model_dump(mode="json", exclude_none=True)
    raw_doc["spec"]["preprocessing"]["standardize"] = False
    raw_study = parse_study(raw_doc)
    for site in HEART_FILES:
        data = _heart(heart_study, site)
        raw = _heart(raw_study, site)
        assert np.allclose(data.X_train.mean(axis=0), 0.0, atol=1e-5), site
        std = data.X_train.std(axis=0, ddof=1)
        constant = raw.X_train.std(axis=0) == 0  # e.g. chol is 0 throughout in Switzerland
        assert np.allclose(std[~constant], 1.0, atol=1e-4), site
        assert np.all(data.X_train[:, constant] == 0), site
        mean = raw.X_train.mean(axis=0, dtype=np.float64)
        scale = raw.X_train.std(axis=0, ddof=1, dtype=np.float64)
        scale[scale == 0] = 1.0
        assert np.allclose(data.X_test, (raw.X_test - mean) / scale, atol=1e-4), site
        assert set(np.unique(data.y_train)) <= {0.0, 1.0}


def test_heart_disease_switzerland_split_falls_back_to_unstratified(
    heart_study: FederatedStudy,
) -> None:
    # One negative row only, as in FLamby: the split cannot be stratified and says so.
    data = _heart(heart_study, "switzerland")
    assert data.notes
    assert "not stratified" in data.notes[0]
    assert _heart(heart_study, "cleveland").notes == ()


# --- hand-made tables -----------------------------------------------------------------------


def _csv_site(path: Path, header: bool = True) -> list[dict[str, Any]]:
    return [{"name": "clinic", "data": {"format": "csv", "path": str(path), "header": header}}]


def _parquet_site(path: Path) -> list[dict[str, Any]]:
    return [{"name": "clinic", "data": {"format": "parquet", "path": str(path)}}]


def _load(sites: list[dict[str, Any]], **spec: Any) -> SiteDataset:
    return load_site_data(make_study(sites, **spec), "clinic", Path("/"))


def _table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(30, 80, n).astype(float),
            "chol": rng.normal(220, 30, n).round(1),
            "cp": rng.choice(["typical", "atypical"], n),  # "asymptomatic" never occurs
            "label": np.tile([0, 1], n // 2),
        }
    )


CATEGORICAL = {"cp": ["typical", "atypical", "asymptomatic"]}


def test_csv_with_header_and_categorical_level_absent_at_the_site(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    _table().to_csv(path, index=False)
    data = _load(_csv_site(path), preprocessing={"categorical": CATEGORICAL})
    assert data.feature_names == ("age", "chol", "cp_typical", "cp_atypical", "cp_asymptomatic")
    assert data.n_train + data.n_test == 40
    assert data.n_test == 10  # ceil(0.25 * 40)
    assert data.X_train.dtype == np.float32
    assert data.y_train.dtype == np.float32
    # the absent level keeps its column: constant at the site, so 0 after centring
    assert np.all(data.X_train[:, 4] == 0)
    assert np.all(data.X_test[:, 4] == 0)
    dropped = _load(
        _csv_site(path), preprocessing={"categorical": CATEGORICAL, "dropFirstLevel": True}
    )
    assert dropped.feature_names == ("age", "chol", "cp_atypical", "cp_asymptomatic")


def test_csv_without_header_with_na_values(tmp_path: Path) -> None:
    table = _table()
    table["cp"] = np.where(table.index % 2 == 0, 1, 2)
    table.loc[[3, 7], "chol"] = np.nan
    path = tmp_path / "site.data"
    text = table.to_csv(index=False, header=False, na_rep="?")
    path.write_text(text)
    pre = {
        "columns": ["age", "chol", "cp", "label"],
        "naValues": ["?"],
        "categorical": {"cp": [1, 2, 3]},
    }
    data = _load(_csv_site(path, header=False), preprocessing=pre)
    assert data.rows_read == 40
    assert data.rows_used == 38
    assert data.n_train + data.n_test == 38
    assert data.feature_names == ("age", "chol", "cp_1", "cp_2", "cp_3")
    # integer levels match the cells "1" and "1.0" alike
    path.write_text(text.replace(",1,", ",1.0,"))
    again = _load(_csv_site(path, header=False), preprocessing=pre)
    assert np.array_equal(again.X_train, data.X_train)


def test_impute_mean_uses_training_means(tmp_path: Path) -> None:
    table = _table()
    table.loc[[0, 1, 2, 3], "chol"] = np.nan
    table.loc[5, "label"] = np.nan  # a row without a label is dropped even when imputing
    path = tmp_path / "site.csv"
    table.to_csv(path, index=False)
    pre = {"missing": "impute-mean", "standardize": False, "categorical": CATEGORICAL}
    data = _load(_csv_site(path), preprocessing=pre)
    assert data.rows_used == 39
    chol_train = data.X_train[:, 1]
    known = table["chol"].dropna().to_numpy()
    imputed = ~np.isin(chol_train.round(1), known.astype(np.float32).round(1))
    assert imputed.sum() >= 1
    observed_mean = chol_train[~imputed].mean()
    assert np.allclose(chol_train[imputed], observed_mean, rtol=1e-5)
    assert not np.isnan(data.X_test).any()


def test_parquet_matches_csv(tmp_path: Path) -> None:
    table = _table()
    table.loc[4, "age"] = np.nan
    csv_path, parquet_path = tmp_path / "site.csv", tmp_path / "site.parquet"
    table.to_csv(csv_path, index=False)
    table.to_parquet(parquet_path)
    pre = {"categorical": CATEGORICAL}
    from_csv = _load(_csv_site(csv_path), preprocessing=pre)
    from_parquet = _load(_parquet_site(parquet_path), preprocessing=pre)
    assert from_parquet.feature_names == from_csv.feature_names
    assert from_parquet.rows_used == 39
    assert np.allclose(from_parquet.X_train, from_csv.X_train)
    assert np.array_equal(from_parquet.y_test, from_csv.y_test)


def test_declared_columns_select_and_order_a_headed_table(tmp_path: Path) -> None:
    table = _table()[["label", "chol", "cp", "age"]]
    table["admin_id"] = range(len(table))
    path = tmp_path / "site.csv"
    table.to_csv(path, index=False)
    pre = {"columns": ["age", "chol", "label"]}
    assert _load(_csv_site(path), preprocessing=pre).feature_names == ("age", "chol")


def test_binarize_label(tmp_path: Path) -> None:
    table = _table()
    table["label"] = np.tile([0, 1, 2, 3], 10)
    path = tmp_path / "site.csv"
    table.drop(columns="cp").to_csv(path, index=False)
    task = {"label": "label", "binarize": {"above": 0}}
    data = _load(_csv_site(path), task=task)
    assert np.mean(np.concatenate([data.y_train, data.y_test])) == 0.75


@pytest.mark.parametrize(
    ("change", "spec", "needle"),
    [
        (lambda t: t.drop(columns="label"), {}, "no label column 'label'"),
        (
            lambda t: t,
            {"preprocessing": {"drop": ["bmi"]}},
            "preprocessing.drop names column 'bmi'",
        ),
        (
            lambda t: t,
            {"preprocessing": {"categorical": {"smoker": ["y", "n"]}}},
            "preprocessing.categorical names column 'smoker'",
        ),
        (
            lambda t: t,
            {"preprocessing": {"categorical": {"cp": ["typical", "other"]}}},
            "column 'cp' holds 'atypical'",
        ),
        (lambda t: t.assign(label=np.tile([0, 1, 2, 3], 10)), {}, "'label' is not binary"),
        (lambda t: t.head(1), {"preprocessing": {"stratify": False}}, "too few rows"),
        (lambda t: t.assign(chol="high"), {}, "column 'chol' holds 'high'"),
        (
            lambda t: t.assign(label=[1] * 3 + [0] * 37),
            {"preprocessing": {"testFraction": 0.05}},
            "leaves no row with label 1 in the test split",
        ),
    ],
)
def test_data_errors_name_the_file_and_the_column(
    tmp_path: Path, change: Any, spec: dict[str, Any], needle: str
) -> None:
    path = tmp_path / "site.csv"
    change(_table()).to_csv(path, index=False)
    spec = copy.deepcopy(spec)
    spec.setdefault("preprocessing", {}).setdefault("categorical", CATEGORICAL)
    with pytest.raises(DataError) as err:
        _load(_csv_site(path), **spec)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=r"absent\.csv: no such file"):
        _load(_csv_site(missing))
    with pytest.raises(DataError, match=r"absent\.parquet: no such file"):
        _load(_parquet_site(tmp_path / "absent.parquet"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        _load(_csv_site(empty))
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read as Parquet"):
        _load(_parquet_site(junk))
    headless = tmp_path / "headless.csv"
    headless.write_text("1,2,0\n3,4,1\n")
    with pytest.raises(DataError, match=r"name its columns in spec\.preprocessing\.columns"):
        _load(_csv_site(headless, header=False))
    with pytest.raises(DataError, match=r"has 3 columns, but preprocessing\.columns names 2"):
        _load(_csv_site(headless, header=False), preprocessing={"columns": ["a", "label"]})
    with pytest.raises(DataError, match="site 'elsewhere' is not in study"):
        load_site_data(make_study(_csv_site(missing)), "elsewhere", tmp_path)


def test_relative_paths_resolve_against_the_base_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _table().drop(columns="cp").to_csv(tmp_path / "data" / "site.csv", index=False)
    study = make_study(_csv_site(Path("data/site.csv")))
    assert load_site_data(study, "clinic", tmp_path).n_train == 30


# --- the built-in breast-cancer dataset -------------------------------------------------------


def test_builtin_breast_cancer_label() -> None:
    table = builtin_table("breast-cancer", "malignant")
    assert table.shape == (569, 31)
    assert int(table["malignant"].sum()) == 212  # 212 malignant, 357 benign
    assert int(builtin_table("breast-cancer", "benign")["benign"].sum()) == 357


@pytest.mark.parametrize(("count", "skew"), [(1, 0.0), (4, 0.0), (4, 0.6), (10, 0.95)])
def test_partition_is_disjoint_complete_and_deterministic(count: int, skew: float) -> None:
    y = builtin_table("breast-cancer", "malignant")["malignant"].to_numpy()
    shares = partition_rows(y, count, skew, seed=3)
    rows = np.concatenate(shares)
    assert len(rows) == 569
    assert len(np.unique(rows)) == 569
    assert all(set(np.unique(y[s])) == {0, 1} for s in shares)  # both classes everywhere
    again = partition_rows(y, count, skew, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))
    if count > 1:
        other = partition_rows(y, count, skew, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(shares, other, strict=True))


def test_label_skew_gives_sites_different_positive_shares() -> None:
    y = builtin_table("breast-cancer", "malignant")["malignant"].to_numpy()
    iid = [y[s].mean() for s in partition_rows(y, 4, 0.0, seed=1)]
    assert max(iid) - min(iid) < 0.01
    sizes = [len(s) for s in partition_rows(y, 4, 0.0, seed=1)]
    assert max(sizes) - min(sizes) <= 1
    skewed = [y[s].mean() for s in partition_rows(y, 4, 0.6, seed=1)]
    assert skewed == sorted(skewed)
    assert skewed[-1] - skewed[0] > 0.4


def test_builtin_sites_load_only_their_share() -> None:
    study = make_study(breast_cancer_sites(4, 0.6), task={"label": "malignant"})
    loaded = [load_site_data(study, f"site-{i}", Path("/")) for i in range(4)]
    assert sum(d.rows_read for d in loaded) == 569
    assert all(d.n_features == 30 for d in loaded)
    positives = [float(np.concatenate([d.y_train, d.y_test]).mean()) for d in loaded]
    assert positives == sorted(positives)
