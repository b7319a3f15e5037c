"""Local training, evaluation and the local-only baseline.

Training is reproducible: the minibatch order (and dropout) of a site's round comes from a
seed derived from the study's seed, the site's name and the round, so a restarted trainer
that trains the same round from the same global model sends the same weights.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.nn import functional

from fedstudy.spec import StudySpec, Training
from fedstudy_trainer.data import SiteDataset
from fedstudy_trainer.models import build_model
from fedstudy_trainer.runtime import CPU, Runtime

FloatArray = npt.NDArray[np.float32]

# The stream of random numbers of the local-only baseline (rounds are 1, 2, ...).
BASELINE_STREAM = "local-baseline"


def derive_seed(study_seed: int, site: str, stream: int | str) -> int:
    """A 63-bit seed from the study's seed, the site's name and a stream (a round number)."""
    digest = hashlib.sha256(f"{study_seed}\0{site}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def minibatches(
    n: int, batch_size: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Row indices, batch after batch, cycling through freshly shuffled epochs.

    The last batch of an epoch may be smaller (as a PyTorch DataLoader without drop_last).
    """
    if n < 1:
        raise ValueError("no training rows")
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


class BatchAugment(Protocol):
    """Random changes to training batches (e.g. image flips), reproducible from a seed."""

    def reseed(self, seed: int) -> None: ...

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


# Rows per forward pass at evaluation: a table's whole test split; a few dozen large images.
EVAL_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss (the data loss, without the proximal term) over the steps
    steps: int
    seconds: float


def make_optimizer(params: list[nn.Parameter], training: Training) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=training.learningRate,
            momentum=training.momentum,
            weight_decay=training.weightDecay,
        )
    return torch.optim.Adam(params, lr=training.learningRate, weight_decay=training.weightDecay)


def train_local(
    model: nn.Module,
    x: FloatArray,
    y: FloatArray,
    training: Training,
    *,
    seed: int,
    steps: int | None = None,
    proximal_mu: float = 0.0,
    runtime: Runtime = CPU,
    augment: BatchAugment | None = None,
) -> TrainResult:
    """Runs ``steps`` (default ``training.localSteps``) optimizer steps on (x, y) in place.

    With ``proximal_mu > 0`` (FedProx) each step's loss adds ``mu/2 * ||w - w0||²``, ``w0``
    being the weights the model had on entry (the global model). The model moves to
    ``runtime.device``; ``augment`` changes each training batch (reseeded from ``seed``).
    """
    n_steps = training.localSteps if steps is None else steps
    started = time.perf_counter()
    model.to(runtime.device)
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = make_optimizer(params, training)
    scaler = runtime.grad_scaler()
    batches = minibatches(len(labels), training.batchSize, np.random.default_rng(seed))
    if augment is not None:
        augment.reseed(seed)
    losses: list[torch.Tensor] = []
    model.train()
    with torch.random.fork_rng(devices=runtime.rng_devices):
        torch.manual_seed(seed)  # dropout masks
        for xb, yb in runtime.batches(features, labels, itertools.islice(batches, n_steps)):
            inputs = augment(xb) if augment is not None else xb
            optimizer.zero_grad(set_to_none=True)
            with runtime.autocast():
                logits = model(inputs)
            loss = functional.binary_cross_entropy_with_logits(logits.float(), yb)
            objective = loss
            if anchor:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                objective = loss + 0.5 * proximal_mu * drift
            scaler.scale(objective).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
    model.eval()
    total = sum(float(v) for v in losses)  # one synchronisation with the device, at the end
    return TrainResult(
        loss=total / n_steps if n_steps else math.nan,
        steps=n_steps,
        seconds=time.perf_counter() - started,
    )


def evaluate(
    model: nn.Module, x: FloatArray, y: FloatArray, runtime: Runtime = CPU
) -> dict[str, float]:
    """Loss, accuracy (sigmoid > 0.5), AUC and AUPRC; ``auc`` and ``auprc`` are left out
    when y has one class."""
    model.to(runtime.device)
    model.eval()
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    per_row = max(1, math.prod(features.shape[1:]))
    chunk = max(1, EVAL_ELEMENTS // per_row)
    with torch.no_grad():
        parts = []
        for start in range(0, len(features), chunk):
            with runtime.autocast():
                out = model(runtime.to_device(features[start : start + chunk]))
            parts.append(out.float().cpu())
        logits = torch.cat(parts) if parts else torch.zeros(0)
        labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        loss = float(functional.binary_cross_entropy_with_logits(logits, labels))
        probs = torch.sigmoid(logits).numpy().astype(np.float64)
    truth = np.asarray(y, dtype=np.float64)
    metrics = {"loss": loss, "accuracy": float(((probs > 0.5) == (truth > 0.5)).mean())}
    if len(np.unique(truth)) == 2:
        metrics.update(ranking_metrics(truth, probs))
    return metrics


def ranking_metrics(
    truth: npt.NDArray[np.float64], probs: npt.NDArray[np.float64]
) -> dict[str, float]:
    """AUC (area under the ROC curve) and AUPRC (area under the precision-recall curve, as
    average precision), for labels of both classes."""
    return {
        "auc": float(roc_auc_score(truth, probs)),
        "auprc": float(average_precision_score(truth, probs)),
    }


def local_baseline(
    spec: StudySpec,
    site: str,
    data: SiteDataset,
    runtime: Runtime = CPU,
    augment: BatchAugment | None = None,
) -> dict[str, float]:
    """The site's local-only model: same model and seed, ``rounds * localSteps`` steps here."""
    model = build_model(spec.model, data.input_shape, spec.seed)
    train_local(
        model,
        data.X_train,
        data.y_train,
        spec.training,
        seed=derive_seed(spec.seed, site, BASELINE_STREAM),
        steps=spec.rounds * spec.training.localSteps,
        runtime=runtime,
        augment=augment,
    )
    return evaluate(model, data.X_test, data.y_test, runtime)
