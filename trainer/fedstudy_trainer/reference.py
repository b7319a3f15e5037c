"""Plain in-process FedAvg over several sites' datasets: no network, no aggregator.

This is the floor the federated system is measured against: the same data pipeline, model,
seeds and local training as the site trainers, the averaging done here in a loop. With the
same study, a study run through the aggregator should land on the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedstudy.spec import FederatedStudy, StudySpec, load_study
from fedstudy_trainer.data import SiteDataset, load_site_data
from fedstudy_trainer.models import Weights, build_model, get_weights, set_weights
from fedstudy_trainer.train import derive_seed, evaluate, train_local


@dataclass
class FedAvgResult:
    # Metrics of the final global model on each site's test split.
    site_metrics: dict[str, dict[str, float]]
    # Mean training loss of each site, per round (index 0 is round 1).
    train_loss: dict[str, list[float]] = field(default_factory=dict)
    weights: Weights = field(default_factory=dict)

    def mean(self, metric: str = "accuracy") -> float:
        """The metric averaged over sites, unweighted (as FLamby reports it)."""
        return float(np.mean([m[metric] for m in self.site_metrics.values()]))


def average(updates: list[tuple[Weights, int]]) -> Weights:
    """Sample-weighted mean of several models' weights (computed in float64)."""
    total = sum(n for _, n in updates)
    names = list(updates[0][0])
    return {
        name: np.asarray(
            sum(w[name].astype(np.float64) * (n / total) for w, n in updates), dtype=np.float32
        )
        for name in names
    }


def fedavg(
    spec: StudySpec,
    datasets: Mapping[str, SiteDataset],
    *,
    rounds: int | None = None,
    proximal_mu: float | None = None,
) -> FedAvgResult:
    """FedAvg (FedProx with ``proximal_mu``) over ``datasets``, keyed by site name.

    Round ``r``: every site starts from the global model, trains ``localSteps`` steps with
    the seed its trainer would use, and the global model becomes the average of the sites'
    weights, weighted by training rows.
    """
    n_rounds = spec.rounds if rounds is None else rounds
    mu = spec.strategy.proximal_mu if proximal_mu is None else proximal_mu
    sizes = {d.input_shape for d in datasets.values()}
    if len(sizes) != 1:
        raise ValueError(f"sites disagree on the shape of an example: {sorted(sizes)}")
    model = build_model(spec.model, sizes.pop(), spec.seed)
    global_weights = get_weights(model)
    losses: dict[str, list[float]] = {site: [] for site in datasets}
    for r in range(1, n_rounds + 1):
        updates = []
        for site, data in datasets.items():
            set_weights(model, global_weights)
            result = train_local(
                model,
                data.X_train,
                data.y_train,
                spec.training,
                seed=derive_seed(spec.seed, site, r),
                proximal_mu=mu,
            )
            losses[site].append(result.loss)
            updates.append((get_weights(model), data.n_train))
        global_weights = average(updates)
    set_weights(model, global_weights)
    metrics = {site: evaluate(model, d.X_test, d.y_test) for site, d in datasets.items()}
    return FedAvgResult(site_metrics=metrics, train_loss=losses, weights=global_weights)


def load_all_sites(study: FederatedStudy, base_dir: Path) -> dict[str, SiteDataset]:
    """Every site's dataset, for in-process experiments (a real trainer reads only its own)."""
    return {s.name: load_site_data(study, s.name, base_dir) for s in study.spec.sites}


def fedavg_study(
    path: str | Path,
    *,
    seed: int | None = None,
    rounds: int | None = None,
    proximal_mu: float | None = None,
) -> FedAvgResult:
    """Runs ``fedavg`` on a study file (its seed replaced by ``seed`` when given), reading
    all its sites' data on this machine."""
    study_path = Path(path).resolve()
    study = load_study(study_path)
    spec = study.spec if seed is None else study.spec.model_copy(update={"seed": seed})
    datasets = load_all_sites(study, study_path.parent)
    return fedavg(spec, datasets, rounds=rounds, proximal_mu=proximal_mu)
