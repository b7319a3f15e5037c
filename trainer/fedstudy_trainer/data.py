"""A site's own data: read its table, turn it into features, split it into train and test.

Only the trainer's own site is ever read. The pipeline is the same at every site, so the
feature columns line up across sites without any site seeing another's data:

1. read the table (CSV, Parquet, or a share of a built-in dataset);
2. drop the ``drop`` columns, parse the label and every feature column (``naValues`` and
   empty cells are missing);
3. ``missing: drop-rows`` drops every row with a missing value; ``impute-mean`` drops only
   rows without a label and fills features later with the training means;
4. binarize the label (``value > above``) and check it is 0/1;
5. split train/test with scikit-learn's ``train_test_split`` on the remaining rows
   (this reproduces the FLamby heart-disease splits exactly); as in FLamby, a site with
   fewer than 3 rows of a class is split without stratifying, and its notes say so;
6. one-hot encode the declared categorical columns with the declared levels (a level the
   site never saw still gets its column); numeric columns come first, in table order, then
   the one-hot columns, in declared order (as ``pandas.get_dummies`` would);
7. impute (a missing categorical cell leaves its one-hot columns missing, so they get the
   training frequencies), then standardise every feature, one-hot columns included, with
   the site's own training mean and standard deviation (sample std, ddof=1, as FLamby; a
   constant column is only centred). Standardising the one-hot columns too is what matches
   FLamby's published FedAvg accuracy on heart disease (0.683 over 10 seeds against 0.685;
   numeric columns only would give 0.711).

Every problem is a ``DataError`` whose message names the file (or dataset) and the column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.model_selection import train_test_split

from fedstudy.spec import (
    FederatedStudy,
    Partition,
    Preprocessing,
    Site,
    StudySpec,
    Task,
    resolve_data_path,
)
from fedstudy_trainer.features import (
    FeatureTransform,
    fit_transform,
    level_codes,
    numeric_cells,
    standard_scale,
)

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]


class DataError(ValueError):
    """A site's data that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SiteDataset:
    """A site's preprocessed data, ready for training: float32 features, 0/1 labels."""

    source: str
    feature_names: tuple[str, ...]
    X_train: FloatArray
    y_train: FloatArray
    X_test: FloatArray
    y_test: FloatArray
    rows_read: int
    rows_used: int
    # Things the trainer should log, e.g. a split that could not be stratified.
    notes: tuple[str, ...] = ()
    # A table's preprocessing as fitted on the training rows: it scores new rows.
    transform: FeatureTransform | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(features,)`` for a table; more axes for sequences or
        images."""
        return tuple(int(d) for d in self.X_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])


def load_site_data(study: FederatedStudy, site_name: str, base_dir: Path) -> SiteDataset:
    """Reads and preprocesses the data of one site (and only that site)."""
    spec = study.spec
    try:
        site = spec.site(site_name)
    except KeyError:
        names = ", ".join(s.name for s in spec.sites)
        raise DataError(
            f"site {site_name!r} is not in study {study.name} (sites: {names})"
        ) from None
    if site.data.is_image:
        from fedstudy_trainer.imaging import load_image_site

        return load_image_site(spec, site, base_dir)
    if spec.preprocessing.sequence is not None:
        from fedstudy_trainer.sequences import load_sequence_site

        return load_sequence_site(spec, site, base_dir)
    table, source = read_site_table(spec, site, base_dir)
    return preprocess(table, spec.preprocessing, spec.task, source)


def read_site_table(spec: StudySpec, site: Site, base_dir: Path) -> tuple[pd.DataFrame, str]:
    """The site's raw table and a name for it in messages (the file path or dataset share)."""
    data = site.data
    if data.format == "builtin":
        assert data.dataset is not None
        partition = data.partition or Partition(index=0, count=1)
        source = (
            f"builtin:{data.dataset} (share {partition.index} of {partition.count}, "
            f"seed {partition.seed})"
        )
        return builtin_share(data.dataset, spec.task.label, partition), source
    path = resolve_data_path(site, base_dir)
    assert path is not None
    if data.format == "csv":
        table = read_csv(path, header=data.header, pre=spec.preprocessing)
    else:
        table = read_parquet(path, pre=spec.preprocessing)
    return table, str(path)


# --- reading tables -----------------------------------------------------------------------


def _declared_columns(
    table: pd.DataFrame, columns: Sequence[str] | None, source: str
) -> pd.DataFrame:
    """With ``preprocessing.columns`` declared, keep exactly those columns, in that order."""
    if columns is None:
        return table
    have = [str(c) for c in table.columns]
    absent = [c for c in columns if c not in have]
    if absent:
        raise DataError(
            f"{source}: the table has no column {absent[0]!r} declared in "
            f"preprocessing.columns (the table has: {_names(have)})"
        )
    return table[list(columns)]


def read_csv(path: Path, *, header: bool, pre: Preprocessing) -> pd.DataFrame:
    """Reads a CSV file as text cells (parsed later, column by column, with clear errors)."""
    source = str(path)
    if not header and pre.columns is None:
        raise DataError(
            f"{source}: the file has no header row (header: false); name its "
            "columns in spec.preprocessing.columns"
        )
    try:
        table = pd.read_csv(
            path,
            header=0 if header else None,
            dtype=str,
            na_values=pre.naValues,
            keep_default_na=True,
            skipinitialspace=True,
        )
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a folder, not a CSV file") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{source}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{source}: cannot read as CSV: {_first_line(e)}") from None
    if header:
        table.columns = pd.Index([str(c).strip() for c in table.columns])
        return _declared_columns(table, pre.columns, source)
    assert pre.columns is not None
    if table.shape[1] != len(pre.columns):
        raise DataError(
            f"{source}: the file has {table.shape[1]} columns, but "
            f"preprocessing.columns names {len(pre.columns)}"
        )
    table.columns = pd.Index(pre.columns)
    return table


def read_parquet(path: Path, *, pre: Preprocessing) -> pd.DataFrame:
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: no such file")
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{source}: cannot read as Parquet: {_first_line(e)}") from None
    table.columns = pd.Index([str(c) for c in table.columns])
    if pre.naValues:
        table = table.replace(list(pre.naValues), np.nan)
    return _declared_columns(table, pre.columns, source)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --- built-in datasets --------------------------------------------------------------------


def builtin_table(dataset: str, label: str) -> pd.DataFrame:
    """A whole built-in dataset as a table whose label column is named ``label``.

    ``breast-cancer`` is scikit-learn's Wisconsin diagnostic data (569 patients, 30 features).
    Its label is 1 for a malignant tumour, unless the study names the label ``benign``.
    """
    if dataset != "breast-cancer":
        raise DataError(f"builtin:{dataset}: unknown built-in dataset")
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    table = pd.DataFrame(
        np.asarray(bunch.data, dtype=np.float64), columns=[str(n) for n in bunch.feature_names]
    )
    benign = np.asarray(bunch.target, dtype=np.int64)  # scikit-learn: 0 malignant, 1 benign
    if label in table.columns:
        raise DataError(f"builtin:{dataset}: the label name {label!r} is also a feature name")
    table[label] = benign if label == "benign" else 1 - benign
    return table


def builtin_share(dataset: str, label: str, partition: Partition) -> pd.DataFrame:
    """This site's share of a built-in dataset (rows in their original order)."""
    table = builtin_table(dataset, label)
    y = table[label].to_numpy()
    source = f"builtin:{dataset}"
    shares = partition_rows(y, partition.count, partition.labelSkew, partition.seed, source)
    return table.iloc[shares[partition.index]].reset_index(drop=True)


def partition_rows(
    y: npt.NDArray[np.generic], count: int, label_skew: float, seed: int, source: str = "partition"
) -> list[IndexArray]:
    """Splits the rows of a 0/1-labelled table into ``count`` disjoint shares covering all rows.

    Every site computes the same shares from ``seed``. Positives and negatives are shuffled
    separately and dealt out in proportion to per-site weights: site ``i`` of ``count`` sits
    at ``t`` from -1 to 1 and weighs ``1 + s*t`` for positives and ``1 - s*t`` for negatives
    (``s`` = ``label_skew``). So ``s = 0`` gives equal, stratified shares, and a larger ``s``
    moves positives from the first sites to the last ones. Every site keeps at least one row
    of each class.
    """
    labels = np.asarray(y)
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    if len(positives) + len(negatives) != len(labels):
        raise DataError(f"{source}: a partition needs 0/1 labels")
    rng = np.random.default_rng(seed)
    positives = rng.permutation(positives)
    negatives = rng.permutation(negatives)
    t = np.linspace(-1.0, 1.0, count) if count > 1 else np.zeros(1)
    n_pos = _allocate(len(positives), 1.0 + label_skew * t, source, "positive")
    n_neg = _allocate(len(negatives), 1.0 - label_skew * t, source, "negative")
    pos_ends = np.cumsum(n_pos)
    neg_ends = np.cumsum(n_neg)
    shares = []
    for i in range(count):
        rows = np.concatenate(
            [
                positives[pos_ends[i] - n_pos[i] : pos_ends[i]],
                negatives[neg_ends[i] - n_neg[i] : neg_ends[i]],
            ]
        )
        shares.append(np.sort(rows).astype(np.int64))
    return shares


def _allocate(total: int, weights: npt.NDArray[np.float64], source: str, what: str) -> IndexArray:
    """Whole numbers in proportion to ``weights`` summing to ``total``, each at least 1."""
    count = len(weights)
    if total < count:
        raise DataError(f"{source}: {total} {what} rows cannot give each of {count} sites one")
    quota = total * weights / weights.sum()
    counts: IndexArray = np.floor(quota).astype(np.int64)
    # Largest remainders first; ties go to the lower index (stable sort), deterministic.
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    while (counts == 0).any():
        counts[int(np.argmax(counts))] -= 1
        counts[int(np.argmin(counts))] += 1
    return counts


# --- preprocessing ------------------------------------------------------------------------


_NOT_A_NUMBER_HINT = (
    "; list the column under preprocessing.categorical, or the value in preprocessing.naValues "
    "if it means missing"
)


def _numeric(column: pd.Series, name: str, source: str, what: str) -> npt.NDArray[np.float64]:
    """A column as float64, NaN where missing; a value that is not a number is an error."""
    return numeric_cells(column, name, source, what=what, hint=_NOT_A_NUMBER_HINT, error=DataError)


def _level_codes(
    column: pd.Series, name: str, levels: Sequence[int | str], source: str
) -> npt.NDArray[np.float64]:
    """The index of each cell's level (NaN where missing); an undeclared level is an error."""
    return level_codes(
        column, name, levels, source, hint=" (preprocessing.categorical)", error=DataError
    )


def _check_columns(table: pd.DataFrame, pre: Preprocessing, task: Task, source: str) -> None:
    have = [str(c) for c in table.columns]
    label = task.label
    if label not in have:
        raise DataError(
            f"{source}: no label column {label!r} (task.label); the table has: {_names(have)}"
        )
    for name in pre.drop:
        if name not in have:
            raise DataError(
                f"{source}: preprocessing.drop names column {name!r}, which the "
                f"table does not have (it has: {_names(have)})"
            )
        if name == label:
            raise DataError(f"{source}: preprocessing.drop names the label column {name!r}")
    for name in pre.categorical:
        if name not in have:
            raise DataError(
                f"{source}: preprocessing.categorical names column {name!r}, "
                f"which the table does not have (it has: {_names(have)})"
            )
        if name == label:
            raise DataError(
                f"{source}: the label column {name!r} cannot be categorical; use "
                "task.binarize for a numeric label"
            )
        if name in pre.drop:
            raise DataError(f"{source}: column {name!r} is both dropped and categorical")


def _binary_label(
    values: npt.NDArray[np.float64], task: Task, source: str
) -> npt.NDArray[np.float64]:
    if task.binarize is not None:
        return (values > task.binarize.above).astype(np.float64)
    seen = np.unique(values)
    if not np.isin(seen, [0.0, 1.0]).all():
        shown = ", ".join(f"{v:g}" for v in seen[:10]) + (", ..." if len(seen) > 10 else "")
        raise DataError(
            f"{source}: label column {task.label!r} is not binary (values: "
            f"{shown}); declare task.binarize, e.g. binarize: {{above: 0}}"
        )
    return values


# FLamby stratifies a hospital's split only when each class has more than two rows (Zurich
# has a single negative); so do we, and say so in the dataset's notes.
MIN_ROWS_PER_CLASS_TO_STRATIFY = 3


def _split(
    y: npt.NDArray[np.float64], pre: Preprocessing, source: str, notes: list[str]
) -> tuple[IndexArray, IndexArray]:
    n = len(y)
    n_test = math.ceil(pre.testFraction * n)
    if n_test < 1 or n - n_test < 1:
        raise DataError(
            f"{source}: too few rows for a train/test split: {n} usable rows "
            f"(after missing values) with testFraction {pre.testFraction} leave "
            f"{n - n_test} for training and {n_test} for testing"
        )
    counts = [int((y == c).sum()) for c in (0.0, 1.0)]
    stratify = pre.stratify and min(counts) >= MIN_ROWS_PER_CLASS_TO_STRATIFY
    if pre.stratify and not stratify:
        notes.append(
            f"split not stratified: only {min(counts)} usable row(s) with label "
            f"{counts.index(min(counts))} (stratifying needs "
            f"{MIN_ROWS_PER_CLASS_TO_STRATIFY} of each class)"
        )
    try:
        train, test = train_test_split(
            np.arange(n, dtype=np.int64),
            test_size=pre.testFraction,
            random_state=pre.splitSeed,
            stratify=y if stratify else None,
        )
    except ValueError as e:
        raise DataError(f"{source}: cannot split {n} rows into train and test: {e}") from None
    train = np.asarray(train, dtype=np.int64)
    test = np.asarray(test, dtype=np.int64)
    if stratify:
        for part, rows in (("training", train), ("test", test)):
            absent = sorted({0, 1} - {int(v) for v in np.unique(y[rows])})
            if absent:
                raise DataError(
                    f"{source}: the stratified split leaves no row with label {absent[0]} in "
                    f"the {part} split ({len(train)} train, {len(test)} test rows, "
                    f"testFraction {pre.testFraction}); the site needs more rows of that "
                    "class or another testFraction"
                )
    return train, test


def preprocess(table: pd.DataFrame, pre: Preprocessing, task: Task, source: str) -> SiteDataset:
    """Turns a site's raw table into standardised float32 train and test arrays."""
    table = table.copy()
    table.columns = pd.Index([str(c) for c in table.columns])
    _check_columns(table, pre, task, source)
    rows_read = len(table)
    table = table.drop(columns=list(pre.drop))
    label = task.label
    y_all = _numeric(table[label], label, source, "label column")
    numeric_names = [c for c in table.columns if c != label and c not in pre.categorical]
    if not numeric_names and not pre.categorical:
        raise DataError(f"{source}: no feature columns left besides the label {label!r}")
    numeric = [_numeric(table[c], c, source, "column") for c in numeric_names]
    codes = {c: _level_codes(table[c], c, levels, source) for c, levels in pre.categorical.items()}

    keep = ~np.isnan(y_all)
    if pre.missing == "drop-rows":
        for values in [*numeric, *codes.values()]:
            keep &= ~np.isnan(values)
    if not keep.any():
        raise DataError(
            f"{source}: no row is left after dropping rows with missing values "
            f"({rows_read} rows read)"
        )
    y = _binary_label(y_all[keep], task, source)

    columns: list[npt.NDArray[np.float64]] = [v[keep] for v in numeric]
    names = list(numeric_names)
    for name, levels in pre.categorical.items():
        site_codes = codes[name][keep]
        for i, level in enumerate(levels):
            if pre.dropFirstLevel and i == 0:
                continue
            column = (site_codes == i).astype(np.float64)
            column[np.isnan(site_codes)] = np.nan  # missing stays missing, for impute-mean
            columns.append(column)
            names.append(f"{name}_{level}")
    x = np.stack(columns, axis=1)

    notes: list[str] = []
    train, test = _split(y, pre, source, notes)
    x_train, x_test = x[train], x[test]
    if np.isnan(x_train).any() or np.isnan(x_test).any():
        with np.errstate(all="ignore"):
            means = np.nanmean(x_train, axis=0)
        empty = np.flatnonzero(np.isnan(means))
        if len(empty):
            raise DataError(
                f"{source}: column {names[int(empty[0])]!r} has no value in the "
                "training split to impute the missing ones from"
            )
        x_train = np.where(np.isnan(x_train), means, x_train)
        x_test = np.where(np.isnan(x_test), means, x_test)
    transform = fit_transform(x_train, pre, label, numeric_names, names)
    if pre.standardize:
        x_train, x_test = standardize(x_train, x_test)
    return SiteDataset(
        source=source,
        feature_names=tuple(names),
        X_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.ascontiguousarray(y[train], dtype=np.float32),
        X_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.ascontiguousarray(y[test], dtype=np.float32),
        rows_read=rows_read,
        rows_used=int(keep.sum()),
        notes=tuple(notes),
        transform=transform,
    )


def standardize(
    x_train: npt.NDArray[np.float64], x_test: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Centres and scales both splits with the training split's mean and sample std."""
    mean, std = standard_scale(x_train)
    return (x_train - mean) / std, (x_test - mean) / std
