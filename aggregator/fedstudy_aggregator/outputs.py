"""The study's outputs: ``model.safetensors``, ``metrics.jsonl``, ``summary.json`` and, at
the end, ``model-card.md`` (the audit trail, ``audit.jsonl``, is written entry by entry: see
``audit.py``).

Everything here is built from the checkpointed records, and every file is rewritten whole
and atomically, so a restarted aggregator never duplicates a line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedstudy.fsutil import atomic_write_bytes, atomic_write_json
from fedstudy.modelcard import MODEL_CARD_FILE, model_card
from fedstudy.spec import FederatedStudy
from fedstudy.tensors import Weights, digest

from .checkpoint import write_model_file
from .records import History, Metrics, SiteRecord, combine_metrics

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

_LINE_KEYS = ("round", "site", "train_samples", "train_loss", "test_samples")


def metrics_lines(history: History, site_order: Sequence[str], upto: int) -> list[dict[str, Any]]:
    """One line per site per round 1..``upto``, for the sites that have something to say."""
    order = {name: i for i, name in enumerate(site_order)}
    lines = []
    for r in sorted(history):
        if r < 1 or r > upto:
            continue
        for site in sorted(history[r], key=lambda s: (order.get(s, len(order)), s)):
            rec = history[r][site]
            line: dict[str, Any] = {
                "round": r,
                "site": site,
                "train_samples": rec.train_samples,
                "train_loss": rec.train_loss,
                "test_samples": rec.test_samples,
            }
            for key, value in rec.metrics.items():
                if key not in _LINE_KEYS:
                    line[key] = value
            lines.append(line)
    return lines


def write_metrics(out_dir: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write_bytes(out_dir / METRICS_FILE, text.encode())


def write_model(out_dir: Path, model: Weights, study: str, version: int) -> None:
    meta = {"study": study, "version": str(version), "format": "fedstudy"}
    write_model_file(out_dir / MODEL_FILE, model, metadata=meta)


def final_metrics(history: History, version: int | None) -> dict[str, Metrics]:
    """Each site's metrics of the model of ``version``."""
    if version is None:
        return {}
    return {s: line.metrics for s, line in history.get(version, {}).items() if line.metrics}


def build_summary(
    *,
    study: str,
    completed: bool,
    ended_reason: str | None,
    planned_rounds: int,
    version: int | None,
    strategy: str,
    model: Weights | None,
    sites: Sequence[SiteRecord],
    model_digest: str | None = None,
    history: History,
    refused: Mapping[str, int],
) -> dict[str, Any]:
    finals = final_metrics(history, version)
    per_site: dict[str, tuple[int | None, Metrics]] = {}
    for s in sites:
        if s.name in finals:
            line = history[version or 0][s.name]
            per_site[s.name] = (line.test_samples or s.test_samples, finals[s.name])
    weighted, site_mean = combine_metrics(per_site)
    model_info = None
    if model is not None:
        model_info = {
            "file": MODEL_FILE,
            "sha256": model_digest or digest(model),
            "parameters": sum(int(a.size) for a in model.values()),
        }
    return {
        "study": study,
        "completed": completed,
        "ended_reason": ended_reason,
        "rounds_planned": planned_rounds,
        "rounds_completed": version or 0,
        "strategy": strategy,
        "model": model_info,
        "global": {"weighted": weighted, "site_mean": site_mean},
        "sites": {
            s.name: {
                "train_samples": s.train_samples,
                "test_samples": s.test_samples,
                "rounds_participated": s.rounds_participated,
                "federated": finals.get(s.name, {}),
                "local_only": s.local_only,
                # why a site left early; under DP, the ε it last reported (what it spent)
                **({"left": s.left} if s.left else {}),
                **({"epsilon": s.metrics["epsilon"]} if "epsilon" in s.metrics else {}),
            }
            for s in sites
        },
        "refused_updates": dict(sorted(refused.items())),
    }


def write_summary(out_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_json(out_dir / SUMMARY_FILE, summary)


def write_model_card(out_dir: Path, study: FederatedStudy, summary: Mapping[str, Any]) -> None:
    atomic_write_bytes(out_dir / MODEL_CARD_FILE, model_card(study, summary).encode())
