"""Image sites: PNG/JPEG and DICOM folders, built-in digits, transforms, bad input."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from fedstudy_trainer.data import DataError, load_site_data
from fedstudy_trainer.imaging import (
    Augmenter,
    ImageTransform,
    apply_window,
    builtin_images,
    dicom_values,
    read_dicom,
    read_picture,
)
from fedstudy_trainer.main import main as trainer_main
from imaging_support import (
    dicom_copy,
    digits,
    image_study_doc,
    shipped_dicom,
    write_dicom_folder,
    write_png_folder,
)
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_windowing

from fedstudy.spec import Augment, ImagePreprocessing, Window, parse_study

# --- DICOM values ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_rescale_matches_pydicom(name: str) -> None:
    path = shipped_dicom(name)
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    ours = dicom_values(path)
    assert ours.shape == ds.pixel_array.shape
    np.testing.assert_array_equal(ours, np.asarray(expected, dtype=np.float64))


def test_ct_values_are_hounsfield_units() -> None:
    path = shipped_dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    np.testing.assert_array_equal(dicom_values(path), ds.pixel_array.astype(np.float64) - 1024)


def _pydicom_window_01(ds: Any, values: np.ndarray) -> np.ndarray:
    """pydicom's windowing, mapped from its output range onto [0, 1]."""
    windowed = np.asarray(apply_windowing(values.copy(), ds), dtype=np.float64)
    if ds.PixelRepresentation == 0:
        low, high = 0.0, 2.0**ds.BitsStored - 1
    else:
        low, high = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return (windowed - low) / (high - low)


def test_mr_window_from_the_file_matches_pydicom() -> None:
    path = shipped_dicom("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    ours = read_dicom(path, window=None, channels=1)
    assert ours.shape == (1, 64, 64)
    assert ours.dtype == np.float32
    expected = _pydicom_window_01(ds, apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_allclose(ours[0], expected, atol=1e-6)


def test_ct_window_from_the_spec_matches_pydicom(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shipped_dicom("CT_small.dcm"))
    ours = read_dicom(shipped_dicom("CT_small.dcm"), Window(center=40, width=400), channels=1)
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window, in HU
    expected = _pydicom_window_01(ds, apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_allclose(ours[0], expected, atol=1e-6)
    assert 0 < (ours == 0).mean() < 1  # air is black, some tissue is in the window


def test_dicom_without_window_uses_its_range_and_monochrome1_is_inverted(
    tmp_path: Path,
) -> None:
    values = dicom_values(shipped_dicom("CT_small.dcm"))
    plain = read_dicom(shipped_dicom("CT_small.dcm"), None, channels=3)
    assert plain.shape == (3, 128, 128)
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(plain[0], expected, atol=1e-6)
    np.testing.assert_array_equal(plain[0], plain[2])
    ds = pydicom.dcmread(shipped_dicom("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    inverted = read_dicom(tmp_path / "inverted.dcm", None, channels=1)
    np.testing.assert_allclose(inverted[0], 1 - expected, atol=1e-6)


def test_window_functions_follow_the_standard() -> None:
    x = np.array([-1000.0, 39.5, 40.0, 240.0, 1000.0])
    linear = apply_window(x, 40, 400)
    assert linear[0] == 0.0
    assert linear[-1] == 1.0
    assert linear[2] == pytest.approx((40 - 39.5) / 399 + 0.5)
    exact = apply_window(x, 40, 400, "LINEAR_EXACT")
    assert exact[3] == pytest.approx(1.0)
    sigmoid = apply_window(x, 40, 400, "SIGMOID")
    assert sigmoid[2] == pytest.approx(0.5)


# --- PNG / JPEG ---------------------------------------------------------------------------


def test_png_values(tmp_path: Path) -> None:
    images, _ = digits(3)
    Image.fromarray(images[0], mode="L").save(tmp_path / "a.png")
    out = read_picture(tmp_path / "a.png", channels=1)
    assert out.shape == (1, 8, 8)
    np.testing.assert_array_equal(out[0], images[0].astype(np.float32) / 255)
    rgb = read_picture(tmp_path / "a.png", channels=3)
    assert rgb.shape == (3, 8, 8)
    deep = (images[1].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "b.png")  # 16-bit grayscale
    out16 = read_picture(tmp_path / "b.png", channels=1)
    np.testing.assert_allclose(out16[0], deep / 65535, atol=1e-7)
    colour = np.stack([images[2], images[2] // 2, np.zeros_like(images[2])], axis=-1)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "c.jpg", quality=95)
    gray = read_picture(tmp_path / "c.jpg", channels=1)
    assert gray.shape == (1, 8, 8)
    assert float(gray.min()) >= 0.0
    assert float(gray.max()) <= 1.0


def test_png_folder_site(tmp_path: Path) -> None:
    images, labels = write_png_folder(tmp_path / "site", count=40)
    doc = image_study_doc([{"name": "a", "data": {"format": "images", "path": "site"}}])
    data = load_site_data(parse_study(doc), "a", tmp_path)
    assert data.input_shape == (1, 8, 8)
    assert (data.n_train, data.n_test) == (30, 10)
    assert data.rows_read == data.rows_used == 40
    assert data.feature_names == ()
    everything = np.concatenate([data.X_train, data.X_test])
    # Each loaded image is one of the digits written, scaled to [0, 1].
    written = {(img.astype(np.float32) / 255).tobytes() for img in images}
    assert {x[0].tobytes() for x in everything} <= written
    positives = float((labels > 4).sum())
    assert float(data.y_train.sum() + data.y_test.sum()) == positives


def test_resize_and_intensity(tmp_path: Path) -> None:
    write_png_folder(tmp_path / "site", count=20)
    image = {"size": [16, 12], "channels": 3, "intensity": "zscore"}
    doc = image_study_doc(
        [{"name": "a", "data": {"format": "images", "path": "site"}}], image=image
    )
    data = load_site_data(parse_study(doc), "a", tmp_path)
    assert data.input_shape == (3, 16, 12)
    assert np.allclose(data.X_train.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    minmax = ImageTransform(ImagePreprocessing(intensity="minmax"))
    out = minmax(np.array([[[2.0, 4.0], [6.0, 10.0]]], dtype=np.float32))
    np.testing.assert_allclose(out, [[[0.0, 0.25], [0.5, 1.0]]])


def test_dicom_folder_site(tmp_path: Path) -> None:
    rows = write_dicom_folder(tmp_path / "scans", per_class=6)
    doc = image_study_doc(
        [{"name": "a", "data": {"format": "dicom", "path": str(tmp_path / "scans")}}],
        label="ct",
        binarize=None,
        image={"size": [32, 32]},
    )
    data = load_site_data(parse_study(doc), "a", tmp_path)
    assert data.input_shape == (1, 32, 32)
    assert data.rows_used == len(rows) == 12
    assert float(data.y_train.sum() + data.y_test.sum()) == 6
    assert float(data.X_train.min()) >= 0.0
    assert float(data.X_train.max()) <= 1.0


def test_builtin_digits_shares() -> None:
    images, _target = builtin_images("digits")
    assert images.shape == (1797, 1, 8, 8)
    assert float(images.max()) == 1.0
    sites = [
        {
            "name": f"s{i}",
            "data": {
                "format": "builtin",
                "dataset": "digits",
                "partition": {"index": i, "count": 3, "labelSkew": 0.5, "seed": 1},
            },
        }
        for i in range(3)
    ]
    study = parse_study(image_study_doc(sites))
    shares = [load_site_data(study, f"s{i}", Path(".")) for i in range(3)]
    assert sum(d.n_train + d.n_test for d in shares) == 1797
    rates = [float(np.concatenate([d.y_train, d.y_test]).mean()) for d in shares]
    assert rates[0] < rates[1] < rates[2]  # label skew: positives move to the last site
    assert shares[0].source == "builtin:digits (share 0 of 3, seed 1)"


def test_digits_need_a_binary_label() -> None:
    site = {"name": "a", "data": {"format": "builtin", "dataset": "digits"}}
    study = parse_study(image_study_doc([site], binarize=None))
    with pytest.raises(DataError, match=r"label column 'digit' is not binary .*task.binarize"):
        load_site_data(study, "a", Path("."))


# --- augmentation -------------------------------------------------------------------------


def test_augmentation_is_reproducible_from_the_seed() -> None:
    batch = torch.from_numpy(builtin_images("digits")[0][:6])
    augmenter = Augmenter(
        Augment(flip=True, rotateDegrees=15, shift=0.1, zoom=0.1), (8, 8), torch.device("cpu")
    )
    augmenter.reseed(11)
    first = augmenter(batch)
    augmenter.reseed(11)
    again = augmenter(batch)
    augmenter.reseed(12)
    other = augmenter(batch)
    assert type(first) is torch.Tensor
    assert first.shape == batch.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, batch)


# --- bad input ----------------------------------------------------------------------------


def _bad_unreadable(folder: Path) -> str:
    (folder / "d001.png").write_bytes(b"this is not a picture")
    return "d001.png: cannot read as an image"


def _bad_missing_file(folder: Path) -> str:
    (folder / "d003.png").unlink()
    return "d003.png: no such file"


def _bad_shape(folder: Path) -> str:
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8), mode="L").save(folder / "d005.png")
    return "d005.png: an image of 10x12 pixels (height x width), but"


def _bad_no_label(folder: Path) -> str:
    labels = folder / "labels.csv"
    labels.write_text(re.sub(r"^d007\.png,\d+$", "d007.png,", labels.read_text(), flags=re.M))
    return "d007.png: no label"


BAD_PNG = {
    "unreadable": _bad_unreadable,
    "missing-file": _bad_missing_file,
    "wrong-shape": _bad_shape,
    "no-label": _bad_no_label,
}


def _png_site(tmp_path: Path, skip: bool = False) -> Any:
    data: dict[str, Any] = {"format": "images", "path": "site"}
    if skip:
        data["skipBadFiles"] = True
    return parse_study(image_study_doc([{"name": "a", "data": data}]))


@pytest.mark.parametrize("case", list(BAD_PNG))
def test_a_bad_image_is_an_error_naming_the_file(tmp_path: Path, case: str) -> None:
    write_png_folder(tmp_path / "site", count=40)
    expected = BAD_PNG[case](tmp_path / "site")
    with pytest.raises(DataError) as err:
        load_site_data(_png_site(tmp_path), "a", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "site") in message
    assert expected in message
    assert "labels.csv" in message  # and the row that names it
    assert "skipBadFiles" in message


@pytest.mark.parametrize("case", list(BAD_PNG))
def test_a_bad_image_is_skipped_and_counted_when_configured(tmp_path: Path, case: str) -> None:
    write_png_folder(tmp_path / "site", count=40)
    expected = BAD_PNG[case](tmp_path / "site")
    data = load_site_data(_png_site(tmp_path, skip=True), "a", tmp_path)
    assert (data.rows_read, data.rows_used) == (40, 39)
    assert data.n_train + data.n_test == 39
    [note] = data.notes
    assert note.startswith("skipped 1 of 40 images (skipBadFiles): ")
    assert expected in note


def test_a_dicom_without_pixel_data_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    write_dicom_folder(folder, per_class=4)
    ds = dicom_copy("CT_small.dcm", 0)
    del ds.PixelData
    ds.save_as(folder / "ct-1.dcm")
    doc = image_study_doc(
        [{"name": "a", "data": {"format": "dicom", "path": str(folder)}}],
        label="ct",
        binarize=None,
        image={"size": [32, 32]},
    )
    with pytest.raises(DataError, match=r"scans/ct-1\.dcm: no pixel data \(Modality CT"):
        load_site_data(parse_study(doc), "a", tmp_path)


def test_dicom_problems_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(Exception, match="not a DICOM file"):
        read_dicom(tmp_path / "junk.dcm", None, 1)
    ds = pydicom.dcmread(shipped_dicom("MR_small.dcm"))
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "frames.dcm")
    with pytest.raises(Exception, match="2 frames: a site reads 2-D images"):
        read_dicom(tmp_path / "frames.dcm", None, 1)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("name,digit\nd001.png,1\n", "no column 'file' (data.fileColumn); the labels file has"),
        ("file,number\nd001.png,1\n", "no column 'digit' (task.label)"),
        ("file,digit\n", "the labels file lists no image"),
        ("file,digit\nd001.png,3\nd001.png,5\n", "file 'd001.png' is listed twice"),
        (
            "file,digit\nd001.png,seven\n",
            "label 'seven' of 'd001.png' (column 'digit', data row 1)",
        ),
    ],
    ids=["no-file-column", "no-label-column", "empty", "twice", "not-a-number"],
)
def test_labels_file_problems(tmp_path: Path, labels: str, message: str) -> None:
    write_png_folder(tmp_path / "site", count=4)
    (tmp_path / "site" / "labels.csv").write_text(labels)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_site_data(_png_site(tmp_path), "a", tmp_path)


def test_trainer_stops_at_start_on_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data is read before the trainer joins: a bad file stops it with exit 2, naming it,
    without ever reaching an aggregator (none listens at the address given)."""
    import yaml

    write_png_folder(tmp_path / "site", count=40)
    _bad_unreadable(tmp_path / "site")
    study = tmp_path / "study.yaml"
    doc = image_study_doc([{"name": "a", "data": {"format": "images", "path": "site"}}])
    study.write_text(yaml.safe_dump(doc))
    code = trainer_main(
        [
            "--study",
            str(study),
            "--site",
            "a",
            "--aggregator",
            "127.0.0.1:9",
            "--state-dir",
            str(tmp_path / "state"),
            "--insecure",
            "--connect-timeout",
            "1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'site' / 'd001.png'}: cannot read as an image" in err
