"""Image models under DP-SGD, and the device and precision a site trains with."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fedstudy_trainer.client import SiteTrainer
from fedstudy_trainer.cnn import SmallCNN, group_count
from fedstudy_trainer.data import load_site_data
from fedstudy_trainer.main import main as trainer_main
from fedstudy_trainer.models import build_model, get_weights, set_weights
from fedstudy_trainer.privacy import (
    DPSettings,
    PrivacyError,
    SitePrivacy,
    check_model,
    choose_mode,
    train_private,
)
from fedstudy_trainer.runtime import (
    CPU,
    DeviceError,
    Runtime,
    amp_dtype,
    choose_device,
    cuda_device_count,
    site_runtime,
)
from fedstudy_trainer.train import evaluate, train_local
from imaging_support import image_study_doc
from opacus.validators import ModuleValidator  # type: ignore[import-untyped]
from torch import nn

from fedstudy.spec import Model, StudyError, Training, parse_study

CNN = Model(name="cnn", channels=[8, 16])
PRIVACY = {"targetEpsilon": 3.0, "delta": 1e-4, "maxGradNorm": 1.0}


def _norms(model: nn.Module) -> set[type[nn.Module]]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm)
    return {type(m) for m in model.modules() if isinstance(m, kinds)}


def _images(n: int = 24, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, size, size), dtype=np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > x[:, 0, 4:].mean(axis=(1, 2))).astype(np.float32)
    return x, y


# --- models and DP ------------------------------------------------------------------------


def test_cnn_takes_groupnorm_under_dp_and_opacus_accepts_it() -> None:
    private = build_model(CNN, (1, 8, 8), seed=0, private=True)
    assert _norms(private) == {nn.GroupNorm}
    assert ModuleValidator.validate(private, strict=False) == []
    check_model(private)
    plain = build_model(CNN, (1, 8, 8), seed=0)
    assert _norms(plain) == {nn.BatchNorm2d}
    assert _norms(build_model(CNN.model_copy(update={"norm": "none"}), (1, 8, 8))) == set()


def test_groups_divide_the_channels() -> None:
    assert [group_count(c) for c in (1, 4, 8, 12, 16, 10, 7)] == [1, 4, 8, 4, 8, 2, 1]


def test_a_batchnorm_model_under_dp_names_the_layer_and_the_fix(tmp_path: Path) -> None:
    model = build_model(CNN.model_copy(update={"norm": "batch"}), (1, 8, 8), seed=0)
    with pytest.raises(PrivacyError) as err:
        check_model(model)
    message = str(err.value)
    assert "layer features.0.1 (BatchNorm2d): BatchNorm mixes the rows of a batch" in message
    assert "layer features.1.1 (BatchNorm2d)" in message
    assert "set spec.model.norm to group" in message
    # The study document says so before any trainer starts.
    site = {"name": "a", "data": {"format": "builtin", "dataset": "digits"}}
    doc = image_study_doc(
        [site], model={"name": "cnn", "channels": [8], "norm": "batch"}, privacy=PRIVACY
    )
    with pytest.raises(StudyError, match=r"spec\.model\.norm: BatchNorm mixes the rows"):
        parse_study(doc)


def test_dp_sgd_trains_the_cnn(tmp_path: Path) -> None:
    x, y = _images(48)
    model = build_model(CNN, (1, 8, 8), seed=1, private=True)
    assert choose_mode(model) == "hooks"  # Opacus has no norm sampler for Conv2d
    before = get_weights(model)
    settings = DPSettings(noise=1.0, sample_rate=0.25, max_grad_norm=1.0, expected_batch_size=12)
    result = train_private(model, x, y, Training(learningRate=0.1), settings, seed=3, steps=4)
    after = get_weights(model)
    assert result.steps == 4
    assert np.isfinite(result.loss)
    assert list(after) == list(before)  # plain names: nothing of Opacus stays on the model
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_site_privacy_accepts_the_cnn_of_a_dp_study(tmp_path: Path) -> None:
    site = {"name": "a", "data": {"format": "builtin", "dataset": "digits"}}
    study = parse_study(image_study_doc([site], privacy=PRIVACY))
    data = load_site_data(study, "a", tmp_path)
    model = build_model(study.spec.model, data.input_shape, 0, private=True)
    sp = SitePrivacy.create(study.spec, study.name, "a", data.n_train, model, tmp_path)
    assert sp.mode == "hooks"
    assert sp.settings.noise > 0


def test_densenet121_with_groupnorm_trains_under_dp() -> None:
    model = build_model(Model(name="densenet121"), (1, 32, 32), seed=0, private=True)
    assert _norms(model) == {nn.GroupNorm}
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = _images(4, size=32)
    with torch.no_grad():
        assert model(torch.from_numpy(x)).shape == (4,)
    settings = DPSettings(noise=1.0, sample_rate=0.5, max_grad_norm=1.0, expected_batch_size=2)
    before = get_weights(model)
    result = train_private(model, x, y, Training(learningRate=0.01), settings, seed=0, steps=1)
    assert result.steps == 1
    after = get_weights(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_densenet121_needs_32_pixels() -> None:
    with pytest.raises(ValueError, match=r"densenet121 needs images of at least 32x32 pixels"):
        build_model(Model(name="densenet121"), (1, 8, 8))
    site = {"name": "a", "data": {"format": "builtin", "dataset": "digits"}}
    study = parse_study(image_study_doc([site], model={"name": "densenet121"}))
    with pytest.raises(Exception, match=r"builtin:digits .*set spec\.preprocessing\.image\.size"):
        load_site_data(study, "a", Path("."))


def test_image_weights_round_trip() -> None:
    model = build_model(CNN, (1, 8, 8), seed=4)
    weights = get_weights(model)
    assert "features.0.1.num_batches_tracked" in weights  # BatchNorm buffers travel too
    other = build_model(CNN, (1, 8, 8), seed=5)
    set_weights(other, weights)
    x, _ = _images(5)
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(x)), other(torch.from_numpy(x)))


def test_small_cnn_on_one_pixel_images() -> None:
    model = SmallCNN(1, (1, 1), [4, 4], "group")
    assert model(torch.zeros(3, 1, 1, 1)).shape == (3,)


# --- device and precision -----------------------------------------------------------------


def test_choose_device() -> None:
    assert choose_device("auto", 0) == torch.device("cpu")
    assert choose_device("auto", 2) == torch.device("cuda", 0)
    assert choose_device("cpu", 2) == torch.device("cpu")
    assert choose_device("cuda", 1) == torch.device("cuda", 0)
    assert choose_device("cuda:1", 2) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"device cuda: this machine has no CUDA device"):
        choose_device("cuda", 0)
    with pytest.raises(DeviceError, match=r"device cuda:2: this machine has 2 CUDA device\(s\)"):
        choose_device("cuda:2", 2)


def test_mixed_precision_choice() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert amp_dtype(cpu, True, False, True) is None  # never on a CPU
    assert amp_dtype(cuda, False, False, True) is None
    assert amp_dtype(cuda, True, False, True) == torch.bfloat16
    assert amp_dtype(cuda, True, True, True) == torch.bfloat16
    assert amp_dtype(cuda, True, False, False) == torch.float16
    assert amp_dtype(cuda, True, True, False) is None  # DP cannot take a loss scale
    assert Runtime(cuda, torch.float16).loss_scaling
    assert not Runtime(cuda, torch.bfloat16).loss_scaling


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_this_machine_trains_on_its_cpu() -> None:
    runtime = site_runtime("auto", mixed_precision=True, private=False)
    assert runtime.device == torch.device("cpu")
    assert runtime.dtype is None
    assert runtime.describe()["pinned_memory"] is False
    assert "not used on a CPU" in runtime.notes[0]
    with pytest.raises(DeviceError, match="no CUDA device"):
        site_runtime("cuda:0", mixed_precision=False, private=False)


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_a_site_asking_for_cuda_here_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = {
        "name": "a",
        "data": {"format": "builtin", "dataset": "digits"},
        "resources": {"device": "cuda"},
    }
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(image_study_doc([site])))
    args = ["--study", str(study), "--site", "a", "--aggregator", "127.0.0.1:9"]
    args += ["--state-dir", str(tmp_path / "state"), "--insecure"]
    assert trainer_main(args) == 2
    err = capsys.readouterr().err
    assert "spec.sites[0].resources.device: device cuda: this machine has no CUDA device" in err


def test_runtime_batches_are_the_rows_asked_for() -> None:
    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    y = torch.arange(10, dtype=torch.float32)
    rows = [np.array([3, 1, 4]), np.array([], dtype=np.int64), np.array([9])]
    got = list(CPU.batches(x, y, iter(rows)))
    assert [b[1].tolist() for b in got] == [[3.0, 1.0, 4.0], [], [9.0]]
    assert torch.equal(got[0][0], x[[3, 1, 4]])


def test_the_mixed_precision_path_runs_and_stays_close() -> None:
    """The autocast path, exercised on the CPU with bfloat16 (sites use it on CUDA only)."""
    x, y = _images(64)
    training = Training(localSteps=10, batchSize=16, learningRate=0.05)
    bf16 = Runtime(torch.device("cpu"), torch.bfloat16)
    full, mixed = (build_model(CNN, (1, 8, 8), seed=2) for _ in range(2))
    train_local(full, x, y, training, seed=5)
    result = train_local(mixed, x, y, training, seed=5, runtime=bf16)
    assert np.isfinite(result.loss)
    a, b = get_weights(full), get_weights(mixed)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=0.05, rtol=0.05, err_msg=name)
    assert evaluate(mixed, x, y, bf16)["loss"] == pytest.approx(
        evaluate(mixed, x, y)["loss"], abs=0.02
    )
    private = build_model(CNN, (1, 8, 8), seed=2, private=True)
    settings = DPSettings(noise=0.5, sample_rate=0.25, max_grad_norm=1.0, expected_batch_size=16)
    out = train_private(private, x, y, training, settings, seed=1, steps=3, runtime=bf16)
    assert out.steps == 3
    fp16 = Runtime(torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="float16 loss scaling"):
        train_private(private, x, y, training, settings, seed=1, steps=1, runtime=fp16)


def test_trainer_logs_its_device(tmp_path: Path) -> None:
    site = {"name": "a", "data": {"format": "builtin", "dataset": "digits"}}
    study = parse_study(image_study_doc([site], privacy=PRIVACY))
    data = load_site_data(study, "a", tmp_path)
    trainer = SiteTrainer(
        study, "a", data, stub=None, state_dir=tmp_path, logger=logging.getLogger("t")
    )  # type: ignore[arg-type]
    assert trainer.runtime.device.type in ("cpu", "cuda")
    assert _norms(trainer.model) == {nn.GroupNorm}
    assert trainer.augment is None  # the study asks for no augmentation
