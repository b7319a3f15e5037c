"""Helpers of the imaging tests: image folders made from real images that packages ship.

- PNG folders from scikit-learn's handwritten digits (8x8, 17 grey levels);
- DICOM folders from the CT and MR images in pydicom's wheel (``CT_small.dcm``: 128x128,
  rescale intercept -1024; ``MR_small.dcm``: 64x64 with a window), each copy's pixels
  shifted so that no two files are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from sklearn.datasets import load_digits


def shipped_dicom(name: str) -> Path:
    """A DICOM file from pydicom's wheel (only names the wheel ships: nothing downloads)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom ships no {name}"
    return Path(str(path))


def digits(count: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The first ``count`` digits as 8-bit images (grey level x 15) and their digit."""
    bunch = load_digits()
    images = (np.asarray(bunch.images[:count]) * 15).astype(np.uint8)
    return images, np.asarray(bunch.target[:count], dtype=np.int64)


def write_png_folder(
    folder: Path, count: int = 40, label_column: str = "digit", file_column: str = "file"
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """``count`` digits as PNG files in ``folder`` (some in a subfolder) with labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "more").mkdir(exist_ok=True)
    images, labels = digits(count)
    rows = [f"{file_column},{label_column}"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"d{i:03d}.png" if i % 2 else f"more/d{i:03d}.png"
        Image.fromarray(image, mode="L").save(folder / name)
        rows.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return images, labels


def dicom_copy(source: str, shift: int) -> Any:
    """A shipped DICOM dataset with its pixels rolled by ``shift`` (a distinct image)."""
    ds = pydicom.dcmread(shipped_dicom(source))
    pixels = np.roll(ds.pixel_array, shift, axis=1)
    ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    return ds


def write_dicom_folder(folder: Path, per_class: int = 6) -> list[tuple[str, int]]:
    """CT copies (label 1) and MR copies (label 0) with labels.csv: (file, label) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    for i in range(per_class):
        for source, label in (("CT_small.dcm", 1), ("MR_small.dcm", 0)):
            name = f"{source.split('_')[0].lower()}-{i}.dcm"
            dicom_copy(source, 3 * i).save_as(folder / name)
            rows.append((name, label))
    lines = ["file,ct", *(f"{n},{label}" for n, label in rows)]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return rows


def image_study_doc(
    sites: list[dict[str, Any]],
    *,
    label: str = "digit",
    binarize: float | None = 4,
    model: dict[str, Any] | None = None,
    image: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    task: dict[str, Any] = {"type": "binary-classification", "label": label}
    if binarize is not None:
        task["binarize"] = {"above": binarize}
    body: dict[str, Any] = {
        "task": task,
        "model": model or {"name": "cnn", "channels": [4, 8]},
        "rounds": 2,
        "training": {"localSteps": 3, "batchSize": 8, "optimizer": "sgd", "learningRate": 0.1},
        "preprocessing": {"testFraction": 0.25, "image": image or {}},
        "sites": sites,
    }
    body.update(spec)
    return {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": "imaging-test"},
        "spec": body,
    }
