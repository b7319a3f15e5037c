"""Models, local training, FedProx, evaluation and the local-only baseline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fedstudy_trainer.data import load_site_data
from fedstudy_trainer.models import build_model, get_weights, set_weights
from fedstudy_trainer.train import (
    derive_seed,
    evaluate,
    local_baseline,
    minibatches,
    train_local,
)
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from torch.optim.optimizer import register_optimizer_step_post_hook
from trainer_support import breast_cancer_sites, make_study

from fedstudy.spec import Model, Training
from fedstudy.tensors import signature

LOGREG = Model(name="logistic-regression")
SGD = Training(localSteps=50, batchSize=8, optimizer="sgd", learningRate=0.1)


def _blobs(n: int = 80, features: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two separable clouds: label 1 around +2, label 0 around -2 on every feature."""
    rng = np.random.default_rng(seed)
    y = np.tile([0.0, 1.0], n // 2).astype(np.float32)
    x = rng.normal(0, 0.5, (n, features)) + np.where(y[:, None] == 1, 2.0, -2.0)
    return x.astype(np.float32), y


@pytest.fixture
def step_counter() -> Iterator[list[int]]:
    """Counts every optimizer step taken anywhere while the test runs."""
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    yield steps
    handle.remove()


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_models_are_identical_for_a_seed_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = get_weights(build_model(LOGREG, 5, seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    second = get_weights(build_model(LOGREG, 5, seed=7))
    other = get_weights(build_model(LOGREG, 5, seed=8))
    assert list(first) == ["linear.weight", "linear.bias"]
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not np.array_equal(first["linear.weight"], other["linear.weight"])


def test_mlp_layers_and_output_shape() -> None:
    model = build_model(Model(name="mlp", hidden=[8, 4], dropout=0.2), 6, seed=0)
    spec = [(s.name, s.shape) for s in signature(get_weights(model))]
    assert spec == [
        ("layers.0.weight", (8, 6)),
        ("layers.0.bias", (8,)),
        ("layers.3.weight", (4, 8)),
        ("layers.3.bias", (4,)),
        ("layers.6.weight", (1, 4)),
        ("layers.6.bias", (1,)),
    ]
    assert [type(m).__name__ for m in model.layers] == [
        "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear",
    ]  # fmt: skip
    assert model(torch.zeros(5, 6)).shape == (5,)


def test_weights_round_trip_as_float32_copies() -> None:
    model = build_model(LOGREG, 3)
    weights = get_weights(model)
    assert all(w.dtype == np.float32 and w.flags["C_CONTIGUOUS"] for w in weights.values())
    with torch.no_grad():
        model.linear.weight.add_(1.0)  # the copy does not follow the model
    assert not np.array_equal(get_weights(model)["linear.weight"], weights["linear.weight"])
    set_weights(model, weights)
    assert np.array_equal(get_weights(model)["linear.weight"], weights["linear.weight"])
    with pytest.raises(ValueError, match="missing"):
        set_weights(model, {"linear.weight": weights["linear.weight"]})
    with pytest.raises(ValueError, match="shape"):
        set_weights(model, {**weights, "linear.bias": np.zeros(2, np.float32)})


def test_minibatches_cycle_through_shuffled_epochs() -> None:
    batches = minibatches(10, 4, np.random.default_rng(0))
    epoch = [next(batches) for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(10))
    second = np.concatenate([next(batches) for _ in range(3)])
    assert sorted(second.tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(epoch), second)


def test_training_lowers_the_loss_on_a_separable_problem() -> None:
    x, y = _blobs()
    model = build_model(LOGREG, 3)
    before = evaluate(model, x, y)
    result = train_local(model, x, y, SGD, seed=1)
    after = evaluate(model, x, y)
    assert after["loss"] < before["loss"] / 2
    assert after["accuracy"] == 1.0
    assert 0 < result.loss < before["loss"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_exactly_local_steps_are_taken(optimizer: str, step_counter: list[int]) -> None:
    x, y = _blobs(n=12)
    training = Training(
        localSteps=17, batchSize=5, optimizer=optimizer, momentum=0.0, weightDecay=0.01
    )
    result = train_local(build_model(LOGREG, 3), x, y, training, seed=0)
    assert result.steps == 17
    assert len(step_counter) == 17


def test_fedprox_pulls_weights_toward_the_global_model() -> None:
    x, y = _blobs()
    start = build_model(LOGREG, 3)
    global_weights = get_weights(start)
    moved = {}
    for mu in (0.0, 10.0):
        model = build_model(LOGREG, 3)
        train_local(model, x, y, SGD, seed=1, proximal_mu=mu)
        moved[mu] = _distance(get_weights(model), global_weights)
    assert moved[10.0] < moved[0.0] / 3


def test_training_is_reproducible() -> None:
    x, y = _blobs()
    mlp = Model(name="mlp", hidden=[8], dropout=0.3)
    runs = []
    for site in ("north", "north", "south"):
        model = build_model(mlp, 3, seed=5)
        train_local(model, x, y, SGD, seed=derive_seed(5, site, 3))
        runs.append(get_weights(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert derive_seed(5, "north", 3) != derive_seed(5, "north", 4)


def test_evaluate_matches_sklearn() -> None:
    model = build_model(LOGREG, 2)
    set_weights(
        model,
        {"linear.weight": np.array([[1.5, -0.5]], np.float32),
         "linear.bias": np.array([0.25], np.float32)},
    )  # fmt: skip
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 2)).astype(np.float32)
    y = (rng.random(50) < 0.4).astype(np.float32)
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ [1.5, -0.5] + 0.25)))
    metrics = evaluate(model, x, y)
    assert metrics["loss"] == pytest.approx(log_loss(y, p), rel=1e-5)
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p > 0.5))
    one_class = evaluate(model, x, np.ones(50, np.float32))
    assert set(one_class) == {"loss", "accuracy"}


def test_local_baseline_trains_rounds_times_local_steps(step_counter: list[int]) -> None:
    study = make_study(
        breast_cancer_sites(2),
        task={"label": "malignant"},
        rounds=3,
        training={"localSteps": 7, "batchSize": 16, "learningRate": 0.05},
    )
    data = load_site_data(study, "site-0", Path("/"))
    metrics = local_baseline(study.spec, "site-0", data)
    assert len(step_counter) == 21
    assert set(metrics) == {"loss", "accuracy", "auc", "auprc"}
    assert metrics["auc"] > 0.9
    assert local_baseline(study.spec, "site-0", data) == metrics
