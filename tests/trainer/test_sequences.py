"""Sequences from long-format tables: padding, masks, windows, early-warning labels, the
patient-level split, and a clear error for each kind of bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fedstudy_trainer.data import DataError, load_site_data
from fedstudy_trainer.sequences import (
    MASK_SUFFIX,
    SequenceDataset,
    build_sequences,
    read_labels_table,
)
from trainer_support import make_study

from fedstudy.spec import Preprocessing, StudyError, Task, check_local_files

NAN = math.nan


def prep(**sequence: Any) -> Preprocessing:
    """Preprocessing of a table with columns pid, t, a, b and label y; no standardising."""
    seq = {"idColumn": "pid", "timeColumn": "t", **sequence}
    return Preprocessing.model_validate(
        {"sequence": seq, "standardize": False, "stratify": False, "testFraction": 0.5}
    )


TASK = Task(label="y")


def example_of(data: SequenceDataset, pid: str, index: int = -1) -> tuple[np.ndarray, float]:
    """The ``index``-th example of patient ``pid`` (whichever split it is in) and its label."""
    for x, y, who in (
        (data.X_train, data.y_train, data.patients_train),
        (data.X_test, data.y_test, data.patients_test),
    ):
        rows = [i for i, p in enumerate(who) if p == pid]
        if rows:
            return x[rows[index]], float(y[rows[index]])
    raise AssertionError(f"no example of {pid}")


def per_patient_table() -> pd.DataFrame:
    # Rows deliberately out of order: the loader sorts each patient's rows by time.
    return pd.DataFrame(
        {
            "pid": ["p1", "p2", "p1", "p3", "p2", "p2", "p4", "p3", "p4", "p4"],
            "t": [2, 0, 1, 5, 1, 2, 0, 6, 1, 2],
            "a": [3.0, 10.0, NAN, 1.0, 11.0, NAN, 4.0, 2.0, 5.0, 6.0],
            "b": [NAN, 0.5, 7.0, NAN, NAN, 0.7, 1.0, 1.0, 1.0, 1.0],
            "y": [1, 0, 1, 1, 0, 0, 0, 1, 0, 0],
        }
    )


def test_per_patient_sequences_are_padded_at_the_start_masked_and_filled_forward() -> None:
    table = per_patient_table()
    data = build_sequences(table, prep(window=4), TASK, "t.csv")
    assert data.input_shape == (4, 4)
    assert data.feature_names == ("a", "b", "a" + MASK_SUFFIX, "b" + MASK_SUFFIX)
    assert data.n_train + data.n_test == 4  # one example per patient
    x, y = example_of(data, "p1")
    assert y == 1.0
    # p1 has 2 steps (t=1: a missing, b=7; t=2: a=3, b missing): 2 padding steps first.
    np.testing.assert_array_equal(x[:2], np.zeros((2, 4)))
    a_mean = float(np.nanmean(_train_values(data, table, "a")))
    np.testing.assert_allclose(x[2], [a_mean, 7.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(x[3], [3.0, 7.0, 1.0, 0.0])  # b carried forward, masked 0
    x, y = example_of(data, "p2")
    assert y == 0.0
    np.testing.assert_allclose(x[1:], [[10, 0.5, 1, 1], [11, 0.5, 1, 0], [11, 0.7, 0, 1]])
    np.testing.assert_array_equal(x[0], np.zeros(4))


def _train_values(data: SequenceDataset, table: pd.DataFrame, column: str) -> np.ndarray:
    return table.loc[table["pid"].isin(set(data.patients_train)), column].to_numpy(float)


def test_a_window_shorter_than_a_stay_keeps_its_last_steps() -> None:
    data = build_sequences(per_patient_table(), prep(window=2), TASK, "t.csv")
    x, _ = example_of(data, "p2")
    np.testing.assert_allclose(x, [[11, 0.5, 1, 0], [11, 0.7, 0, 1]])


def test_without_a_window_every_stay_is_padded_to_the_longest() -> None:
    data = build_sequences(per_patient_table(), prep(), TASK, "t.csv")
    assert data.window == 3
    assert data.input_shape == (3, 4)


def test_rows_in_any_order_give_the_same_sequences() -> None:
    table = per_patient_table()
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    a = build_sequences(table, prep(window=3), TASK, "t.csv")
    b = build_sequences(shuffled, prep(window=3), TASK, "t.csv")
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert a.patients_train == b.patients_train


def test_standardising_uses_the_training_patients_observed_values() -> None:
    pre = Preprocessing.model_validate(
        {"sequence": {"idColumn": "pid", "timeColumn": "t"}, "stratify": False}
    )
    table = per_patient_table()
    data = build_sequences(table, pre, TASK, "t.csv")
    a = _train_values(data, table, "a")
    a = a[~np.isnan(a)]
    x, _ = example_of(data, "p4")
    np.testing.assert_allclose(x[:, 0], (np.array([4.0, 5.0, 6.0]) - a.mean()) / a.std(ddof=1))
    np.testing.assert_array_equal(x[:, 2], [1, 1, 1])  # masks are never scaled


def early_table() -> pd.DataFrame:
    # e1: onset at t=5 (label 1 from then on); e2: never; e3: onset at its first step.
    rows = [("e1", t, float(t), int(t >= 5)) for t in range(8)]
    rows += [("e2", t, 100.0 + t, 0) for t in range(6)]
    rows += [("e3", t, 50.0, 1) for t in range(3)]
    rows += [("e4", t, 20.0, int(t >= 4)) for t in range(6)]
    return pd.DataFrame(rows, columns=["pid", "t", "a", "y"])


def test_early_warning_windows_are_labelled_by_the_onset_within_the_horizon() -> None:
    data = build_sequences(
        early_table(), prep(labels="early-warning", window=3, horizon=2), TASK, "t"
    )
    ends = {"train": data.ends_train, "test": data.ends_test}
    by_patient: dict[str, list[tuple[float, float]]] = {}
    for part, who, y in (
        ("train", data.patients_train, data.y_train),
        ("test", data.patients_test, data.y_test),
    ):
        for pid, end, label in zip(who, ends[part], y, strict=True):
            by_patient.setdefault(pid, []).append((float(end), float(label)))
    # e1: a window ends at t = 0..4 (none from the onset on); t = 3 and 4 are within 2 h of 5.
    assert by_patient["e1"] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]
    assert by_patient["e2"] == [(t, 0) for t in range(6)]
    assert "e3" not in by_patient  # septic from its first step: nothing to warn about
    x, _ = example_of(data, "e1", index=1)  # the window ending at t=1: one padding step
    np.testing.assert_allclose(x, [[0, 0], [0, 1], [1, 1]])


def test_early_warning_stride_takes_every_nth_step() -> None:
    pre = prep(labels="early-warning", window=2, horizon=2, stride=2)
    data = build_sequences(early_table(), pre, TASK, "t")
    ends = np.concatenate([data.ends_train, data.ends_test])
    who = data.patients_train + data.patients_test
    assert sorted(float(e) for e, p in zip(ends, who, strict=True) if p == "e1") == [0, 2, 4]


def test_date_time_columns_order_rows_and_horizons_count_hours() -> None:
    table = early_table()
    start = pd.Timestamp("2026-03-01T22:00:00")
    table["t"] = [(start + pd.Timedelta(hours=int(h))).isoformat() for h in table["t"]]
    data = build_sequences(table, prep(labels="early-warning", window=3, horizon=2), TASK, "t")
    y_e1 = [
        float(y)
        for p, y in zip(
            data.patients_train + data.patients_test,
            np.concatenate([data.y_train, data.y_test]),
            strict=True,
        )
        if p == "e1"
    ]
    assert y_e1 == [0, 0, 0, 1, 1]


def test_a_patients_rows_are_never_split_between_train_and_test() -> None:
    study = sepsis_study(window=6, labels="early-warning", horizon=6)
    for site in ("a", "b"):
        data = load_site_data(study, site, Path("."))
        assert isinstance(data, SequenceDataset)
        train, test = set(data.patients_train), set(data.patients_test)
        assert train
        assert test
        assert not train & test
        assert len(data.patients_train) == data.n_train
        assert len(data.patients_test) == data.n_test
        assert data.input_shape == (6, 18)


def sepsis_study(**sequence: Any) -> Any:
    sites = [
        {
            "name": name,
            "data": {
                "format": "builtin",
                "dataset": "synthetic-sepsis",
                "partition": {"index": i, "count": 2, "seed": 5},
            },
        }
        for i, name in enumerate(("a", "b"))
    ]
    seq = {"idColumn": "patient_id", "timeColumn": "hour", **sequence}
    return make_study(
        sites,
        task={"label": "sepsis"},
        model={"name": "gru", "hiddenSize": 4},
        preprocessing={"sequence": seq},
    )


# --- files ------------------------------------------------------------------------------------


def write_events(folder: Path, table: pd.DataFrame, labels: pd.DataFrame | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "events.csv", index=False)
    if labels is not None:
        labels.to_csv(folder / "labels.csv", index=False)


def file_study(folder: Path, *, with_labels: bool, fmt: str = "csv", **sequence: Any) -> Any:
    data: dict[str, Any] = {"format": fmt, "path": str(folder / f"events.{fmt}")}
    if with_labels:
        data["labels"] = str(folder / f"labels.{fmt}")
    seq = {"idColumn": "pid", "timeColumn": "t", **sequence}
    return make_study(
        [{"name": "s", "data": data}],
        task={"label": "y"},
        model={"name": "lstm", "hiddenSize": 4},
        preprocessing={"sequence": seq, "stratify": False, "testFraction": 0.5},
    )


def test_labels_table_gives_one_label_per_patient(tmp_path: Path) -> None:
    table = per_patient_table().drop(columns=["y"])
    labels = pd.DataFrame({"pid": ["p1", "p2", "p3", "p4"], "y": [1, 0, 1, 0]})
    write_events(tmp_path, table, labels)
    study = file_study(tmp_path, with_labels=True, window=3)
    data = load_site_data(study, "s", tmp_path)
    got = dict(
        zip(
            data.patients_train + data.patients_test,  # type: ignore[attr-defined]
            np.concatenate([data.y_train, data.y_test]).tolist(),
            strict=True,
        )
    )
    assert got == {"p1": 1.0, "p2": 0.0, "p3": 1.0, "p4": 0.0}


def test_parquet_tables_read_like_csv(tmp_path: Path) -> None:
    table = per_patient_table()
    table.to_parquet(tmp_path / "events.parquet")
    study = file_study(tmp_path, with_labels=False, fmt="parquet", window=3)
    from_parquet = load_site_data(study, "s", tmp_path)
    from_frame = build_sequences(table, study.spec.preprocessing, study.spec.task, "x")
    np.testing.assert_array_equal(from_parquet.X_train, from_frame.X_train)


def test_a_missing_labels_table_is_a_study_error(tmp_path: Path) -> None:
    write_events(tmp_path, per_patient_table())
    study = file_study(tmp_path, with_labels=True)
    with pytest.raises(StudyError) as e:
        check_local_files(study, tmp_path)
    assert e.value.problems == [f"spec.sites[0].data.labels: no such file: {tmp_path}/labels.csv"]


# --- bad input --------------------------------------------------------------------------------


def load_error(
    tmp_path: Path, table: pd.DataFrame, labels_table: pd.DataFrame | None = None, **seq: Any
) -> str:
    write_events(tmp_path, table, labels_table)
    study = file_study(tmp_path, with_labels=labels_table is not None, **seq)
    with pytest.raises(DataError) as e:
        load_site_data(study, "s", tmp_path)
    return str(e.value)


def test_a_label_for_a_patient_without_rows_names_the_patient(tmp_path: Path) -> None:
    labels = pd.DataFrame({"pid": ["p1", "p2", "p3", "p4", "p9"], "y": [1, 0, 1, 0, 1]})
    message = load_error(tmp_path, per_patient_table().drop(columns=["y"]), labels)
    assert message == (
        f"{tmp_path}/labels.csv: patient 'p9' has a label but no rows in "
        f"{tmp_path}/events.csv; every labelled patient needs time steps"
    )


def test_a_patient_with_rows_but_no_label_is_named(tmp_path: Path) -> None:
    labels = pd.DataFrame({"pid": ["p1", "p2"], "y": [1, 0]})
    message = load_error(tmp_path, per_patient_table().drop(columns=["y"]), labels)
    assert "patient 'p3' (and 1 more) has rows but no label in" in message


def test_a_patient_listed_twice_in_the_labels_table(tmp_path: Path) -> None:
    labels = pd.DataFrame({"pid": ["p1", "p2", "p3", "p4", "p2"], "y": [1, 0, 1, 0, 0]})
    message = load_error(tmp_path, per_patient_table().drop(columns=["y"]), labels)
    assert "patient 'p2' is listed twice (data row 5)" in message


def test_a_time_that_cannot_be_sorted_names_the_column_value_and_row(tmp_path: Path) -> None:
    table = per_patient_table().astype({"t": object})
    table.loc[3, "t"] = "soon"
    message = load_error(tmp_path, table)
    assert message == (
        f"{tmp_path}/events.csv: column 't' (preprocessing.sequence.timeColumn) holds 'soon' "
        "(data row 4), which is neither a number nor an ISO 8601 date-time, so the rows "
        "cannot be put in time order"
    )


def test_numbers_mixed_with_date_times_cannot_be_sorted(tmp_path: Path) -> None:
    table = per_patient_table().astype({"t": object})
    table["t"] = [f"2026-01-0{i + 1}T00:00:00" for i in range(len(table))]
    table.loc[0, "t"] = "7"
    assert "holds '7' (data row 1), which is neither a number nor" in load_error(tmp_path, table)


def test_a_missing_time_is_an_error(tmp_path: Path) -> None:
    table = per_patient_table().astype({"t": float})
    table.loc[2, "t"] = NAN
    assert "data row 3 has no time in column 't'" in load_error(tmp_path, table)


def test_two_rows_of_a_patient_at_one_time(tmp_path: Path) -> None:
    table = per_patient_table()
    table.loc[5, "t"] = 1  # p2 at t=1 twice (data rows 5 and 6)
    message = load_error(tmp_path, table)
    assert "patient 'p2' has two rows at the same time 1 in column 't' (data rows 5 and 6)" in (
        message
    )


def test_a_missing_label_column_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, per_patient_table().drop(columns=["y"]))
    assert message == (
        f"{tmp_path}/events.csv: no column 'y' (task.label); the table has: pid, t, a, b"
    )


def test_a_missing_id_column_is_named(tmp_path: Path) -> None:
    message = load_error(tmp_path, per_patient_table().rename(columns={"pid": "patient"}))
    assert "no column 'pid' (preprocessing.sequence.idColumn)" in message


def test_a_per_patient_label_that_changes_over_time(tmp_path: Path) -> None:
    table = per_patient_table()
    table.loc[0, "y"] = 0  # p1: 0 at t=2, 1 at t=1
    message = load_error(tmp_path, table)
    assert "patient 'p1' has label values 0 and 1 in column 'y'" in message
    assert "labels: early-warning" in message


def test_a_measurement_that_is_not_a_number(tmp_path: Path) -> None:
    table = per_patient_table().astype({"a": object})
    table.loc[4, "a"] = "high"
    assert "column 'a' holds 'high' (data row 5), which is not a number" in load_error(
        tmp_path, table
    )


def test_early_warning_needs_a_label_at_every_step(tmp_path: Path) -> None:
    table = early_table().astype({"y": float})
    table.loc[3, "y"] = NAN
    message = load_error(tmp_path, table, labels="early-warning", window=2, horizon=1)
    assert "data row 4 has no value in the label column 'y'" in message


def test_a_patient_without_an_id(tmp_path: Path) -> None:
    table = per_patient_table().astype({"pid": object})
    table.loc[6, "pid"] = None
    assert "data row 7 has no patient id in column 'pid'" in load_error(tmp_path, table)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_labels_table_is_read_without_the_long_tables_declared_columns(
    tmp_path: Path, fmt: str
) -> None:
    labels = pd.DataFrame({"pid": ["p1", "p2"], "y": ["0", "1"]})
    path = tmp_path / f"labels.{fmt}"
    if fmt == "csv":
        labels.to_csv(path, index=False)
    else:
        labels.to_parquet(path)
    # preprocessing.columns names the long table's columns, which the labels table lacks
    pre = prep().model_copy(update={"columns": ["pid", "t", "hr", "y"], "naValues": ["?"]})
    table = read_labels_table(path, fmt, pre)
    assert list(table.columns) == ["pid", "y"]
    assert table["y"].astype(str).tolist() == ["0", "1"]


def test_an_unreadable_labels_table_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"labels\.csv: no such file"):
        read_labels_table(tmp_path / "labels.csv", "csv", prep())
