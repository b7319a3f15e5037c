"""What the aggregator remembers about sites and rounds, as plain JSON-able records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedstudy.tensors import TensorSpec

Metrics = dict[str, float | None]


def clean_metrics(metrics: Mapping[str, float]) -> Metrics:
    """Metrics as JSON can hold them: NaN and infinity (an AUC on one class) become None."""
    return {str(k): (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class SiteRecord:
    """One site as the aggregator knows it. ``joined``, ``signature`` and ``fetched_done``
    belong to this process only; the rest survives a restart in the checkpoint."""

    name: str
    train_samples: int | None = None
    test_samples: int | None = None
    rounds_participated: int = 0
    last_round: int | None = None
    metrics: Metrics = field(default_factory=dict)
    metrics_version: int | None = None
    local_only: Metrics = field(default_factory=dict)
    final_reported: bool = False
    left: str | None = None
    joined: bool = False
    signature: list[TensorSpec] | None = None
    fetched_done: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "train_samples": self.train_samples,
            "test_samples": self.test_samples,
            "rounds_participated": self.rounds_participated,
            "last_round": self.last_round,
            "metrics": self.metrics,
            "metrics_version": self.metrics_version,
            "local_only": self.local_only,
            "final_reported": self.final_reported,
            "left": self.left,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> SiteRecord:
        return cls(
            name=name,
            train_samples=data.get("train_samples"),
            test_samples=data.get("test_samples"),
            rounds_participated=int(data.get("rounds_participated", 0)),
            last_round=data.get("last_round"),
            metrics=dict(data.get("metrics") or {}),
            metrics_version=data.get("metrics_version"),
            local_only=dict(data.get("local_only") or {}),
            final_reported=bool(data.get("final_reported", False)),
            left=data.get("left"),
        )


@dataclass
class RoundLine:
    """One site's line for one round: its update's training figures and its evaluation of
    the model that round produced."""

    train_samples: int | None = None
    train_loss: float | None = None
    test_samples: int | None = None
    metrics: Metrics = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "train_samples": self.train_samples,
            "train_loss": self.train_loss,
            "test_samples": self.test_samples,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundLine:
        return cls(
            train_samples=data.get("train_samples"),
            train_loss=data.get("train_loss"),
            test_samples=data.get("test_samples"),
            metrics=dict(data.get("metrics") or {}),
        )


History = dict[int, dict[str, RoundLine]]


def history_to_json(history: History) -> dict[str, dict[str, Any]]:
    return {
        str(r): {site: line.to_json() for site, line in lines.items()}
        for r, lines in sorted(history.items())
    }


def history_from_json(data: Mapping[str, Mapping[str, Any]]) -> History:
    return {
        int(r): {site: RoundLine.from_json(line) for site, line in lines.items()}
        for r, lines in data.items()
    }


def combine_metrics(
    per_site: Mapping[str, tuple[int | None, Metrics]],
) -> tuple[dict[str, float], dict[str, float]]:
    """(weighted by test samples, plain mean over sites) of each metric the sites reported.
    Missing (None) values are left out of both."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    plain: dict[str, list[float]] = {}
    for test_samples, metrics in per_site.values():
        for key, value in metrics.items():
            if value is None:
                continue
            plain.setdefault(key, []).append(value)
            if test_samples:
                sums[key] = sums.get(key, 0.0) + value * test_samples
                weights[key] = weights.get(key, 0.0) + test_samples
    weighted = {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}
    site_mean = {k: sum(v) / len(v) for k, v in sorted(plain.items())}
    return weighted, site_mean
