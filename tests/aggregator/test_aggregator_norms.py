"""strategy.maxUpdateNorm at the aggregator: a larger update is clipped or refused."""

from __future__ import annotations

import numpy as np
from aggtest import StartFn, initialise, make_study, model
from fedstudy_aggregator.strategies import update_norm

from fedstudy.wire import aggregator_pb2 as pb


def _far(scale: float) -> dict[str, np.ndarray]:
    """model(0) moved by ``scale`` along every float coordinate."""
    w = model(0)
    w["w"] = w["w"] + np.float32(scale)
    w["b"] = w["b"] + np.float32(scale)
    return w


def test_update_above_the_bound_is_refused_with_refuse_policy(start: StartFn) -> None:
    study = make_study(
        2, rounds=1, strategy={"name": "fedavg", "maxUpdateNorm": 1.0, "normPolicy": "refuse"}
    )
    agg = start(study)
    a, b = initialise(agg, "s0", "s1")
    a.task()
    b.task()
    receipt = a.submit(_far(10.0), 1)
    assert (receipt.accepted, receipt.reason) == (False, "norm-exceeded")
    assert "above the bound 1" in receipt.message
    assert b.submit(_far(0.1), 1).accepted
    assert agg.coord.status()["refused_updates"] == {"norm-exceeded": 1}


def test_update_above_the_bound_is_clipped_by_default(start: StartFn) -> None:
    study = make_study(2, rounds=1, strategy={"name": "median", "maxUpdateNorm": 1.0})
    agg = start(study)
    a, b = initialise(agg, "s0", "s1")
    a.task()
    b.task()
    assert a.submit(_far(100.0), 1).accepted
    assert b.submit(_far(100.0), 1).accepted
    agg.wait_for(lambda s: s["completed_rounds"] == 1)
    # Both updates were scaled back to norm 1, so the new model is 1 away from the old.
    assert np.isclose(update_norm(agg.coord.model, model(0)), 1.0, rtol=1e-5)


def test_a_site_refused_for_its_content_does_not_hold_the_round_open(start: StartFn) -> None:
    """A NaN update is the site's answer for the round: refused, not trained again, not waited
    for. With an hour's round timeout, the round closes as soon as the other two answer."""
    study = make_study(3, rounds=1, roundTimeoutSeconds=3600)
    agg = start(study)
    a, b, c = initialise(agg, "s0", "s1", "s2")
    for s in (a, b, c):
        assert s.task().kind == pb.TaskResponse.TRAIN
    nan = model(0)
    nan["w"] = np.full_like(nan["w"], np.nan)
    receipt = a.submit(nan, 1)
    assert (receipt.accepted, receipt.reason) == (False, "non-finite")
    assert a.task().kind == pb.TaskResponse.WAIT
    assert b.submit(model(1), 1).accepted
    assert c.submit(model(2), 1).accepted
    agg.wait_for(lambda s: s["completed_rounds"] == 1)
    assert agg.coord.status()["refused_updates"] == {"non-finite": 1}
    assert agg.coord.sites["s0"].rounds_participated == 0
