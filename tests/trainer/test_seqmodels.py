"""Sequence models: shapes, names, the DP variants, causality of the TCN, training under
DP-SGD (hooks mode) and AUPRC in the evaluation of every model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedstudy_trainer.models import build_model, get_weights, set_weights
from fedstudy_trainer.privacy import DPSettings, check_model, choose_mode, train_private
from fedstudy_trainer.seqmodels import RecurrentClassifier, TemporalConvNet
from fedstudy_trainer.train import evaluate, train_local
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from fedstudy.spec import Model, Training

SHAPE = (10, 6)  # 10 steps of 3 measurements and their masks


def batch(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sequences whose label is whether the first channel rises over the last 3 steps."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    y = (x[:, -3:, 0].sum(axis=1) > 0).astype(np.float32)
    return x, y


@pytest.mark.parametrize(
    "model",
    [
        {"name": "gru", "hiddenSize": 8},
        {"name": "lstm", "hiddenSize": 8, "layers": 2, "dropout": 0.1},
        {"name": "tcn", "hiddenSize": 8, "kernelSize": 2},
    ],
)
def test_each_model_gives_one_logit_per_sequence(model: dict[str, object]) -> None:
    net = build_model(Model.model_validate(model), SHAPE, seed=0)
    x, _ = batch(5)
    out = net(torch.from_numpy(x))
    assert out.shape == (5,)
    # The same seed, the same weights; the weights do not depend on the number of steps.
    again = build_model(Model.model_validate(model), (3, 6), seed=0)
    for name, w in get_weights(net).items():
        np.testing.assert_array_equal(w, get_weights(again)[name])


def test_defaults_of_the_sequence_fields() -> None:
    gru = build_model(Model(name="gru"), SHAPE)
    assert isinstance(gru, RecurrentClassifier)
    assert isinstance(gru.rnn, nn.GRU)
    assert (gru.rnn.hidden_size, gru.rnn.num_layers) == (32, 1)
    tcn = build_model(Model(name="tcn"), SHAPE)
    assert isinstance(tcn, TemporalConvNet)
    assert len(tcn.blocks) == 2
    assert tcn.blocks[1].conv.dilation == (2,)
    assert tcn.blocks[0].conv.kernel_size == (3,)


@pytest.mark.parametrize(("kind", "layer"), [("gru", DPGRU), ("lstm", DPLSTM)])
def test_under_dp_the_recurrent_layers_are_opacus_ones_with_the_same_names(
    kind: str, layer: type[nn.Module]
) -> None:
    spec = Model.model_validate({"name": kind, "hiddenSize": 6, "layers": 2})
    private = build_model(spec, SHAPE, seed=1, private=True)
    plain = build_model(spec, SHAPE, seed=1)
    assert isinstance(private, RecurrentClassifier)
    assert isinstance(private.rnn, layer)
    check_model(private)  # no layer Opacus refuses
    assert choose_mode(private) == "hooks"
    # Same tensor names and shapes: a DP-trained model loads into the plain one (export).
    weights = get_weights(private)
    assert sorted(weights) == sorted(get_weights(plain))
    set_weights(plain, weights)
    x, _ = batch(4)
    with torch.no_grad():
        np.testing.assert_allclose(
            plain(torch.from_numpy(x)).numpy(), private(torch.from_numpy(x)).numpy(), atol=1e-5
        )


def test_opacus_refuses_the_plain_recurrent_layers() -> None:
    from fedstudy_trainer.privacy import PrivacyError

    with pytest.raises(PrivacyError, match=r"nn\.GRU"):
        check_model(build_model(Model(name="gru"), SHAPE))


def test_the_tcn_is_causal_and_sees_its_receptive_field_only() -> None:
    # kernel 2, 2 blocks: the last output sees 1 + 1 * (2**2 - 1) = 4 steps.
    net = build_model(Model.model_validate({"name": "tcn", "kernelSize": 2}), SHAPE, seed=0)
    net.eval()
    x, _ = batch(3)
    base = net(torch.from_numpy(x)).detach()
    early = x.copy()
    early[:, :6, :] += 5.0  # steps 0-5, outside the last 4
    late = x.copy()
    late[:, 7, :] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(net(torch.from_numpy(early)), base)
        assert not torch.allclose(net(torch.from_numpy(late)), base)


@pytest.mark.parametrize("name", ["gru", "lstm", "tcn"])
def test_dp_sgd_trains_each_sequence_model_with_hooks(name: str) -> None:
    spec = Model.model_validate({"name": name, "hiddenSize": 8})
    net = build_model(spec, SHAPE, seed=0, private=True)
    assert choose_mode(net) == "hooks"
    x, y = batch(64)
    before = {k: v.copy() for k, v in get_weights(net).items()}
    training = Training(localSteps=3, batchSize=16, optimizer="adam", learningRate=0.01)
    settings = DPSettings(noise=1.0, sample_rate=0.25, max_grad_norm=1.0, expected_batch_size=16)
    result = train_private(net, x, y, training, settings, seed=3, steps=3)
    assert result.steps == 3
    assert np.isfinite(result.loss)
    after = get_weights(net)
    assert list(after) == list(before)  # the caller's module keeps its names
    assert any(not np.array_equal(after[k], before[k]) for k in before)


def test_a_gru_learns_the_rising_signal_and_evaluation_has_auprc() -> None:
    net = build_model(Model.model_validate({"name": "gru", "hiddenSize": 8}), SHAPE, seed=0)
    x, y = batch(512, seed=1)
    x_test, y_test = batch(256, seed=2)
    training = Training(localSteps=150, batchSize=32, optimizer="adam", learningRate=0.02)
    train_local(net, x, y, training, seed=0)
    metrics = evaluate(net, x_test, y_test)
    assert set(metrics) == {"loss", "accuracy", "auc", "auprc"}
    assert metrics["auc"] > 0.9
    assert 0 < metrics["auprc"] <= 1


def test_auprc_is_average_precision() -> None:
    from sklearn.metrics import average_precision_score

    net = build_model(Model(name="logistic-regression"), 4, seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = (rng.random(50) < 0.2).astype(np.float32)
    metrics = evaluate(net, x, y)
    with torch.no_grad():
        probs = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    assert metrics["auprc"] == pytest.approx(average_precision_score(y, probs))
    one_class = evaluate(net, x, np.zeros(50, np.float32))
    assert "auc" not in one_class
    assert "auprc" not in one_class
