"""The study document's image fields: each mistake is one message naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from fedstudy_operator import builders

from fedstudy.spec import StudyError, check_local_files, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "apiVersion": "fedstudy.io/v1alpha1",
    "kind": "FederatedStudy",
    "metadata": {"name": "imaging"},
    "spec": {
        "task": {"label": "digit", "binarize": {"above": 4}},
        "model": {"name": "cnn", "channels": [8, 16]},
        "rounds": 2,
        "preprocessing": {"image": {"size": [28, 28], "augment": {"flip": True}}},
        "sites": [
            {"name": "a", "data": {"format": "builtin", "dataset": "digits"}},
            {"name": "b", "data": {"format": "images", "path": "b"}},
            {"name": "c", "data": {"format": "dicom", "path": "c", "labels": "l.csv"}},
        ],
    },
}


def changed(edit: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    edit(doc["spec"])
    return doc


def test_the_base_document_is_valid() -> None:
    study = parse_study(BASE)
    assert [s.data.is_image for s in study.spec.sites] == [True, True, True]
    assert study.spec.sites[1].data.fileColumn == "file"
    assert study.spec.sites[0].resources.device == "auto"
    assert study.spec.training.mixedPrecision is False
    # A document dumped with its defaults reads back the same (the operator and tests do it).
    again = parse_study(study.model_dump(mode="json", exclude_none=True))
    assert again == study


def _set(path: str, value: Any) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        node: Any = spec
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value

    return edit


BAD = [
    (
        _set("model.channels", []),
        "spec.model: a cnn needs the output channels of each convolution block in 'channels'",
    ),
    (_set("model.hidden", [4]), "spec.model: cnn has no 'hidden' layer sizes ([4])"),
    (_set("model", {"name": "densenet121", "channels": [4]}), "'channels' sizes the blocks"),
    (_set("model", {"name": "densenet121", "norm": "none"}), "densenet121 needs a normalisation"),
    (
        _set("model", {"name": "mlp", "hidden": [4], "norm": "group"}),
        "spec.model: 'norm' chooses the normalisation layers of cnn and densenet121",
    ),
    (
        _set("model", {"name": "mlp", "hidden": [4]}),
        "spec.sites[0].data.dataset: this site's data are images; model mlp reads tables",
    ),
    (
        _set("sites.1.data", {"format": "csv", "path": "x.csv"}),
        "spec.sites[1].data.format: model cnn reads images, but csv is a table",
    ),
    (
        _set("sites.0.data.dataset", "breast-cancer"),
        "spec.sites[0].data.dataset: model cnn reads images, but built-in dataset "
        "breast-cancer is a table",
    ),
    (_set("sites.1.data.path", None), "spec.sites[1].data: format images needs 'path'"),
    (_set("sites.1.data.header", False), "spec.sites[1].data: 'header' belongs to format csv"),
    (
        _set("sites.0.data.fileColumn", "name"),
        "spec.sites[0].data: 'fileColumn' belongs to formats images and dicom",
    ),
    (_set("sites.1.data.labels", ""), "spec.sites[1].data.labels: String should have at least"),
    (_set("sites.1.data.skipBadFiles", "yes"), "spec.sites[1].data.skipBadFiles: Input should"),
    (_set("preprocessing.image.size", [28]), "spec.preprocessing.image.size: List should have"),
    (_set("preprocessing.image.size", [0, 28]), "spec.preprocessing.image.size[0]: Input"),
    (_set("preprocessing.image.channels", 2), "spec.preprocessing.image.channels: Input should"),
    (_set("preprocessing.image.intensity", "hu"), "spec.preprocessing.image.intensity: Input"),
    (_set("preprocessing.image.augment.rotateDegrees", 270), "augment.rotateDegrees: Input"),
    (_set("preprocessing.image.augment.shear", 1), "augment.shear: unknown field"),
    (_set("preprocessing.image.window", {"center": 40, "width": 0.5}), "window.width: Input"),
    (_set("preprocessing.drop", ["x"]), "spec.preprocessing.drop: applies to tables"),
    (
        lambda s: s.update(
            model={"name": "cnn", "channels": [4], "norm": "batch"},
            privacy={"targetEpsilon": 1.0, "delta": 1e-5},
        ),
        "spec.model.norm: BatchNorm mixes the rows of a batch, so DP-SGD (spec.privacy) "
        "cannot bound one row's influence; use norm group",
    ),
    (_set("sites.0.resources", {"device": "gpu0"}), "device must be auto, cpu, cuda or cuda:N"),
    (
        _set("sites.0.resources", {"gpu": 1, "device": "cpu"}),
        "spec.sites[0].resources.device: device cpu would leave the 1 GPU(s) requested",
    ),
    (
        _set("sites.0.resources", {"gpu": 2, "device": "cuda:2"}),
        "spec.sites[0].resources.device: cuda:2 is not among the GPUs the pod gets: gpu 2 "
        "gives cuda:0 to cuda:1",
    ),
    (_set("training.mixedPrecision", "on"), "spec.training.mixedPrecision: Input should be"),
]


@pytest.mark.parametrize(("edit", "message"), BAD)
def test_image_mistakes(edit: Any, message: str) -> None:
    with pytest.raises(StudyError) as err:
        parse_study(changed(edit))
    assert any(p.startswith(message) or message in p for p in err.value.problems), (
        err.value.problems
    )


def test_a_window_needs_a_dicom_site_and_image_settings_need_images() -> None:
    def no_dicom(spec: dict[str, Any]) -> None:
        spec["sites"].pop()
        spec["preprocessing"]["image"]["window"] = {"center": 40, "width": 400}

    with pytest.raises(StudyError, match=r"spec\.preprocessing\.image\.window: a window applies"):
        parse_study(changed(no_dicom))

    def tables(spec: dict[str, Any]) -> None:
        spec["model"] = {"name": "mlp", "hidden": [4]}
        spec["sites"] = [{"name": "a", "data": {"format": "builtin", "dataset": "breast-cancer"}}]

    with pytest.raises(StudyError, match=r"spec\.preprocessing\.image: applies to images"):
        parse_study(changed(tables))


def test_local_files_of_image_sites(tmp_path: Path) -> None:
    study = parse_study(BASE)
    with pytest.raises(StudyError) as err:
        check_local_files(study, tmp_path)
    assert err.value.problems == [
        f"spec.sites[1].data.path: no such folder: {tmp_path / 'b'}",
        f"spec.sites[2].data.path: no such folder: {tmp_path / 'c'}",
    ]
    (tmp_path / "b").mkdir()
    (tmp_path / "c").write_text("a file, not a folder")
    with pytest.raises(StudyError) as err:
        check_local_files(study, tmp_path)
    assert err.value.problems == [
        f"spec.sites[1].data.labels (default labels.csv): no such file: "
        f"{tmp_path / 'b' / 'labels.csv'}",
        f"spec.sites[2].data.path: not a folder: {tmp_path / 'c'}",
    ]
    (tmp_path / "b" / "labels.csv").write_text("file,digit\n")
    (tmp_path / "c").unlink()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "l.csv").write_text("file,digit\n")
    check_local_files(study, tmp_path)


def test_examples_validate() -> None:
    for name in ("digits-cnn", "chest-xray"):
        study = load_study(ROOT / "examples" / f"{name}.yaml")
        assert study.spec.model.name in ("cnn", "densenet121")
    chest = load_study(ROOT / "examples" / "chest-xray.yaml")
    assert all(s.resources.gpu == 1 for s in chest.spec.sites)
    assert builders.data_path_problems(chest) == []


def test_a_labels_file_outside_the_mounted_folder_is_refused_by_the_operator() -> None:
    def outside(spec: dict[str, Any]) -> None:
        spec["sites"][2]["data"] = {"format": "dicom", "path": "/data/ct", "labels": "/labels.csv"}

    problems = builders.data_path_problems(parse_study(changed(outside)))
    assert [p for p in problems if ".data.labels" in p] == [
        "spec.sites[2].data.labels: /labels.csv lies outside the data directory /data that "
        "the trainer's pod mounts; keep the labels CSV in the image folder (a path relative "
        "to it)"
    ]
