"""Server-side DP (DP-FedAvg): the accountant against Opacus's, the clip-and-noise mechanism on
hand-computed numbers and on its noise scale, and the aggregator reporting its own ε."""

from __future__ import annotations

import numpy as np
import pytest
from aggtest import StartFn, initialise, make_study, model, study_doc
from fedstudy_aggregator.server_dp import ServerDP, calibrate, epsilon_after
from fedstudy_aggregator.strategies import FedAdam, FedAvg, clip_update, update_norm
from opacus.accountants import RDPAccountant

from fedstudy.spec import StudyError, parse_study


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"),
    [(1.0, 20, 1e-5), (0.7, 100, 1e-3), (3.0, 5, 1e-6), (9.0, 50, 1e-5)],
)
def test_the_accountant_agrees_with_opacus(sigma: float, rounds: int, delta: float) -> None:
    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    assert epsilon_after(sigma, rounds, delta) == pytest.approx(acc.get_epsilon(delta), abs=1e-9)


@pytest.mark.parametrize(("target", "rounds"), [(1.0, 10), (4.0, 50), (8.0, 200)])
def test_calibrated_noise_ends_the_planned_rounds_at_the_target(target: float, rounds: int) -> None:
    sigma = calibrate(target, rounds, 1e-5)
    assert epsilon_after(sigma, rounds, 1e-5) <= target
    assert epsilon_after(sigma * 0.999, rounds, 1e-5) > target * 0.99


def _flat(n: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.full(n, value, dtype=np.float64), "steps": np.array([5], dtype=np.int64)}


def test_updates_are_clipped_counted_equally_and_divided_by_the_study_size() -> None:
    """Two sites of four answer: changes (3, 4) (norm 5, clipped to 1) and (0.3, 0.4) (kept),
    with 10 and 1000 samples (ignored). New model: (0.6 + 0.3, 0.8 + 0.4) / 4 + noise ~ 0."""
    strategy = FedAvg()
    strategy.dp = ServerDP(clip=1.0, noise=1e-12, delta=1e-5, denominator=4)
    base = _flat(2)
    strategy.begin_round(base)
    strategy.accept(clip_update(_flat2(3.0, 4.0), base, 1.0), 10)
    strategy.accept(clip_update(_flat2(0.3, 0.4), base, 1.0), 1000)
    out = strategy.aggregate()
    np.testing.assert_allclose(out["w"], [0.9 / 4, 1.2 / 4], atol=1e-9)
    assert out["steps"].tolist() == [5]


def _flat2(a: float, b: float) -> dict[str, np.ndarray]:
    return {"w": np.array([a, b], dtype=np.float64), "steps": np.array([5], dtype=np.int64)}


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_the_noise_has_the_stated_scale(strategy_cls: type[FedAvg] | type[FedAdam]) -> None:
    """No site moves; the mean's change is the noise alone: sd = sigma * clip / sites. (FedAdam
    takes the noisy mean as its pseudo-gradient, so only its averaged input is checked.)"""
    n, sigma, clip, sites = 200_000, 2.0, 0.5, 4
    strategy = strategy_cls()
    strategy.dp = ServerDP(
        clip=clip, noise=sigma, delta=1e-5, denominator=sites, rng=np.random.default_rng(7)
    )
    base = _flat(n)
    strategy.begin_round(base)
    strategy.accept(_flat(n), 100)
    strategy.accept(_flat(n), 100)
    change = strategy.mean_of("w") - base["w"]
    assert np.std(change) == pytest.approx(sigma * clip / sites, rel=0.01)
    assert abs(float(np.mean(change))) < 5 * sigma * clip / sites / np.sqrt(n)


def test_the_aggregator_reports_its_own_epsilon(start: StartFn) -> None:
    study = make_study(
        2, rounds=2, serverPrivacy={"clipNorm": 1.0, "noiseMultiplier": 1.5, "delta": 1e-4}
    )
    agg = start(study)
    a, b = initialise(agg, "s0", "s1")
    assert agg.status()["server_privacy"]["epsilon"] == 0.0
    for r in (1, 2):
        a.task()
        b.task()
        far = model(0)
        far["w"] = far["w"] + np.float32(100.0)
        assert a.submit(far, r).accepted
        assert b.submit(model(0), r).accepted
        agg.wait_for(lambda s, r=r: s["completed_rounds"] == r)
        dp = agg.status()["server_privacy"]
        assert dp["rounds"] == r
        assert dp["epsilon"] == pytest.approx(epsilon_after(1.5, r, 1e-4))
    # The far site's change of norm ~245 was clipped to 1 before it counted.
    assert update_norm(agg.coord.model, model(0)) < 1.0 + 10 * 1.5 * 1.0 / 2
    assert agg.coord.summary()["server_privacy"]["epsilon"] == pytest.approx(
        epsilon_after(1.5, 2, 1e-4)
    )


def test_target_epsilon_calibrates_the_noise_for_the_planned_rounds(start: StartFn) -> None:
    study = make_study(2, rounds=5, serverPrivacy={"clipNorm": 0.1, "targetEpsilon": 3.0})
    agg = start(study)
    dp = agg.coord.strategy.dp
    assert dp is not None
    assert dp.epsilon(5) <= 3.0
    assert dp.noise == pytest.approx(calibrate(3.0, 5, 1e-5))


@pytest.mark.parametrize(
    ("server_privacy", "strategy", "path", "words"),
    [
        ({"clipNorm": 1.0}, "fedavg", "spec.serverPrivacy", "exactly one of"),
        (
            {"clipNorm": 1.0, "noiseMultiplier": 1.0, "targetEpsilon": 2.0},
            "fedavg",
            "spec.serverPrivacy",
            "exactly one of",
        ),
        ({"clipNorm": 0, "noiseMultiplier": 1.0}, "fedavg", "spec.serverPrivacy.clipNorm", "0"),
        ({"clipNorm": 1.0, "noiseMultiplier": 1.0}, "median", "spec.serverPrivacy", "median"),
        (
            {"clipNorm": 1.0, "noiseMultiplier": 1.0, "delta": 1.5},
            "fedavg",
            "spec.serverPrivacy.delta",
            "1.5",
        ),
    ],
)
def test_bad_server_privacy_is_a_clear_error(
    server_privacy: dict[str, float], strategy: str, path: str, words: str
) -> None:
    doc = study_doc(2, serverPrivacy=server_privacy, strategy={"name": strategy})
    with pytest.raises(StudyError) as info:
        parse_study(doc)
    text = str(info.value)
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith(path + ":"))
    assert words in line, text
