"""A poisoned site among four: NaN is refused; median and trimmed mean keep the model sound.

The real aggregator (gRPC on loopback) and four real site trainers run in one process; one
trainer is changed to send, instead of its honest update, NaN weights, an update scaled by
100, or a sign-flipped update.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fedstudy_aggregator.server import AggregatorServer
from fedstudy_trainer.client import SiteTrainer
from fedstudy_trainer.data import load_site_data
from fedstudy_trainer.models import Weights, get_weights

from fedstudy.spec import FederatedStudy, parse_study
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

SITES = ["north", "south", "east", "west"]
POISONED = "west"


def _study(strategy: dict[str, Any]) -> FederatedStudy:
    return parse_study({
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": "poison"},
        "spec": {
            "task": {"label": "malignant", "metric": "auc"},
            "model": {"name": "logistic-regression"},
            "rounds": 8,
            "minSites": 3,
            "roundTimeoutSeconds": 60,
            "strategy": strategy,
            "training": {"localSteps": 10, "batchSize": 16, "learningRate": 0.05},
            "localBaseline": False,
            "sites": [
                {"name": n, "data": {"format": "builtin", "dataset": "breast-cancer",
                                     "partition": {"index": i, "count": 4, "seed": 3}}}
                for i, n in enumerate(SITES)
            ],
        },
    })  # fmt: skip


FACTORS = {"scale": 100.0, "sign-flip": -1.0, "scaled-sign-flip": -100.0}


def _poison(kind: str, weights: Weights, base: Weights) -> Weights:
    if kind == "nan":
        return {k: np.full_like(v, np.nan) for k, v in weights.items()}
    factor = FACTORS[kind]
    return {k: (base[k] + factor * (w - base[k])).astype(w.dtype) for k, w in weights.items()}


class PoisonedTrainer(SiteTrainer):
    """A site that trains honestly, then sends a poisoned version of its update."""

    kind = "nan"

    def _download(self, version: int) -> None:
        super()._download(version)
        self.base = get_weights(self.model)

    def _submit(self, round_: int, base: int, weights: Weights, loss: float) -> None:
        if round_ > 0:
            weights = _poison(self.kind, weights, self.base)
        super()._submit(round_, base, weights, loss)


def run_study(tmp_path: Path, strategy: dict[str, Any], poison: str | None) -> dict[str, Any]:
    study = _study(strategy)
    log = logging.getLogger("robustness")
    server = AggregatorServer(study, tmp_path / "agg", tmp_path / "out", listen="127.0.0.1:0",
                              http="127.0.0.1:0", log=log)  # fmt: skip
    endpoint = server.start()
    channels: list[grpc.Channel] = []
    codes: dict[str, int] = {}
    threads = []
    try:
        for name in SITES:
            data = load_site_data(study, name, tmp_path)
            channel = grpc.insecure_channel(str(endpoint["grpc"]))
            channels.append(channel)
            cls = SiteTrainer
            if poison is not None and name == POISONED:
                cls = type("Poisoned", (PoisonedTrainer,), {"kind": poison})
            trainer = cls(study, name, data, pb_grpc.AggregatorStub(channel),
                          tmp_path / "sites" / name, log, wait_seconds=0.5)  # fmt: skip

            def go(t: SiteTrainer = trainer, n: str = name) -> None:
                codes[n] = t.run()

            threads.append(threading.Thread(target=go, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert codes == dict.fromkeys(SITES, 0)
        summary: dict[str, Any] = server.coord.summary()
        return summary
    finally:
        for c in channels:
            c.close()
        server.stop(grace=0.2)


@pytest.fixture(scope="module")
def clean_auc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    out = {}
    for name in ("median", "trimmed-mean"):
        summary = run_study(tmp_path_factory.mktemp(name), {"name": name}, None)
        assert summary["rounds_completed"] == 8
        out[name] = summary["global"]["weighted"]["auc"]
    return out


def test_nan_updates_are_refused_and_the_study_completes(tmp_path: Path) -> None:
    summary = run_study(tmp_path, {"name": "fedavg"}, "nan")
    assert summary["completed"] is True
    assert summary["refused_updates"] == {"non-finite": 8}
    assert summary["sites"][POISONED]["rounds_participated"] == 0
    assert summary["global"]["weighted"]["auc"] > 0.95


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean"])
@pytest.mark.parametrize("poison", ["scale", "sign-flip", "scaled-sign-flip"])
def test_robust_strategies_shrug_off_a_poisoned_site(
    tmp_path: Path, clean_auc: dict[str, float], strategy: str, poison: str
) -> None:
    summary = run_study(tmp_path, {"name": strategy}, poison)
    assert summary["rounds_completed"] == 8
    assert summary["refused_updates"] == {}
    auc = summary["global"]["weighted"]["auc"]
    assert abs(auc - clean_auc[strategy]) <= 0.02, (auc, clean_auc[strategy])


def test_fedavg_is_hurt_by_a_scaled_sign_flip(tmp_path: Path, clean_auc: dict[str, float]) -> None:
    """The control: without a robust strategy a sign-flipped update scaled by 100 wrecks the
    model, so the robust tests above measure something. (A plain scale by 100 points the
    mean along an honest site's own direction, which a linear model's AUC hardly notices.)"""
    summary = run_study(tmp_path, {"name": "fedavg"}, "scaled-sign-flip")
    assert summary["global"]["weighted"]["auc"] < clean_auc["median"] - 0.1
