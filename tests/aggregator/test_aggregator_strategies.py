"""Strategy arithmetic against hand-computed numbers, and optimizer state across checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedstudy_aggregator.checkpoint import CheckpointStore
from fedstudy_aggregator.strategies import (
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
    adam_step,
    clip_update,
    coordinate_median,
    fold_mean,
    make_strategy,
    trimmed_mean,
    update_norm,
    weighted_average,
    yogi_step,
)

from fedstudy.spec import Strategy as StrategySpec
from fedstudy.tensors import Weights

OPT = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.01}


def test_fold_mean_is_the_weighted_mean() -> None:
    mean = np.array([1.0, 2.0], dtype=np.float32)
    total = fold_mean(mean, 1.0, np.array([5.0, 6.0], dtype=np.float32), 3.0)
    assert total == 4.0
    # (1*1 + 3*5) / 4 = 4, (1*2 + 3*6) / 4 = 5
    np.testing.assert_allclose(mean, [4.0, 5.0])
    assert mean.dtype == np.float32


def test_fedavg_weights_by_samples_and_keeps_dtypes() -> None:
    g: Weights = {
        "w": np.zeros(2, np.float32),
        "n": np.zeros(2, np.int64),
        "mask": np.zeros(2, bool),
        "h": np.zeros(2, np.float16),
    }
    a: Weights = {
        "w": np.array([1.0, 2.0], np.float32),
        "n": np.array([1, 2], np.int64),
        "mask": np.array([True, False]),
        "h": np.array([1.0, 2.0], np.float16),
    }
    b: Weights = {
        "w": np.array([5.0, 6.0], np.float32),
        "n": np.array([2, 5], np.int64),
        "mask": np.array([False, False]),
        "h": np.array([5.0, 6.0], np.float16),
    }
    s = FedAvg()
    s.begin_round(g)
    s.accept(a, 3)
    s.accept(b, 1)
    out = s.aggregate()
    # weights 3 and 1: w = (3*1 + 5)/4 = 2, (3*2 + 6)/4 = 3
    np.testing.assert_allclose(out["w"], [2.0, 3.0])
    # n: (3*1 + 2)/4 = 1.25 -> 1; (3*2 + 5)/4 = 2.75 -> 3
    np.testing.assert_array_equal(out["n"], [1, 3])
    # mask: 3/4 of the weight says True for the first entry
    np.testing.assert_array_equal(out["mask"], [True, False])
    np.testing.assert_allclose(out["h"], [2.0, 3.0])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in g.items()}
    assert s.accepted == 2
    assert s.total_weight == 4.0


def test_fedavg_does_not_overflow_float16_with_large_weights() -> None:
    g: Weights = {"h": np.zeros(1, np.float16)}
    s = FedAvg()
    s.begin_round(g)
    s.accept({"h": np.array([60000.0], np.float16)}, 100_000)
    s.accept({"h": np.array([60000.0], np.float16)}, 300_000)
    assert s.aggregate()["h"][0] == np.float16(60000.0)


def test_fedavg_matches_the_reference_weighted_average() -> None:
    rng = np.random.default_rng(0)
    g: Weights = {"w": np.zeros((3, 4), np.float64)}
    updates = [({"w": rng.normal(size=(3, 4))}, float(n)) for n in (5, 1, 7)]
    s = FedAvg()
    s.begin_round(g)
    for w, n in updates:
        s.accept(w, int(n))
    expected = sum(w["w"] * n for w, n in updates) / 13
    np.testing.assert_allclose(s.aggregate()["w"], expected)
    np.testing.assert_allclose(weighted_average(updates)["w"], expected)


def test_begin_round_resets_and_aggregate_needs_an_update() -> None:
    s = FedAvg()
    s.begin_round({"w": np.zeros(1, np.float32)})
    with pytest.raises(RuntimeError):
        s.aggregate()
    with pytest.raises(ValueError, match="positive"):
        s.accept({"w": np.ones(1, np.float32)}, 0)


def test_adam_step_two_steps_by_hand() -> None:
    g, m, v = np.array([1.0]), np.zeros(1), np.zeros(1)
    # step 1: delta -0.5; m = 0.1*-0.5 = -0.05; v = 0.01*0.25 = 0.0025
    # new = 1 + 0.1 * -0.05 / (0.05 + 0.01) = 1 - 0.083333
    g1, m1, v1 = adam_step(g, np.array([0.5]), m, v, **OPT)
    assert m1[0] == pytest.approx(-0.05)
    assert v1[0] == pytest.approx(0.0025)
    assert g1[0] == pytest.approx(0.9166667, abs=1e-7)
    # step 2: delta +0.2; m = 0.9*-0.05 + 0.1*0.2 = -0.025
    # v = 0.99*0.0025 + 0.01*0.04 = 0.002875; new = g1 - 0.1*0.025/(0.0536190 + 0.01)
    g2, m2, v2 = adam_step(g1, g1 + 0.2, m1, v1, **OPT)
    assert m2[0] == pytest.approx(-0.025)
    assert v2[0] == pytest.approx(0.002875)
    assert g2[0] == pytest.approx(0.8773702, abs=1e-7)
    # pure: the inputs are unchanged
    assert m[0] == 0.0
    assert v[0] == 0.0


def test_yogi_step_two_steps_by_hand() -> None:
    g, m, v = np.array([1.0]), np.zeros(1), np.zeros(1)
    # step 1 from zero moments: v = 0 - 0.01*0.25*sign(0 - 0.25) = 0.0025 (as Adam)
    g1, m1, v1 = yogi_step(g, np.array([0.5]), m, v, **OPT)
    assert v1[0] == pytest.approx(0.0025)
    assert g1[0] == pytest.approx(0.9166667, abs=1e-7)
    # step 2: delta^2 = 0.04; v = 0.0025 - 0.01*0.04*sign(0.0025 - 0.04) = 0.0029
    # new = g1 - 0.1*0.025/(sqrt(0.0029) + 0.01) = g1 - 0.0025/0.0638516
    g2, m2, v2 = yogi_step(g1, g1 + 0.2, m1, v1, **OPT)
    assert m2[0] == pytest.approx(-0.025)
    assert v2[0] == pytest.approx(0.0029)
    assert g2[0] == pytest.approx(0.8775134, abs=1e-7)


@pytest.mark.parametrize(("cls", "expected"), [(FedAdam, 0.8773702), (FedYogi, 0.8775134)])
def test_server_optimizer_strategy_two_rounds(cls: type[FedAdam], expected: float) -> None:
    s = cls(**OPT)
    g: Weights = {"w": np.array([1.0]), "n": np.array([4], np.int64)}
    s.begin_round(g)
    # weighted mean 0.5 from two sites: (1*0.0 + 1*1.0) / 2
    s.accept({"w": np.array([0.0]), "n": np.array([2], np.int64)}, 1)
    s.accept({"w": np.array([1.0]), "n": np.array([6], np.int64)}, 1)
    g1 = s.aggregate()
    assert g1["w"][0] == pytest.approx(0.9166667, abs=1e-7)
    assert g1["n"][0] == 4  # integers take the plain weighted mean
    s.begin_round(g1)
    s.accept({"w": g1["w"] + 0.2, "n": np.array([5], np.int64)}, 3)
    assert s.aggregate()["w"][0] == pytest.approx(expected, abs=1e-7)


def _round(s: Strategy, g: Weights, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    s.begin_round(g)
    for n in (3, 5):
        s.accept({k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in g.items()}, n)
    return s.aggregate()


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_optimizer_state_survives_a_checkpoint(tmp_path: Path, name: str) -> None:
    spec = StrategySpec(name=name, serverLearningRate=0.05)
    g0: Weights = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float64)}
    straight = make_strategy(spec)
    g1 = _round(straight, g0, 1)
    store = CheckpointStore(tmp_path)
    store.save({"study": "demo"}, g1, straight.state_dict(), 1)
    assert set(straight.state_dict()) == {"m/w", "v/w", "m/b", "v/b"}

    snap = CheckpointStore(tmp_path).load()
    assert snap is not None
    assert snap.model is not None
    resumed = make_strategy(spec)
    resumed.load_state_dict(snap.strategy_state)
    after_reload = _round(resumed, snap.model, 2)
    without_reload = _round(straight, g1, 2)
    for k in g0:
        np.testing.assert_array_equal(after_reload[k], without_reload[k])
        assert after_reload[k].dtype == g0[k].dtype


def test_make_strategy_defaults() -> None:
    assert isinstance(make_strategy(StrategySpec()), FedAvg)
    assert isinstance(make_strategy(StrategySpec(name="fedprox", mu=0.1)), FedProx)
    adam = make_strategy(StrategySpec(name="fedadam"))
    assert isinstance(adam, FedAdam)
    assert (adam.eta, adam.beta1, adam.beta2, adam.tau) == (0.01, 0.9, 0.99, 1e-3)
    yogi = make_strategy(StrategySpec(name="fedyogi", beta1=0.5, tau=0.1))
    assert isinstance(yogi, FedYogi)
    assert (yogi.eta, yogi.beta1, yogi.beta2, yogi.tau) == (0.01, 0.5, 0.99, 0.1)


def test_stateless_strategy_refuses_foreign_state() -> None:
    with pytest.raises(ValueError, match="keeps no state"):
        FedAvg().load_state_dict({"m/w": np.zeros(1)})


# --- robust strategies and update norm bounds ------------------------------------------


def test_coordinate_median_and_trimmed_mean_by_hand() -> None:
    stack = np.array([[1.0, 10.0], [2.0, -50.0], [3.0, 20.0], [400.0, 30.0]])
    np.testing.assert_allclose(coordinate_median(stack), [2.5, 15.0])
    # fraction 0.25 of 4 values: drop one at each end, average the middle two.
    np.testing.assert_allclose(trimmed_mean(stack, 0.25), [2.5, 15.0])
    # Too small a fraction to drop anything: the plain mean.
    np.testing.assert_allclose(trimmed_mean(stack, 0.1), [101.5, 2.5])
    # Never drops every value.
    np.testing.assert_allclose(trimmed_mean(stack[:2], 0.49), [1.5, -20.0])


def test_median_strategy_ignores_one_wild_site() -> None:
    base = {"w": np.zeros(3, np.float32), "n": np.array([4], np.int64)}
    s = make_strategy(StrategySpec(name="median"))
    s.begin_round(base)
    for value in (1.0, 1.1, 0.9, 1000.0):
        s.accept({"w": np.full(3, value, np.float32), "n": np.array([4], np.int64)}, 10)
    out = s.aggregate()
    np.testing.assert_allclose(out["w"], np.full(3, 1.05, np.float32), rtol=1e-6)
    assert out["w"].dtype == np.float32
    assert out["n"].tolist() == [4]


def test_trimmed_mean_strategy_uses_its_fraction() -> None:
    base = {"w": np.zeros(1, np.float64)}
    s = make_strategy(StrategySpec(name="trimmed-mean", trimFraction=0.2))
    s.begin_round(base)
    for value in (-100.0, 1.0, 2.0, 3.0, 100.0):
        s.accept({"w": np.array([value])}, 1)
    np.testing.assert_allclose(s.aggregate()["w"], [2.0])


def test_update_norm_and_clip() -> None:
    base = {"a": np.zeros(2, np.float32), "b": np.ones(1, np.float32), "k": np.array([1])}
    w = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([5.0], np.float32),
         "k": np.array([7])}  # fmt: skip
    assert update_norm(w, base) == pytest.approx(5.0)
    clipped = clip_update(w, base, 2.5)
    assert update_norm(clipped, base) == pytest.approx(2.5, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [1.5, 0.0])
    np.testing.assert_allclose(clipped["b"], [3.0])
    assert clipped["k"].tolist() == [7]  # integer tensors are not scaled
    assert clip_update(w, base, 10.0)["a"] is w["a"]
