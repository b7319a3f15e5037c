"""``fedstudy predict``: score the rows of a CSV table with a study's exported model.

The model (``model.onnx``, from ``fedstudy export``) reads features preprocessed the way it
was trained: with one site's fitted preprocessing (``features.py``). Give it either

- ``--study STUDY --site NAME``: the site's preprocessing is fitted again from its own data,
  exactly as its trainer fitted it (same rows, same split); this runs where that site's data
  are; or
- ``--preprocessing FILE``: the ``preprocessing.json`` the site's trainer saved in its state
  folder when it trained.

The output is CSV: ``row`` (1 for the first data row), ``logit`` and ``probability``, after
the ``--id-column`` when one is named.

Exit codes: 0 scored; 2 bad input (a missing column, a value that is not a number, a model
that does not fit the preprocessing; the message names it); 3 onnxruntime is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedstudy.spec import StudyError, load_study
from fedstudy_trainer.features import FeatureError, FeatureTransform, read_preprocessing

EXIT_BAD_INPUT = 2
EXIT_MISSING_PACKAGES = 3
INPUT_NAME = "features"
OUTPUT_NAMES = ("logit", "probability")

FloatArray = npt.NDArray[np.float32]


class ExportError(RuntimeError):
    """A model file or an export that cannot be used; the message says which and why."""


class MissingPackages(ExportError):
    """onnx or onnxruntime is not installed."""


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ModuleNotFoundError as e:
        raise MissingPackages(
            f"cannot import {e.name}: install the export extra (pip install 'fedstudy[export]')"
        ) from None
    return onnxruntime


class OnnxModel:
    """An exported model loaded into onnxruntime (CPU)."""

    def __init__(self, path: Path) -> None:
        ort = import_onnxruntime()
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a bad or missing file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path}: cannot load it as an ONNX model: {first}") from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or outputs != list(OUTPUT_NAMES):
            raise ExportError(
                f"{path}: not a fedstudy export (inputs {[i.name for i in inputs]}, outputs "
                f"{outputs}; expected {INPUT_NAME!r} and {list(OUTPUT_NAMES)})"
            )
        self.input_shape: list[Any] = list(inputs[0].shape)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta) if meta else {}

    @property
    def feature_names(self) -> list[str] | None:
        raw = self.metadata.get("feature_names")
        if raw is None:
            return None
        names = json.loads(raw)
        return [str(n) for n in names] if isinstance(names, list) else None

    def run(self, x: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(logit, probability) for each row of ``x``."""
        width = self.input_shape[1:]
        if all(isinstance(d, int) for d in width) and list(x.shape[1:]) != width:
            raise ExportError(
                f"{self.path}: the model reads examples of shape {width}, the rows have "
                f"{list(x.shape[1:])}"
            )
        logit, prob = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return np.asarray(logit, dtype=np.float32), np.asarray(prob, dtype=np.float32)


def check_match(model: OnnxModel, transform: FeatureTransform, study: str | None) -> None:
    """Refuses a model whose recorded features (or study) differ from the preprocessing's."""
    model_study = model.metadata.get("study")
    if study and model_study and model_study != study:
        raise ExportError(
            f"{model.path}: the model is study {model_study!r}'s; the preprocessing is study "
            f"{study!r}'s"
        )
    names = model.feature_names
    if names is not None and names != list(transform.feature_names):
        for i, (a, b) in enumerate(zip(names, transform.feature_names, strict=False)):
            if a != b:
                raise ExportError(
                    f"{model.path}: feature {i} of the model is {a!r}, the preprocessing "
                    f"makes {b!r}"
                )
        raise ExportError(
            f"{model.path}: the model reads {len(names)} features, the preprocessing makes "
            f"{len(transform.feature_names)}"
        )


def site_transform(study_path: Path, site: str) -> tuple[FeatureTransform, str]:
    """A site's preprocessing fitted from its own data; (transform, study name)."""
    from fedstudy_trainer.data import DataError, load_site_data

    study = load_study(study_path)
    try:
        data = load_site_data(study, site, study_path.resolve().parent)
    except DataError as e:
        raise FeatureError(str(e)) from None
    if data.transform is None:
        raise FeatureError(
            f"study {study.name}: site {site}'s data are not a table; fedstudy predict scores "
            "tables"
        )
    return data.transform, study.name


def _format(value: float) -> str:
    return f"{value:.9g}"  # enough digits to give back the same float32


def score_csv(
    model: OnnxModel,
    transform: FeatureTransform,
    data: Path,
    id_column: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the scores of every row of the CSV file ``data``."""
    table = transform.read_csv(data)
    if len(table) == 0:
        raise FeatureError(f"{data}: no data rows")
    ids: list[str] | None = None
    if id_column is not None:
        names = [str(c).strip() for c in table.columns]
        if id_column not in names:
            raise FeatureError(f"{data}: no column {id_column!r} (--id-column)")
        ids = [str(v) for v in table.iloc[:, names.index(id_column)].tolist()]
    x = transform.apply(table, str(data))
    logit, prob = model.run(x)
    header = ([id_column] if id_column else []) + ["row", *OUTPUT_NAMES]
    rows = []
    for i in range(len(x)):
        rows.append(
            ([ids[i]] if ids is not None else [])
            + [str(i + 1), _format(float(logit[i])), _format(float(prob[i]))]
        )
    return header, rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstudy predict",
        description="Score the rows of a CSV table (with a header row) with a study's exported "
        "model, preprocessed as one site preprocessed its training rows.",
    )
    p.add_argument("model", metavar="MODEL", help="the exported model (model.onnx)")
    p.add_argument("data", metavar="DATA", help="the rows to score: a CSV file with a header")
    p.add_argument("--study", help="the study file; with --site, fits that site's preprocessing")
    p.add_argument("--site", help="the site whose preprocessing to apply (with --study)")
    p.add_argument(
        "--preprocessing",
        metavar="FILE",
        help="a site's preprocessing.json (from its trainer's state folder), instead of "
        "--study and --site",
    )
    p.add_argument("--id-column", help="a column of DATA to copy into the output")
    p.add_argument("--out", help="write the scores here (default: standard output)")
    return p


def _write_csv(header: Sequence[str], rows: Sequence[Sequence[str]], out: str | None) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(buf.getvalue())
    else:
        Path(out).write_text(buf.getvalue(), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    by_site = args.study is not None or args.site is not None
    if by_site == (args.preprocessing is not None) or (
        by_site and (args.study is None or args.site is None)
    ):
        print(
            "fedstudy predict: give --study and --site (fit the site's preprocessing from its "
            "data), or --preprocessing FILE",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        if args.preprocessing is not None:
            transform, study, site = read_preprocessing(Path(args.preprocessing))
        else:
            transform, study = site_transform(Path(args.study), args.site)
            site = args.site
        model = OnnxModel(Path(args.model))
        check_match(model, transform, study)
        header, rows = score_csv(model, transform, Path(args.data), args.id_column)
    except MissingPackages as e:
        print(f"fedstudy predict: {e}", file=sys.stderr)
        return EXIT_MISSING_PACKAGES
    except StudyError as e:
        print(f"fedstudy predict: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FeatureError, ExportError) as e:
        print(f"fedstudy predict: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _write_csv(header, rows, args.out)
    print(
        f"scored {len(rows)} rows of {args.data} with site {site}'s preprocessing",
        file=sys.stderr,
    )
    return 0


def metadata_of(entries: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as the strings ONNX stores: lists and mappings as JSON."""
    return {
        str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in entries.items()
    }
