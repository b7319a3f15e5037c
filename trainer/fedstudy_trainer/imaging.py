"""Image sites: a folder of PNG/JPEG or DICOM files with a labels CSV, or a built-in image set.

Every image becomes a float32 array of shape (channels, height, width), and a site's images
one array per split (``SiteDataset.X_train``: (n, channels, height, width)). The pipeline is
the same at every site:

1. read the labels CSV (``fileColumn``: the file, relative to the folder; ``task.label``:
   the label, binarized by ``task.binarize`` when declared, else 0/1);
2. read each file to values in [0, 1] (``intensity: fixed``):
   - PNG/JPEG (Pillow): 8-bit values / 255, 16-bit grayscale / 65535; converted to grayscale
     or RGB as ``channels`` asks;
   - DICOM (pydicom): the stored values through the modality LUT (rescale slope and
     intercept, e.g. to Hounsfield units), then the VOI window (``preprocessing.image.window``,
     else the file's first WindowCenter/WindowWidth, else the image's own range) to [0, 1] as
     the DICOM standard defines it (PS3.3 C.11.2.1.2); MONOCHROME1 is inverted so that higher
     is brighter. Grayscale only, one frame per file;
3. resize to ``size`` (MONAI ``Resize``, bilinear with anti-aliasing), and rescale per image
   for ``intensity: minmax`` (MONAI ``ScaleIntensity``) or ``zscore`` (``NormalizeIntensity``);
4. split train/test as a table's rows are split (``testFraction``, ``splitSeed``, stratified).

All of it happens before the trainer joins the study, so a bad file stops the trainer at
start with a ``DataError`` naming it; with ``skipBadFiles`` such a file is skipped instead,
and the dataset's notes count and name the skipped files. Augmentation (``Augmenter``) is
applied to training batches only, drawn from the round's seed, so a round retrained after a
restart sees the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from fedstudy.spec import (
    Augment,
    ImagePreprocessing,
    Partition,
    Site,
    StudySpec,
    Window,
    resolve_data_path,
    resolve_labels_path,
)
from fedstudy_trainer.data import (
    DataError,
    SiteDataset,
    _binary_label,
    _first_line,
    _names,
    _split,
    partition_rows,
)

FloatArray = npt.NDArray[np.float32]
Values = npt.NDArray[np.float64]

# How many skipped files the notes name (all are counted).
NOTE_NAMES = 5


class BadFile(Exception):
    """One image that cannot be used: skipped under ``skipBadFiles``, an error otherwise."""


# --- reading one file ---------------------------------------------------------------------


def read_picture(path: Path, channels: int) -> FloatArray:
    """A PNG/JPEG (anything Pillow opens) as (channels, height, width) values in [0, 1]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise BadFile("no such file") from None
    except IsADirectoryError:
        raise BadFile("is a folder, not an image") from None
    except UnidentifiedImageError:
        raise BadFile("cannot read as an image: not a format Pillow knows") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadFile(f"cannot read as an image: {_first_line(e)}") from None
    mode = image.mode
    values: FloatArray
    if mode.startswith("I;16") or mode == "I":
        raw = np.asarray(image)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise BadFile(f"{mode} pixel values beyond 16 bits ({raw.min()} to {raw.max()})")
        gray = (raw.astype(np.float32) / np.float32(65535.0))[None]
        values = np.repeat(gray, channels, axis=0) if channels == 3 else gray
    elif mode == "F":
        raise BadFile("32-bit float pixels (mode F) are not read; store 8- or 16-bit images")
    else:
        target = "L" if channels == 1 else "RGB"
        try:
            converted = image.convert(target)
        except (OSError, ValueError) as e:
            raise BadFile(f"cannot convert mode {mode} to {target}: {_first_line(e)}") from None
        pixels = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
        values = pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0)
    return np.ascontiguousarray(values, dtype=np.float32)


def _dicom_dataset(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise BadFile("no such file") from None
    except IsADirectoryError:
        raise BadFile("is a folder, not a DICOM file") from None
    except InvalidDicomError as e:
        raise BadFile(f"not a DICOM file: {_first_line(e)}") from None
    except Exception as e:  # pydicom raises many types for a damaged file
        raise BadFile(f"cannot read as DICOM: {type(e).__name__}: {_first_line(e)}") from None


def modality_values(ds: Any) -> Values:
    """A DICOM image's stored values through its modality LUT: ``value * RescaleSlope +
    RescaleIntercept`` (e.g. Hounsfield units for CT), or its Modality LUT Sequence."""
    pixel_tags = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
    if not any(tag in ds for tag in pixel_tags):
        what = ", ".join(
            f"{name} {ds.get(name)}" for name in ("Modality", "SOPClassUID") if ds.get(name)
        )
        raise BadFile(f"no pixel data ({what or 'no modality'})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadFile(f"{frames} frames: a site reads 2-D images, one frame per file")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadFile(
            f"photometric interpretation {photometric or '(none)'}: a dicom site reads "
            "grayscale images (MONOCHROME1 or MONOCHROME2)"
        )
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as e:  # decoders raise many types
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if ds.file_meta else "unknown"
        name = getattr(syntax, "name", str(syntax))
        raise BadFile(
            f"cannot decode the pixel data (transfer syntax {name}): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from None
    if stored.ndim != 2:
        raise BadFile(f"pixel data of shape {stored.shape}: a site reads 2-D images")
    if ds.get("ModalityLUTSequence"):
        from pydicom.pixels.processing import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    values = stored.astype(np.float64)
    if slope is not None and str(slope).strip() != "":
        values = values * float(slope)
    if intercept is not None and str(intercept).strip() != "":
        values = values + float(intercept)
    return values


def dicom_values(path: Path) -> Values:
    """The values of a DICOM file's image after the modality LUT (height, width)."""
    return modality_values(_dicom_dataset(path))


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None
    text = str(value).strip()
    return float(text) if text else None


def apply_window(values: Values, center: float, width: float, function: str = "LINEAR") -> Values:
    """The DICOM VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3) onto [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        if width <= 0:
            raise BadFile(f"SIGMOID window of width {width:g}: the width must be above 0")
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function not in ("LINEAR", "LINEAR_EXACT"):
        raise BadFile(f"VOI LUT function {function!r}: LINEAR, LINEAR_EXACT or SIGMOID")
    if function == "LINEAR":
        if width < 1:
            raise BadFile(f"LINEAR window of width {width:g}: the width must be at least 1")
        center, width = center - 0.5, width - 1.0
    elif width <= 0:
        raise BadFile(f"LINEAR_EXACT window of width {width:g}: the width must be above 0")
    low, high = center - width / 2, center + width / 2
    out = np.empty_like(values, dtype=np.float64)
    below = values <= low
    above = values > high
    between = ~(below | above)
    out[below] = 0.0
    out[above] = 1.0
    out[between] = (values[between] - center) / width + 0.5
    return out


def read_dicom(path: Path, window: Window | None, channels: int) -> FloatArray:
    """A grayscale DICOM image as (channels, height, width) values in [0, 1] (see module)."""
    ds = _dicom_dataset(path)
    values = modality_values(ds)
    if window is not None:
        scaled = apply_window(values, window.center, window.width)
    else:
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None:
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            scaled = apply_window(values, center, width, function)
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    gray = scaled.astype(np.float32)[None]
    return np.ascontiguousarray(np.repeat(gray, channels, axis=0) if channels == 3 else gray)


# --- transforms ---------------------------------------------------------------------------


def _plain(t: Any) -> torch.Tensor:
    """A MONAI output as a plain tensor (MONAI returns MetaTensors)."""
    as_tensor = getattr(t, "as_tensor", None)
    out = as_tensor() if callable(as_tensor) else torch.as_tensor(t)
    assert isinstance(out, torch.Tensor)
    return out


class ImageTransform:
    """Resize and intensity scaling of one image (MONAI), the same at every site."""

    def __init__(self, pre: ImagePreprocessing) -> None:
        from monai.transforms.intensity.array import NormalizeIntensity, ScaleIntensity
        from monai.transforms.spatial.array import Resize

        self.size = tuple(pre.size) if pre.size is not None else None
        self.resize = (
            Resize(spatial_size=self.size, mode="bilinear", anti_aliasing=True)
            if self.size is not None
            else None
        )
        self.intensity: Any = None
        if pre.intensity == "minmax":
            self.intensity = ScaleIntensity(minv=0.0, maxv=1.0)
        elif pre.intensity == "zscore":
            self.intensity = NormalizeIntensity()

    def __call__(self, image: FloatArray) -> FloatArray:
        t = torch.from_numpy(image)
        if self.resize is not None and tuple(t.shape[1:]) != self.size:
            t = _plain(self.resize(t))
        if self.intensity is not None:
            t = _plain(self.intensity(t))
        return np.ascontiguousarray(t.numpy(), dtype=np.float32)


class Augmenter:
    """Random flips and affine changes of training images (MONAI), reproducible per seed.

    ``reseed(seed)`` starts a round's stream; each call draws new changes for every image of
    the batch. The parameters come from numpy, so a CPU and a CUDA site draw the same ones.
    """

    def __init__(self, augment: Augment, size: tuple[int, int], device: torch.device) -> None:
        from monai.transforms.compose import Compose
        from monai.transforms.spatial.array import RandAffine, RandFlip

        steps: list[Any] = []
        if augment.flip:
            steps.append(RandFlip(prob=0.5, spatial_axis=1))
        if augment.rotateDegrees or augment.shift or augment.zoom:
            steps.append(
                RandAffine(
                    prob=1.0,
                    rotate_range=(math.radians(augment.rotateDegrees),),
                    translate_range=(augment.shift * size[0], augment.shift * size[1]),
                    scale_range=(augment.zoom, augment.zoom),
                    mode="bilinear",
                    padding_mode="zeros",
                    device=device,
                )
            )
        self.compose = Compose(steps)
        self.active = bool(steps)

    def reseed(self, seed: int) -> None:
        self.compose.set_random_state(seed=seed % 2**32)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.active or batch.shape[0] == 0:
            return batch
        with torch.no_grad():
            return torch.stack([_plain(self.compose(image)) for image in batch])


def make_augmenter(
    spec: StudySpec, shape: tuple[int, ...], device: torch.device
) -> Augmenter | None:
    """The study's training augmentation for images of ``shape``, or None."""
    pre = spec.preprocessing.image
    if pre is None or pre.augment is None or len(shape) != 3:
        return None
    augmenter = Augmenter(pre.augment, (shape[1], shape[2]), device)
    return augmenter if augmenter.active else None


# --- a site's images ----------------------------------------------------------------------


@dataclass
class _Loaded:
    images: list[FloatArray]
    labels: list[float]
    rows_read: int
    skipped: list[str]


def _read_labels(
    labels_path: Path, file_column: str, label: str
) -> tuple[list[str], pd.Series, str]:
    source = str(labels_path)
    try:
        table = pd.read_csv(labels_path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except FileNotFoundError:
        raise DataError(f"{source}: no such labels file") from None
    except IsADirectoryError:
        raise DataError(f"{source}: is a folder, not a labels CSV file") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{source}: the labels file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{source}: cannot read as CSV: {_first_line(e)}") from None
    table.columns = pd.Index([str(c).strip() for c in table.columns])
    have = list(table.columns)
    for column, what in ((file_column, "data.fileColumn"), (label, "task.label")):
        if column not in have:
            raise DataError(
                f"{source}: no column {column!r} ({what}); the labels file has: {_names(have)}"
            )
    if not len(table):
        raise DataError(f"{source}: the labels file lists no image")
    files = [("" if pd.isna(v) else str(v).strip()) for v in table[file_column]]
    return files, table[label], source


def _label_values(cells: pd.Series, files: list[str], label: str, source: str) -> Values:
    """The label column as numbers (NaN where empty); a cell that is no number is an error."""
    values = np.asarray(pd.to_numeric(cells, errors="coerce"), dtype=np.float64)
    bad = cells.notna().to_numpy() & np.isnan(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: label {cells.iloc[row]!r} of {files[row]!r} (column {label!r}, data "
            f"row {row + 1}) is not a number; labels are 0 or 1, or numbers that "
            "task.binarize turns into 0/1"
        )
    return values


def _folder_images(
    spec: StudySpec, site: Site, base_dir: Path, pre: ImagePreprocessing
) -> tuple[_Loaded, str]:
    data = site.data
    folder = resolve_data_path(site, base_dir)
    labels_path = resolve_labels_path(site, base_dir)
    assert folder is not None
    assert labels_path is not None
    if not folder.is_dir():
        raise DataError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    files, label_cells, labels_source = _read_labels(labels_path, data.fileColumn, spec.task.label)
    values = _label_values(label_cells, files, spec.task.label, labels_source)
    transform = ImageTransform(pre)
    seen: dict[str, int] = {}
    loaded = _Loaded([], [], len(files), [])
    first: tuple[str, tuple[int, ...]] | None = None
    for row, name in enumerate(files, start=1):
        where = f"data row {row} of {labels_source}"
        if not name:
            raise DataError(f"{labels_source}: column {data.fileColumn!r} is empty ({where})")
        if name in seen:
            raise DataError(
                f"{labels_source}: file {name!r} is listed twice (data rows {seen[name]} and "
                f"{row}); each image needs exactly one label"
            )
        seen[name] = row
        path = Path(name) if Path(name).is_absolute() else folder / name
        try:
            if math.isnan(values[row - 1]):
                raise BadFile("no label")
            raw = (
                read_dicom(path, pre.window, pre.channels)
                if data.format == "dicom"
                else read_picture(path, pre.channels)
            )
            image = transform(raw)
            if first is None:
                first = (str(path), image.shape)
            elif image.shape != first[1]:
                raise BadFile(
                    f"an image of {_shape(image.shape)}, but {first[0]} is {_shape(first[1])}; "
                    "set spec.preprocessing.image.size to resize every image"
                )
        except BadFile as e:
            if not data.skipBadFiles:
                raise DataError(
                    f"{path}: {e} ({where}); fix or remove it, or set "
                    "skipBadFiles: true in the site's data to skip such files"
                ) from None
            loaded.skipped.append(f"{path}: {e}")
            continue
        loaded.images.append(image)
        loaded.labels.append(float(values[row - 1]))
    return loaded, f"{folder} (labels {labels_source})"


def _shape(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]} pixels (height x width)"


def builtin_images(dataset: str) -> tuple[FloatArray, npt.NDArray[np.float64]]:
    """A built-in image set: (n, 1, height, width) values in [0, 1], and the labels.

    ``digits`` is scikit-learn's copy of the UCI handwritten digits (1797 scans of 8x8
    pixels, 17 grey levels, 0 to 16); its label is the digit (0-9).
    """
    if dataset != "digits":
        raise DataError(f"builtin:{dataset}: not a built-in image dataset")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None] / np.float32(16.0)
    return images, np.asarray(bunch.target, dtype=np.float64)


def _builtin_share(spec: StudySpec, site: Site, pre: ImagePreprocessing) -> tuple[_Loaded, str]:
    data = site.data
    assert data.dataset is not None
    partition = data.partition or Partition(index=0, count=1)
    source = (
        f"builtin:{data.dataset} (share {partition.index} of {partition.count}, "
        f"seed {partition.seed})"
    )
    images, labels = builtin_images(data.dataset)
    binary = _binary_label(labels, spec.task, f"builtin:{data.dataset}")
    rows = partition_rows(
        binary, partition.count, partition.labelSkew, partition.seed, f"builtin:{data.dataset}"
    )[partition.index]
    transform = ImageTransform(pre)
    chosen = images[rows]
    if pre.channels == 3:
        chosen = np.repeat(chosen, 3, axis=1)
    out = [transform(np.ascontiguousarray(image)) for image in chosen]
    return _Loaded(out, [float(v) for v in labels[rows]], len(rows), []), source


def load_image_site(spec: StudySpec, site: Site, base_dir: Path) -> SiteDataset:
    """Reads a site's images and labels, and splits them (see the module's docstring)."""
    from fedstudy_trainer.cnn import input_problem

    pre = spec.preprocessing.image or ImagePreprocessing()
    if site.data.format == "builtin":
        loaded, source = _builtin_share(spec, site, pre)
    else:
        loaded, source = _folder_images(spec, site, base_dir, pre)
    notes: list[str] = []
    if loaded.skipped:
        shown = "; ".join(loaded.skipped[:NOTE_NAMES])
        more = (
            f"; and {len(loaded.skipped) - NOTE_NAMES} more"
            if len(loaded.skipped) > NOTE_NAMES
            else ""
        )
        notes.append(
            f"skipped {len(loaded.skipped)} of {loaded.rows_read} images (skipBadFiles): "
            f"{shown}{more}"
        )
    if not loaded.images:
        raise DataError(f"{source}: no usable image ({len(loaded.skipped)} skipped)")
    y = _binary_label(np.asarray(loaded.labels, dtype=np.float64), spec.task, source)
    x = np.stack(loaded.images)
    problem = input_problem(spec.model, tuple(int(d) for d in x.shape[1:]))
    if problem is not None:
        raise DataError(f"{source}: {problem}")
    train, test = _split(y, spec.preprocessing, source, notes)
    return SiteDataset(
        source=source,
        feature_names=(),
        X_train=np.ascontiguousarray(x[train], dtype=np.float32),
        y_train=np.ascontiguousarray(y[train], dtype=np.float32),
        X_test=np.ascontiguousarray(x[test], dtype=np.float32),
        y_test=np.ascontiguousarray(y[test], dtype=np.float32),
        rows_read=loaded.rows_read,
        rows_used=len(loaded.images),
        notes=tuple(notes),
    )
