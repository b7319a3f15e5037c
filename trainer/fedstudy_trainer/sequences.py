"""Sequences from a long-format table: one row per patient and time step (docs/ehr.md).

The table has a patient column (``preprocessing.sequence.idColumn``), a time column
(``timeColumn``: numbers, or ISO 8601 date-times), numeric measurement columns and the label
column (``task.label``). Each patient's rows, in time order, are the patient's time steps:
a table sampled on a regular grid (hourly, say) gives steps of equal length.

1. Read the table (CSV, Parquet, or a share of a built-in sequence dataset), and with
   per-patient labels from a labels table (``sites[].data.labels``), that table too.
2. Check every patient, time and label: a missing patient id or time, a time that is neither
   a number nor a date-time, two rows of one patient at the same time, a label for a patient
   with no rows (or rows without a label), a patient whose label changes between rows (for
   per-patient labels): each is a ``DataError`` naming the file, the column and the value.
3. Split patients (never rows) into train and test, stratified on the patient's label (for
   early warning: whether the patient ever has the event), as ``data._split`` splits rows.
4. Per site, from the training patients' observed cells: each measurement's mean and
   standard deviation. Every cell gets a mask channel (1 observed, 0 missing); a missing value
   takes the patient's last observed value (the training mean before the first one); then
   values are standardised (``preprocessing.standardize``).
5. Examples of shape (window, 2 * measurements): the values, then the masks. A patient with
   fewer steps than the window is padded at the start with zeros (values and masks), so the
   last step of every example is a real one. Per-patient labels: one example per patient, its
   last ``window`` steps (without ``window``, the site's longest stay). Early warning: one
   example per step before the onset (every ``stride`` steps), the ``window`` steps up to it,
   labelled 1 when the onset comes within ``horizon`` time units after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from fedstudy.spec import (
    Partition,
    Preprocessing,
    SequencePreprocessing,
    Site,
    StudySpec,
    Task,
    resolve_patient_labels_path,
)
from fedstudy_trainer.data import (
    DataError,
    SiteDataset,
    _binary_label,
    _names,
    _numeric,
    _split,
    read_csv,
    read_parquet,
    read_site_table,
)

FloatArray = npt.NDArray[np.float32]
MASK_SUFFIX = ":observed"
_HOUR_NS = 3600e9


@dataclass(frozen=True)
class SequenceDataset(SiteDataset):
    """A site's sequences: ``X_*`` of shape (examples, window, channels), where the channels
    are the measurements' values then their masks (``feature_names`` says which is which).

    ``patients_*`` holds the patient of each example; ``ends_*`` the time of the example's
    last step (hours since the epoch for date-times)."""

    measurements: tuple[str, ...] = ()
    patients_train: tuple[str, ...] = ()
    patients_test: tuple[str, ...] = ()
    ends_train: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    ends_test: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    window: int = 0


# --- reading --------------------------------------------------------------------------------


def load_sequence_site(spec: StudySpec, site: Site, base_dir: Path) -> SequenceDataset:
    """Reads and preprocesses one site's long-format table into sequences."""
    seq = spec.preprocessing.sequence
    if seq is None:
        raise ValueError("the study has no preprocessing.sequence")
    data = site.data
    if data.format == "builtin":
        from fedstudy_trainer.synthetic import SEPSIS_DATASET, sepsis_share

        if data.dataset != SEPSIS_DATASET:
            raise DataError(f"builtin:{data.dataset}: not a sequence dataset")
        partition = data.partition or Partition(index=0, count=1)
        table = sepsis_share(partition)
        source = (
            f"builtin:{data.dataset} (share {partition.index} of {partition.count}, "
            f"seed {partition.seed})"
        )
    else:
        table, source = read_site_table(spec, site, base_dir)
    labels: pd.DataFrame | None = None
    labels_source = ""
    labels_path = resolve_patient_labels_path(site, base_dir)
    if labels_path is not None:
        labels = read_labels_table(labels_path, data.format, spec.preprocessing)
        labels_source = str(labels_path)
    return build_sequences(
        table,
        spec.preprocessing,
        spec.task,
        source,
        labels=labels,
        labels_source=labels_source,
    )


def read_labels_table(path: Path, fmt: str, pre: Preprocessing) -> pd.DataFrame:
    """A per-patient labels table (CSV with a header row, or Parquet), read like a site's
    table but without ``preprocessing.columns``, which names the long table's columns."""
    own = pre.model_copy(update={"columns": None})
    if fmt == "parquet":
        return read_parquet(path, pre=own)
    return read_csv(path, header=True, pre=own)


# --- parsing --------------------------------------------------------------------------------


def _require(table: pd.DataFrame, column: str, what: str, source: str) -> None:
    have = [str(c) for c in table.columns]
    if column not in have:
        raise DataError(f"{source}: no column {column!r} ({what}); the table has: {_names(have)}")


def _patient_ids(column: pd.Series, name: str, source: str) -> npt.NDArray[np.str_]:
    present = column.notna().to_numpy()
    text = column.astype(object).map(lambda v: str(v).strip()).to_numpy()
    empty = ~present | (text == "")
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"{source}: data row {row + 1} has no patient id in column {name!r} "
            "(preprocessing.sequence.idColumn)"
        )
    return np.asarray(text, dtype=np.str_)


def parse_times(column: pd.Series, name: str, source: str) -> tuple[npt.NDArray[np.float64], str]:
    """A time column as numbers: the numbers themselves, or hours since the epoch for ISO
    8601 date-times. Returns (times, unit); a missing or unreadable time is a DataError."""
    missing = column.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{source}: data row {row + 1} has no time in column {name!r} "
            "(preprocessing.sequence.timeColumn); every row needs one to be put in order"
        )
    numbers = pd.to_numeric(column, errors="coerce")
    not_numbers = numbers.isna().to_numpy()
    if not_numbers.any() and not_numbers.mean() <= 0.5:
        # Mostly numbers: the cells that are not are the ones to name.
        _unsortable(column, name, source, int(np.flatnonzero(not_numbers)[0]))
    if not not_numbers.any():
        values = np.asarray(numbers, dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{source}: column {name!r} holds {column.iloc[row]!r} (data row {row + 1}), "
                "which is not a time that can be put in order"
            )
        return values, "time units"
    if column.dtype.kind == "M":
        stamps = pd.to_datetime(column)
    else:
        stamps = pd.to_datetime(column.astype(str), format="ISO8601", errors="coerce", utc=True)
    bad = stamps.isna().to_numpy()
    if bad.any():
        _unsortable(column, name, source, int(np.flatnonzero(bad)[0]))
    if getattr(stamps.dt, "tz", None) is not None:
        stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64).astype(np.float64)
    return ns / _HOUR_NS, "hours"


def _unsortable(column: pd.Series, name: str, source: str, row: int) -> None:
    raise DataError(
        f"{source}: column {name!r} (preprocessing.sequence.timeColumn) holds "
        f"{column.iloc[row]!r} (data row {row + 1}), which is neither a number nor an "
        "ISO 8601 date-time, so the rows cannot be put in time order"
    )


@dataclass(frozen=True)
class _Patients:
    """The table's rows grouped by patient, in time order."""

    ids: list[str]  # sorted
    starts: npt.NDArray[np.int64]  # first row of each patient in the sorted order
    order: npt.NDArray[np.int64]  # table rows in (patient, time) order
    times: npt.NDArray[np.float64]  # in the sorted order

    def rows(self, i: int) -> slice:
        end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.order)
        return slice(int(self.starts[i]), int(end))


def _group(
    ids: npt.NDArray[np.str_], times: npt.NDArray[np.float64], column: str, source: str
) -> _Patients:
    order = np.lexsort((times, ids)).astype(np.int64)
    sorted_ids = ids[order]
    sorted_times = times[order]
    same = (sorted_ids[1:] == sorted_ids[:-1]) & (sorted_times[1:] == sorted_times[:-1])
    if same.any():
        k = int(np.flatnonzero(same)[0])
        rows = sorted((int(order[k]) + 1, int(order[k + 1]) + 1))
        raise DataError(
            f"{source}: patient {str(sorted_ids[k])!r} has two rows at the same time "
            f"{sorted_times[k]:g} in column {column!r} (data rows {rows[0]} and {rows[1]}); "
            "a long-format table has one row per patient and time step"
        )
    firsts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]).astype(np.int64)
    return _Patients([str(sorted_ids[i]) for i in firsts], firsts, order, sorted_times)


def _patient_label_from_column(
    labels: npt.NDArray[np.float64], patients: _Patients, name: str, source: str
) -> npt.NDArray[np.float64]:
    """One label per patient from a column that must hold the same value in all of a
    patient's rows (missing cells allowed)."""
    out = np.empty(len(patients.ids))
    sorted_labels = labels[patients.order]
    for i, pid in enumerate(patients.ids):
        values = sorted_labels[patients.rows(i)]
        seen = np.unique(values[~np.isnan(values)])
        if len(seen) == 0:
            raise DataError(
                f"{source}: patient {pid!r} has no value in the label column {name!r}; "
                "per-patient labels need one per patient"
            )
        if len(seen) > 1:
            shown = " and ".join(f"{v:g}" for v in seen[:2])
            raise DataError(
                f"{source}: patient {pid!r} has label values {shown} in column {name!r}; "
                "per-patient labels take one value per patient (for a label that changes "
                "over time use preprocessing.sequence.labels: early-warning)"
            )
        out[i] = seen[0]
    return out


def _patient_label_from_table(
    labels: pd.DataFrame,
    patients: _Patients,
    id_column: str,
    task: Task,
    source: str,
    labels_source: str,
) -> npt.NDArray[np.float64]:
    _require(labels, id_column, "preprocessing.sequence.idColumn", labels_source)
    _require(labels, task.label, "task.label", labels_source)
    ids = _patient_ids(labels[id_column], id_column, labels_source)
    values = _numeric(labels[task.label], task.label, labels_source, "label column")
    missing = np.isnan(values)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{labels_source}: patient {str(ids[row])!r} (data row {row + 1}) has no label in "
            f"column {task.label!r}"
        )
    values = _binary_label(values, task, labels_source)
    by_id: dict[str, float] = {}
    for row, (pid, value) in enumerate(zip(ids.tolist(), values.tolist(), strict=True)):
        if pid in by_id:
            raise DataError(
                f"{labels_source}: patient {pid!r} is listed twice (data row {row + 1}); a "
                "labels table has one row per patient"
            )
        by_id[pid] = float(value)
    known = set(patients.ids)
    orphans = [pid for pid in by_id if pid not in known]
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise DataError(
            f"{labels_source}: patient {orphans[0]!r}{more} has a label but no rows in "
            f"{source}; every labelled patient needs time steps"
        )
    unlabelled = [pid for pid in patients.ids if pid not in by_id]
    if unlabelled:
        more = f" (and {len(unlabelled) - 1} more)" if len(unlabelled) > 1 else ""
        raise DataError(
            f"{source}: patient {unlabelled[0]!r}{more} has rows but no label in {labels_source}"
        )
    return np.array([by_id[pid] for pid in patients.ids])


# --- building ---------------------------------------------------------------------------------


def build_sequences(
    table: pd.DataFrame,
    pre: Preprocessing,
    task: Task,
    source: str,
    *,
    labels: pd.DataFrame | None = None,
    labels_source: str = "",
) -> SequenceDataset:
    """Turns a site's long-format table into standardised, masked sequences."""
    seq = pre.sequence
    if seq is None:
        raise ValueError("preprocessing.sequence is not set")
    table = table.copy()
    table.columns = pd.Index([str(c) for c in table.columns])
    _require(table, seq.idColumn, "preprocessing.sequence.idColumn", source)
    _require(table, seq.timeColumn, "preprocessing.sequence.timeColumn", source)
    label_in_table = labels is None
    if label_in_table:
        _require(table, task.label, "task.label", source)
    for name in pre.drop:
        _require(table, name, "preprocessing.drop", source)
    if len(table) == 0:
        raise DataError(f"{source}: the table has no rows")
    skip = {seq.idColumn, seq.timeColumn, task.label, *pre.drop}
    measurements = [c for c in table.columns if c not in skip]
    if not measurements:
        raise DataError(
            f"{source}: no measurement columns besides {seq.idColumn!r}, {seq.timeColumn!r} "
            f"and the label {task.label!r}"
        )

    ids = _patient_ids(table[seq.idColumn], seq.idColumn, source)
    times, unit = parse_times(table[seq.timeColumn], seq.timeColumn, source)
    patients = _group(ids, times, seq.timeColumn, source)
    values = np.stack([_numeric(table[c], c, source, "column") for c in measurements], axis=1)[
        patients.order
    ]

    notes: list[str] = []
    step_labels: npt.NDArray[np.float64] | None = None
    if labels is not None:
        y_patient = _patient_label_from_table(
            labels, patients, seq.idColumn, task, source, labels_source
        )
    else:
        raw = _numeric(table[task.label], task.label, source, "label column")
        if seq.labels == "early-warning":
            missing = np.isnan(raw)
            if missing.any():
                row = int(np.flatnonzero(missing)[0])
                raise DataError(
                    f"{source}: data row {row + 1} has no value in the label column "
                    f"{task.label!r}; early-warning labels need one at every time step"
                )
            step_labels = _binary_label(raw, task, source)[patients.order]
            y_patient = np.array(
                [float(step_labels[patients.rows(i)].max()) for i in range(len(patients.ids))]
            )
        else:
            y_patient = _patient_label_from_column(raw, patients, task.label, source)
            y_patient = _binary_label(y_patient, task, source)

    train, test = _split(y_patient, pre, f"{source} (patients)", notes)
    observed = np.concatenate([values[patients.rows(int(i))] for i in train])
    with np.errstate(all="ignore"):
        means = np.nanmean(observed, axis=0)
    empty = np.flatnonzero(np.isnan(means))
    if len(empty):
        raise DataError(
            f"{source}: column {measurements[int(empty[0])]!r} has no value in the training "
            "patients' rows to fill the missing ones from"
        )
    centre, scale = np.zeros(len(measurements)), np.ones(len(measurements))
    if pre.standardize:
        with np.errstate(all="ignore"):
            stds = np.nanstd(observed, axis=0, ddof=1)
        centre, scale = means, np.where(np.isfinite(stds) & (stds > 0), stds, 1.0)

    channels = 2 * len(measurements)
    # Each patient's last observed value carried forward, never across patients.
    owner = np.repeat(np.arange(len(patients.ids)), np.diff(np.r_[patients.starts, len(values)]))
    filled = pd.DataFrame(values).groupby(owner).ffill().to_numpy(dtype=np.float64)
    filled = np.where(np.isnan(filled), means, filled)
    steps = np.concatenate([(filled - centre) / scale, ~np.isnan(values)], axis=1)
    steps = steps.astype(np.float32)

    lengths = np.diff(np.r_[patients.starts, len(values)])
    window = seq.window if seq.window is not None else int(lengths.max())
    split_of = np.full(len(patients.ids), -1)
    split_of[train] = 0
    split_of[test] = 1
    xs: list[list[npt.NDArray[np.float32]]] = [[], []]
    ys: list[list[npt.NDArray[np.float32]]] = [[], []]
    who: list[list[str]] = [[], []]
    ends: list[list[npt.NDArray[np.float64]]] = [[], []]
    for i, pid in enumerate(patients.ids):
        part = int(split_of[i])
        t = patients.times[patients.rows(i)]
        padded = np.concatenate(
            [np.zeros((window - 1, channels), np.float32), steps[patients.rows(i)]]
        )
        views = sliding_window_view(padded, (window, channels))[:, 0]  # one per last step
        if step_labels is None:
            chosen = np.array([len(t) - 1])
            y = np.array([y_patient[i]], dtype=np.float32)
        else:
            chosen, y = _early_warning(step_labels[patients.rows(i)], t, seq)
        if len(chosen) == 0:
            continue
        xs[part].append(np.ascontiguousarray(views[chosen]))
        ys[part].append(y)
        who[part].extend([pid] * len(chosen))
        ends[part].append(t[chosen])

    def stack(part: int) -> tuple[FloatArray, FloatArray, npt.NDArray[np.float64]]:
        if not xs[part]:
            what = "training" if part == 0 else "test"
            raise DataError(
                f"{source}: no example in the {what} split: every {what} patient's event "
                "comes at their first time step, before any window can end"
            )
        return (
            np.concatenate(xs[part]).astype(np.float32),
            np.concatenate(ys[part]).astype(np.float32),
            np.concatenate(ends[part]),
        )

    x_train, y_train, e_train = stack(0)
    x_test, y_test, e_test = stack(1)
    for name, y in (("training", y_train), ("test", y_test)):
        if len(np.unique(y)) < 2:
            notes.append(f"the {name} split holds examples of one class only ({int(y[0])})")
    if seq.labels == "early-warning":
        notes.append(
            f"early warning: {len(y_train) + len(y_test)} windows of {window} steps, "
            f"{int(y_train.sum() + y_test.sum())} positive (onset within {seq.horizon:g} "
            f"{unit})"
        )
    names = (*measurements, *(m + MASK_SUFFIX for m in measurements))
    return SequenceDataset(
        source=source,
        feature_names=names,
        X_train=x_train,
        y_train=y_train,
        X_test=x_test,
        y_test=y_test,
        rows_read=len(table),
        rows_used=len(table),
        notes=tuple(notes),
        measurements=tuple(measurements),
        patients_train=tuple(who[0]),
        patients_test=tuple(who[1]),
        ends_train=e_train,
        ends_test=e_test,
        window=window,
    )


def _early_warning(
    labels: npt.NDArray[np.float64], times: npt.NDArray[np.float64], seq: SequencePreprocessing
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """The steps that end an example (every ``stride`` steps before the onset) and their
    labels (1 when the onset comes within ``horizon`` after the step)."""
    assert seq.horizon is not None
    onsets = np.flatnonzero(labels > 0.5)
    onset = times[onsets[0]] if len(onsets) else np.inf
    candidates = np.arange(0, len(times), seq.step_stride, dtype=np.int64)
    chosen = candidates[times[candidates] < onset]
    y = (onset - times[chosen] <= seq.horizon).astype(np.float32)
    return chosen, y
