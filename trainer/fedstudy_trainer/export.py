"""``fedstudy export``: the study's final model as ONNX, checked against PyTorch.

The model is built from the study (``build_model(spec.model, input_shape)``) and loaded with
the weights of ``model.safetensors``; it is exported with PyTorch's TorchScript-based ONNX
exporter (``dynamo=False``: it needs no extra package) with one input, ``features`` (a batch
of examples, any number of rows), and two outputs, ``logit`` and ``probability``. The file's
metadata carry the study's name, the model version, the digest of the weights (the
``model.sha256`` of ``summary.json``), the input shape and, for tables, the feature names.

Then the export is checked: onnxruntime and PyTorch score the test rows of each named site
and their outputs must agree within ``--tolerance`` (1e-5 by default). A failed check
removes the file.

Exit codes: 0 exported and checked; 1 the check failed; 2 bad input (the study, the model
file, a site's data); 3 onnx or onnxruntime is missing; 4 the study's model has no ONNX export
(it is not a torch module, e.g. xgboost, or the exporter cannot translate one of its layers).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from torch import nn

from fedstudy import __version__
from fedstudy.fsutil import atomic_write_bytes
from fedstudy.spec import FederatedStudy, StudyError, load_study
from fedstudy.tensors import Weights, digest
from fedstudy_trainer.data import DataError, SiteDataset, load_site_data
from fedstudy_trainer.models import build_model, set_weights
from fedstudy_trainer.predict import (
    EXIT_BAD_INPUT,
    EXIT_MISSING_PACKAGES,
    INPUT_NAME,
    OUTPUT_NAMES,
    ExportError,
    FloatArray,
    MissingPackages,
    OnnxModel,
    metadata_of,
)

EXIT_CHECK_FAILED = 1
EXIT_NOT_EXPORTABLE = 4
ONNX_FILE = "model.onnx"
OPSET = 17
DEFAULT_TOLERANCE = 1e-5
_MODEL_PREFIX = "model/"
_STRATEGY_PREFIX = "strategy/"


class NotExportable(ExportError):
    """A model this exporter cannot write as ONNX."""


class _Scored(nn.Module):
    """The study's model with its logistic function: (logit, probability) per example."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit: torch.Tensor = self.model(x)
        return logit, torch.sigmoid(logit)


def load_weights(path: Path) -> tuple[Weights, dict[str, str]]:
    """The global model's tensors (and the file's metadata) from a ``model.safetensors``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read it: {e.strerror}") from None
    try:
        tensors = st_load(raw)
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ExportError(f"{path}: not a safetensors file: {e}") from None
    weights = {
        k.removeprefix(_MODEL_PREFIX): np.asarray(v)
        for k, v in tensors.items()
        if not k.startswith(_STRATEGY_PREFIX)
    }
    if not weights:
        raise ExportError(f"{path}: holds no tensors")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return weights, {str(k): str(v) for k, v in (meta or {}).items()}


def build_loaded(study: FederatedStudy, shape: tuple[int, ...], weights: Weights) -> nn.Module:
    """The study's model for examples of ``shape``, with ``weights`` loaded, in eval mode."""
    spec = study.spec
    try:
        model = build_model(spec.model, shape, seed=spec.seed, private=spec.privacy is not None)
    except ValueError as e:
        raise NotExportable(f"model {spec.model.name}: {e}") from None
    try:
        set_weights(model, weights)
    except ValueError as e:
        raise ExportError(f"the study's model cannot take these weights: {e}") from None
    model.eval()
    return model


def export_onnx(
    model: nn.Module, shape: tuple[int, ...], path: Path, metadata: Mapping[str, Any]
) -> None:
    """Writes ``model`` (examples of ``shape``) to ``path`` as ONNX with ``metadata``."""
    try:
        import onnx
    except ModuleNotFoundError as e:
        raise MissingPackages(
            f"cannot import {e.name}: install the export extra (pip install 'fedstudy[export]')"
        ) from None
    # In eval mode, the wrapper too: the exporter puts back the mode it found, recursively.
    scored = _Scored(model).eval()
    dummy = torch.zeros((2, *shape), dtype=torch.float32)
    axes = {name: {0: "rows"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        with warnings.catch_warnings():
            # The TorchScript-based exporter announces its own deprecation on every call.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            _export(
                scored,
                (dummy,),
                str(raw),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
                opset_version=OPSET,
            )
        proto = onnx.load(str(raw))
    for key, value in metadata_of(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fedstudy"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())


def _export(*args: Any, **kwargs: Any) -> None:
    """``torch.onnx.export``; a layer it cannot translate is ``NotExportable``."""
    try:
        torch.onnx.export(*args, **kwargs)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotExportable(f"PyTorch's ONNX exporter cannot translate the model: {first}") from e


def torch_scores(model: nn.Module, x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """PyTorch's (logit, probability) for each row of ``x``, the model in eval mode."""
    model.eval()
    with torch.no_grad():
        logit = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        prob = torch.sigmoid(logit)
    return (
        logit.numpy().astype(np.float32, copy=False),
        prob.numpy().astype(np.float32, copy=False),
    )


@dataclass(frozen=True)
class Check:
    """How far onnxruntime's outputs are from PyTorch's on one site's test rows."""

    site: str
    rows: int
    logit_diff: float
    probability_diff: float


def check_rows(model: nn.Module, onnx_model: OnnxModel, site: str, x: FloatArray) -> Check:
    t_logit, t_prob = torch_scores(model, x)
    o_logit, o_prob = onnx_model.run(np.ascontiguousarray(x, dtype=np.float32))
    if o_logit.shape != t_logit.shape:
        raise ExportError(
            f"onnxruntime gives outputs of shape {list(o_logit.shape)}, PyTorch "
            f"{list(t_logit.shape)}"
        )
    if len(x) == 0:
        return Check(site, 0, 0.0, 0.0)
    return Check(
        site,
        len(x),
        float(np.max(np.abs(o_logit.astype(np.float64) - t_logit))),
        float(np.max(np.abs(o_prob.astype(np.float64) - t_prob))),
    )


def _input_shape(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shape like 30 or 1,28,28") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{value!r}: every dimension must be 1 or more")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstudy export",
        description="Export a study's model (model.safetensors) to ONNX, then check that "
        "onnxruntime and PyTorch agree on the test rows of the named sites.",
    )
    p.add_argument("model", metavar="MODEL", help="the study's model.safetensors")
    p.add_argument("--study", required=True, help="the study file (YAML)")
    p.add_argument("--out", help=f"the ONNX file (default: {ONNX_FILE} beside MODEL)")
    p.add_argument(
        "--site",
        action="append",
        default=[],
        help="check on this site's test rows (repeatable; default: every site, whose data "
        "must then be on this machine)",
    )
    p.add_argument(
        "--input-shape",
        type=_input_shape,
        help="the shape of one example (e.g. 30); with it and no --site, nothing is checked",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest difference allowed between the two (default {DEFAULT_TOLERANCE:g})",
    )
    return p


def _fail(message: str, code: int) -> int:
    print(f"fedstudy export: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(1)
    study_path = Path(args.study).resolve()
    model_path = Path(args.model)
    out = Path(args.out) if args.out else model_path.with_name(ONNX_FILE)
    try:
        study = load_study(study_path)
    except StudyError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    names = list(args.site)
    if not names and args.input_shape is None:
        names = [s.name for s in study.spec.sites]
    datasets: dict[str, SiteDataset] = {}
    try:
        for name in names:
            datasets[name] = load_site_data(study, name, study_path.parent)
        weights, file_meta = load_weights(model_path)
    except (DataError, ExportError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    shapes = {d.input_shape for d in datasets.values()}
    if args.input_shape is not None:
        shapes.add(tuple(args.input_shape))
    if len(shapes) != 1:
        return _fail(f"the sites' examples differ in shape: {sorted(shapes)}", EXIT_BAD_INPUT)
    shape = shapes.pop()
    first = next(iter(datasets.values()), None)
    try:
        model = build_loaded(study, shape, weights)
    except NotExportable as e:
        return _fail(f"no ONNX export: {e}", EXIT_NOT_EXPORTABLE)
    except ExportError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    ordered = {k: weights[k] for k in model.state_dict()}
    metadata: dict[str, Any] = {
        "study": study.name,
        "model_version": file_meta.get("version", ""),
        "weights_sha256": digest(ordered),
        "input_shape": list(shape),
        "outputs": "logit: one per example; probability: its logistic function",
    }
    if first is not None and first.transform is not None:
        metadata["feature_names"] = list(first.feature_names)
    try:
        export_onnx(model, shape, out, metadata)
        onnx_model = OnnxModel(out)
        checks = [check_rows(model, onnx_model, n, d.X_test) for n, d in datasets.items()]
    except MissingPackages as e:
        return _fail(str(e), EXIT_MISSING_PACKAGES)
    except NotExportable as e:
        out.unlink(missing_ok=True)
        return _fail(f"no ONNX export: {e}", EXIT_NOT_EXPORTABLE)
    except ExportError as e:
        out.unlink(missing_ok=True)
        return _fail(str(e), EXIT_CHECK_FAILED)
    worst = max((max(c.logit_diff, c.probability_diff) for c in checks), default=0.0)
    for c in checks:
        print(
            f"site {c.site}: {c.rows} test rows, largest difference onnxruntime - PyTorch: "
            f"logit {c.logit_diff:.3g}, probability {c.probability_diff:.3g}"
        )
    if not math.isfinite(worst) or worst > args.tolerance:
        out.unlink(missing_ok=True)
        return _fail(
            f"{out}: onnxruntime and PyTorch differ by {worst:.3g}, more than "
            f"{args.tolerance:g}; the export was removed",
            EXIT_CHECK_FAILED,
        )
    rows = sum(c.rows for c in checks)
    checked = (
        f"checked on {rows} test rows of {len(checks)} sites (largest difference {worst:.3g})"
        if checks
        else "not checked (no site's data named)"
    )
    print(f"{out}: exported, {checked}")
    return 0
