"""A site's preprocessing, fitted on its training rows, as data that can score new rows.

Every site turns its table into features with the same recipe (``data.py``), but the numbers
in it are the site's own: the means that fill missing cells and the means and standard
deviations that standardise each feature come from that site's training split. The model was
trained on features scaled that way at every site, so new rows must be scaled with one site's
fitted numbers before the model sees them. ``FeatureTransform`` holds them; the trainer keeps
a copy in its state folder (``preprocessing.json``), and ``fedstudy predict`` applies one.

The numbers are summaries of a site's training rows (a mean and a standard deviation per
feature), never rows; like the data they come from, they stay at the site.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from fedstudy.fsutil import atomic_write_json
from fedstudy.spec import Preprocessing

PREPROCESSING_FILE = "preprocessing.json"
FORMAT = 1

FloatArray = npt.NDArray[np.float32]


class FeatureError(ValueError):
    """Rows (or a preprocessing file) that cannot be turned into features; the message names
    the file, the column and the value."""


def standard_scale(
    x_train: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The training split's mean and sample standard deviation (ddof=1) per column; a
    constant column (or a single row) gets scale 1, so it is only centred."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0, ddof=1) if len(x_train) > 1 else np.ones(x_train.shape[1])
    return mean, np.where(np.isfinite(std) & (std > 0), std, 1.0)


@dataclass(frozen=True)
class FeatureTransform:
    """How raw table rows become the model's features at one site."""

    label: str
    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[int | str, ...]], ...]
    drop_first_level: bool
    na_values: tuple[str, ...]
    feature_names: tuple[str, ...]
    # Per feature: the training mean that fills a missing cell (impute-mean), else None.
    fill: tuple[float, ...] | None
    # Per feature: centre and scale (standardize), else None.
    mean: tuple[float, ...] | None
    scale: tuple[float, ...] | None
    train_rows: int

    @property
    def columns(self) -> tuple[str, ...]:
        """The table columns the features are made from, in feature order."""
        return self.numeric + tuple(c for c, _ in self.categorical)

    def _feature_columns(self) -> list[str]:
        """For each feature, the table column it comes from."""
        out = list(self.numeric)
        for column, levels in self.categorical:
            kept = levels[1:] if self.drop_first_level else levels
            out += [column] * len(kept)
        return out

    # --- applying ------------------------------------------------------------------------

    def apply(self, table: pd.DataFrame, source: str) -> FloatArray:
        """The features of every row of ``table`` (extra columns, the label included, are
        ignored). Every problem is a ``FeatureError`` naming the column and the value."""
        have = [str(c).strip() for c in table.columns]
        table = table.set_axis(have, axis=1)
        for name in self.columns:
            if name not in have:
                shown = ", ".join(have[:20]) + (
                    f", ... ({len(have)} in all)" if len(have) > 20 else ""
                )
                raise FeatureError(
                    f"{source}: no column {name!r}, which the model reads (the table has: "
                    f"{shown or 'no columns'})"
                )
        n = len(table)
        columns: list[npt.NDArray[np.float64]] = []
        for name in self.numeric:
            columns.append(numeric_cells(table[name], name, source))
        for name, levels in self.categorical:
            codes = level_codes(table[name], name, levels, source)
            for i in range(1 if self.drop_first_level else 0, len(levels)):
                col = (codes == i).astype(np.float64)
                col[np.isnan(codes)] = np.nan
                columns.append(col)
        if len(columns) != len(self.feature_names):
            raise FeatureError(
                f"{source}: the preprocessing makes {len(columns)} features but lists "
                f"{len(self.feature_names)} feature names"
            )
        x = np.stack(columns, axis=1) if columns else np.zeros((n, 0))
        missing = np.isnan(x)
        if missing.any():
            row, j = (int(v) for v in np.argwhere(missing)[0])
            column = self._feature_columns()[j]
            if self.fill is None:
                raise FeatureError(
                    f"{source}: column {column!r} is empty (or one of naValues) in data row "
                    f"{row + 1}; the study drops rows with missing values "
                    "(preprocessing.missing: drop-rows), so such a row cannot be scored"
                )
            x = np.where(missing, np.asarray(self.fill, dtype=np.float64), x)
        if self.mean is not None and self.scale is not None:
            x = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.ascontiguousarray(x, dtype=np.float32)

    def read_csv(self, path: Path) -> pd.DataFrame:
        """Reads a CSV file with a header row the way the sites read theirs: text cells,
        the study's ``naValues`` and empty cells missing."""
        try:
            return pd.read_csv(
                path,
                header=0,
                dtype=str,
                na_values=list(self.na_values),
                keep_default_na=True,
                skipinitialspace=True,
            )
        except FileNotFoundError:
            raise FeatureError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise FeatureError(f"{path}: is a folder, not a CSV file") from None
        except pd.errors.EmptyDataError:
            raise FeatureError(f"{path}: the file is empty") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FeatureError(f"{path}: cannot read as CSV: {first}") from None

    # --- saving --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "numeric": list(self.numeric),
            "categorical": {c: list(levels) for c, levels in self.categorical},
            "drop_first_level": self.drop_first_level,
            "na_values": list(self.na_values),
            "feature_names": list(self.feature_names),
            "fill": None if self.fill is None else list(self.fill),
            "mean": None if self.mean is None else list(self.mean),
            "scale": None if self.scale is None else list(self.scale),
            "train_rows": self.train_rows,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> FeatureTransform:
        """Reads ``to_json``'s form back; a field of the wrong shape is a ``FeatureError``."""
        try:
            names = _strings(data["feature_names"], "feature_names", source)
            n = len(names)
            categorical = data["categorical"]
            if not isinstance(categorical, dict):
                raise FeatureError(f"{source}: categorical: not a mapping")
            out = cls(
                label=str(data["label"]),
                numeric=_strings(data["numeric"], "numeric", source),
                categorical=tuple(
                    (str(c), tuple(_level(v, f"categorical.{c}", source) for v in levels))
                    for c, levels in categorical.items()
                ),
                drop_first_level=bool(data["drop_first_level"]),
                na_values=_strings(data["na_values"], "na_values", source),
                feature_names=names,
                fill=_floats(data["fill"], "fill", n, source),
                mean=_floats(data["mean"], "mean", n, source),
                scale=_floats(data["scale"], "scale", n, source),
                train_rows=int(data["train_rows"]),
            )
        except KeyError as e:
            raise FeatureError(f"{source}: no field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, FeatureError):
                raise
            raise FeatureError(f"{source}: {e}") from None
        if len(out._feature_columns()) != n:
            raise FeatureError(
                f"{source}: feature_names lists {n} features, the columns make "
                f"{len(out._feature_columns())}"
            )
        return out


def fit_transform(
    x_train: npt.NDArray[np.float64],
    pre: Preprocessing,
    label: str,
    numeric: Sequence[str],
    feature_names: Sequence[str],
) -> FeatureTransform:
    """The transform fitted on a site's training features ``x_train`` (imputed, not yet
    standardised), as ``data.preprocess`` made them."""
    x = np.asarray(x_train, dtype=np.float64)
    fill = None
    if pre.missing == "impute-mean":
        # x is imputed with the training means already: its means are those same values.
        fill = tuple(float(v) for v in x.mean(axis=0))
    mean = scale = None
    if pre.standardize:
        m, s = standard_scale(x)
        mean, scale = tuple(float(v) for v in m), tuple(float(v) for v in s)
    return FeatureTransform(
        label=label,
        numeric=tuple(numeric),
        categorical=tuple((c, tuple(levels)) for c, levels in pre.categorical.items()),
        drop_first_level=pre.dropFirstLevel,
        na_values=tuple(pre.naValues),
        feature_names=tuple(feature_names),
        fill=fill,
        mean=mean,
        scale=scale,
        train_rows=len(x),
    )


def write_preprocessing(path: Path, transform: FeatureTransform, study: str, site: str) -> None:
    """Saves a site's fitted preprocessing (``preprocessing.json`` in its state folder)."""
    atomic_write_json(
        path, {"format": FORMAT, "study": study, "site": site, "transform": transform.to_json()}
    )


def read_preprocessing(path: Path) -> tuple[FeatureTransform, str, str]:
    """(transform, study, site) from a ``preprocessing.json``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FeatureError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FeatureError(f"{path}: not a preprocessing file of format {FORMAT}")
    transform = data.get("transform")
    if not isinstance(transform, dict):
        raise FeatureError(f"{path}: no field 'transform'")
    return (
        FeatureTransform.from_json(transform, str(path)),
        str(data.get("study", "")),
        str(data.get("site", "")),
    )


# --- parsing cells --------------------------------------------------------------------------


def numeric_cells(
    column: pd.Series,
    name: str,
    source: str,
    *,
    what: str = "column",
    hint: str = "",
    error: type[ValueError] = FeatureError,
) -> npt.NDArray[np.float64]:
    """A column as float64, NaN where missing; a cell that is not a number raises ``error``
    naming the column, the value and its data row (``hint`` is appended)."""
    values = pd.to_numeric(column, errors="coerce")
    bad = column.notna().to_numpy() & values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise error(
            f"{source}: {what} {name!r} holds {column.iloc[row]!r} (data row {row + 1}), "
            f"which is not a number{hint}"
        )
    return np.asarray(values, dtype=np.float64)


def _as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def level_codes(
    column: pd.Series,
    name: str,
    levels: Sequence[int | str],
    source: str,
    *,
    hint: str = "",
    error: type[ValueError] = FeatureError,
) -> npt.NDArray[np.float64]:
    """The index of each cell's level, NaN where missing. A cell matches a level when their
    texts are equal or both are the same number, so the level ``1`` matches the cells ``1``
    and ``1.0`` of differently formatted files; any other cell raises ``error``."""
    present = column.notna().to_numpy()
    text = column.astype(object).map(lambda v: str(v).strip()).to_numpy()
    numbers = np.asarray(pd.to_numeric(column, errors="coerce"), dtype=np.float64)
    codes = np.full(len(column), np.nan)
    for i, level in enumerate(levels):
        match = text == str(level)
        number = _as_number(level)
        if number is not None:
            match |= numbers == number
        codes[np.isnan(codes) & present & match] = i
    unknown = present & np.isnan(codes)
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise error(
            f"{source}: column {name!r} holds {column.iloc[row]!r} (data row {row + 1}), which "
            f"is not one of its levels {list(levels)}{hint}"
        )
    return codes


def _strings(value: Any, field: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FeatureError(f"{source}: {field}: not a list of names")
    return tuple(value)


def _level(value: Any, field: str, source: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FeatureError(f"{source}: {field}: level {value!r} is not a number or a name")
    return value


def _floats(value: Any, field: str, n: int, source: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != n
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    ):
        raise FeatureError(f"{source}: {field}: not a list of {n} finite numbers")
    return tuple(float(v) for v in value)
