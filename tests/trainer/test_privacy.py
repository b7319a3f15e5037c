"""DP-SGD at a site: clipping, noise, calibration, the ledger and the checks of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fedstudy_trainer.models import build_model, get_weights
from fedstudy_trainer.privacy import (
    LEDGER_FILE,
    BudgetExhausted,
    DPSettings,
    Ledger,
    PrivacyError,
    Run,
    SitePrivacy,
    calibrate,
    check_model,
    choose_mode,
    epsilon_of,
    train_private,
)
from fedstudy_trainer.train import train_local
from opacus.accountants import RDPAccountant
from torch import nn
from torch.nn import functional
from trainer_support import breast_cancer_sites, make_study

from fedstudy.spec import Model, Privacy, Training

SGD1 = Training(localSteps=1, batchSize=8, optimizer="sgd", learningRate=1.0)


def data(n: int = 64, features: int = 13, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32) * 3
    y = (x[:, 0] + rng.normal(size=n) > 0).astype(np.float32)
    return x, y


def mlp(features: int = 13, hidden: int = 32) -> nn.Module:
    return build_model(Model(name="mlp", hidden=[hidden]), features, seed=3)


def per_sample_grads(model: nn.Module, x: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
    """Each row's gradient, flattened, computed one row at a time without Opacus."""
    grads = []
    for i in range(len(y)):
        model.zero_grad()
        logit = model(torch.from_numpy(x[i : i + 1]))
        functional.binary_cross_entropy_with_logits(
            logit, torch.from_numpy(y[i : i + 1])
        ).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
    return grads


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_each_rows_gradient_is_clipped(mode: str) -> None:
    """With every row sampled and no noise, one SGD step (lr 1) moves the weights by minus the
    mean of the rows' clipped gradients: the update matches the clipped mean computed
    independently, and not the unclipped one."""
    x, y = data(16)
    clip = 0.05
    model = mlp()
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    grads = per_sample_grads(model, x, y)
    norms = torch.stack([g.norm() for g in grads])
    assert (norms > clip).all(), "the test needs gradients above the bound"
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in grads]
    assert max(float(g.norm()) for g in clipped) <= clip * (1 + 1e-5)
    settings = DPSettings(noise=0.0, sample_rate=1.0, max_grad_norm=clip, expected_batch_size=16)
    train_private(model, x, y, SGD1, settings, seed=0, steps=1, mode=mode)  # type: ignore[arg-type]
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    step = before - after
    assert torch.allclose(step, torch.stack(clipped).mean(0), atol=1e-6)
    assert not torch.allclose(step, torch.stack(grads).mean(0), atol=1e-3)
    assert float(step.norm()) <= clip * (1 + 1e-5)


def test_noise_is_added_at_the_expected_scale() -> None:
    """Same seed and rows, with and without noise: after one step (lr 1) the weights differ by
    noise of standard deviation noise * maxGradNorm / expected batch size per coordinate."""
    x, y = data(64, features=30)
    settings = DPSettings(noise=1.5, sample_rate=0.25, max_grad_norm=1.0, expected_batch_size=16)
    silent = DPSettings(noise=0.0, sample_rate=0.25, max_grad_norm=1.0, expected_batch_size=16)
    noisy_model, quiet_model, plain_model = mlp(30, 64), mlp(30, 64), mlp(30, 64)
    train_private(noisy_model, x, y, SGD1, settings, seed=7, steps=1)
    train_private(quiet_model, x, y, SGD1, silent, seed=7, steps=1)
    train_local(plain_model, x, y, SGD1, seed=7)
    noisy, quiet = get_weights(noisy_model), get_weights(quiet_model)
    diff = np.concatenate([(noisy[k] - quiet[k]).ravel() for k in noisy])
    expected = 1.5 * 1.0 / 16
    assert diff.size > 2000
    assert abs(float(diff.std()) / expected - 1) < 0.1
    assert abs(float(diff.mean())) < 4 * expected / math.sqrt(diff.size)
    plain = get_weights(plain_model)
    assert any(not np.allclose(plain[k], noisy[k]) for k in plain)


def test_weights_keep_the_plain_names_and_no_hook_stays() -> None:
    x, y = data()
    model = mlp()
    names = {k: v.shape for k, v in get_weights(model).items()}
    settings = DPSettings(noise=1.0, sample_rate=0.2, max_grad_norm=1.0, expected_batch_size=12.8)
    for mode in ("ghost", "hooks", "ghost"):  # wrapped again and again: no hook piles up
        train_private(model, x, y, SGD1, settings, seed=1, steps=3, mode=mode)  # type: ignore[arg-type]
        assert {k: v.shape for k, v in get_weights(model).items()} == names
        for sub in model.modules():
            assert not sub._forward_hooks
            assert not sub._backward_hooks
            assert not getattr(sub, "_full_backward_hooks", None)
        assert all(
            not hasattr(p, "grad_sample") or p.grad_sample is None for p in model.parameters()
        )
    assert not any(k.startswith("_module.") for k in model.state_dict())


def test_empty_poisson_batches_still_get_noise() -> None:
    x, y = data(4)
    model = mlp()
    before = get_weights(model)
    tiny = DPSettings(noise=1.0, sample_rate=1e-9, max_grad_norm=1.0, expected_batch_size=4e-9)
    result = train_private(model, x, y, Training(learningRate=1e-12), tiny, seed=0, steps=2)
    assert math.isnan(result.loss)  # no row was ever sampled
    after = get_weights(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_mode_follows_the_layers() -> None:
    assert choose_mode(mlp()) == "ghost"
    assert choose_mode(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))) in (
        "ghost",
        "hooks",
    )
    assert choose_mode(nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1))) == "hooks"


def test_calibrated_noise_meets_the_target_and_no_less_noise_would() -> None:
    privacy = Privacy(targetEpsilon=1.0, delta=1e-3, maxGradNorm=1.0)
    noise = calibrate(privacy, 0.05, 500)
    eps = epsilon_of([Run(noise, 0.05, 500)], 1e-3, "rdp")
    assert eps <= 1.0
    assert eps > 0.95
    assert epsilon_of([Run(noise * 0.9, 0.05, 500)], 1e-3, "rdp") > 1.0
    for accountant in ("prv", "gdp"):
        p = Privacy(targetEpsilon=1.0, delta=1e-3, maxGradNorm=1.0, accountant=accountant)
        n = calibrate(p, 0.05, 500)
        assert epsilon_of([Run(n, 0.05, 500)], 1e-3, accountant) <= 1.0


def test_epsilon_matches_an_independent_opacus_accountant() -> None:
    runs = [Run(1.1, 0.05, 30), Run(0.9, 0.1, 12), Run(1.1, 0.05, 7)]
    acc = RDPAccountant()
    for r in runs:
        for _ in range(r.steps):
            acc.step(noise_multiplier=r.noise, sample_rate=r.sample_rate)
    assert epsilon_of(runs, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)
    with pytest.raises(PrivacyError, match="gdp cannot compose"):
        epsilon_of(runs, 1e-5, "gdp")


def dp_study(tmp_path: Path, **privacy: float | str) -> SitePrivacy:
    study = make_study(
        breast_cancer_sites(2),
        rounds=3,
        privacy={"targetEpsilon": 2.0, "delta": 1e-4, "maxGradNorm": 1.0, **privacy},
    )
    return SitePrivacy.create(study.spec, study.name, "site-0", 200, mlp(), tmp_path)


def test_ledger_survives_a_restart_and_refuses_another_owner(tmp_path: Path) -> None:
    x, y = data(200)
    site = dp_study(tmp_path)
    training = Training(localSteps=5, batchSize=8, learningRate=0.1)
    site.train_round(mlp(), x, y, training, round_=1, seed=1)
    first = site.epsilon()
    ledger = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert ledger["runs"] == [{"noise": site.settings.noise, "sample_rate": 0.04, "steps": 5}]
    assert ledger["epsilon"] == pytest.approx(first)
    again = dp_study(tmp_path)  # a restarted trainer
    assert again.epsilon() == pytest.approx(first, abs=0)
    again.train_round(mlp(), x, y, training, round_=1, seed=1)  # the same round, charged again
    assert again.epsilon() > first
    assert again.ledger.rounds == [1, 1]
    with pytest.raises(PrivacyError, match="belongs to study"):
        Ledger.open(tmp_path / LEDGER_FILE, "other-study", "site-0")
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        dp_study(tmp_path)


def test_a_small_budget_stops_before_it_is_passed(tmp_path: Path) -> None:
    x, y = data(200)
    site = dp_study(tmp_path, noiseMultiplier=0.9)  # ε 1.69, 1.89, 2.03 after rounds 1-3
    training = Training(localSteps=5, batchSize=8, learningRate=0.1)
    trained = 0
    while not site.exhausted():
        trained += 1
        site.train_round(mlp(), x, y, training, round_=trained, seed=trained)
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted") as info:
        site.train_round(mlp(), x, y, training, round_=trained + 1, seed=0)
    assert "above the target 2" in str(info.value)
    assert trained == 2
    assert site.epsilon() <= 2.0
    assert site.epsilon_after_next_round() > 2.0
    assert site.ledger.steps == 5 * trained


def test_delta_must_be_below_one_over_the_rows(tmp_path: Path) -> None:
    study = make_study(
        breast_cancer_sites(2), privacy={"targetEpsilon": 1.0, "delta": 0.05, "maxGradNorm": 1.0}
    )
    with pytest.raises(PrivacyError) as info:
        SitePrivacy.create(study.spec, study.name, "site-0", 30, mlp(), tmp_path)
    message = str(info.value)
    assert "spec.privacy.delta" in message
    assert "0.05" in message
    assert "30 train rows" in message


def test_batchnorm_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(13, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    model.train()
    with pytest.raises(PrivacyError) as info:
        check_model(model)
    assert "layer 1 (BatchNorm1d)" in str(info.value)
    assert "GroupNorm" in str(info.value)
    check_model(mlp())


def test_a_budget_no_noise_can_meet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="targetEpsilon"):
        dp_study(tmp_path, targetEpsilon=1e-9)
