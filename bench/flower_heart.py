"""The heart-disease study in Flower 1.42 (``run_simulation``), for bench/end_to_end.py.

Runs with .venv-flower's Python (bench/setup-flower.sh). The sites' data, model, seeds and
local training are fedstudy's own trainer code (``fedstudy_trainer`` on the path), so both
systems do the same arithmetic: logistic regression, batch 4, 100 local SGD steps at lr 1e-3
per round, each site's minibatch order drawn from the same seed, and FedAvg weighted by
training rows. Flower's ``FedAvg`` evaluates the global model on every site each round, as
fedstudy's trainers do.

    .venv-flower/bin/python bench/flower_heart.py --study STUDY.yaml --rounds 10

Prints one JSON line: the seconds inside ``run_simulation``, the seconds from the start of
the process, and each site's test accuracy of the final model.
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Ray's workers run the ClientApp: they find fedstudy's code through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), str(ROOT / "trainer"), os.environ.get("PYTHONPATH", "")]
).rstrip(os.pathsep)
sys.path[:0] = [str(ROOT), str(ROOT / "trainer")]

import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

STUDY_ENV = "FEDSTUDY_BENCH_STUDY"
ROUNDS_ENV = "FEDSTUDY_BENCH_ROUNDS"
_cache: dict[str, Any] = {}


def _study() -> Any:
    from fedstudy.spec import load_study

    if "study" not in _cache:
        _cache["study"] = load_study(os.environ[STUDY_ENV])
    return _cache["study"]


def _data(site: str) -> Any:
    from fedstudy_trainer.data import load_site_data

    key = f"data:{site}"
    if key not in _cache:
        path = Path(os.environ[STUDY_ENV])
        _cache[key] = load_site_data(_study(), site, path.resolve().parent)
    return _cache[key]


def _site(context: Context) -> str:
    index = int(context.node_config["partition-id"])
    return str(_study().spec.sites[index].name)


def _model(site: str, arrays: ArrayRecord) -> Any:
    from fedstudy_trainer.models import build_model

    spec = _study().spec
    model = build_model(spec.model, _data(site).input_shape, spec.seed)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    from fedstudy_trainer.train import derive_seed, train_local

    site = _site(context)
    data = _data(site)
    spec = _study().spec
    model = _model(site, msg.content["arrays"])  # type: ignore[arg-type]
    round_ = int(msg.content["config"]["server-round"])  # type: ignore[index]
    result = train_local(
        model,
        data.X_train,
        data.y_train,
        spec.training,
        seed=derive_seed(spec.seed, site, round_),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": result.loss, "num-examples": data.n_train}),
        }
    )
    return Message(content=content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedstudy_trainer.train import evaluate as evaluate_model

    site = _site(context)
    data = _data(site)
    model = _model(site, msg.content["arrays"])  # type: ignore[arg-type]
    metrics = evaluate_model(model, data.X_test, data.y_test)
    content = RecordDict(
        {"metrics": MetricRecord({**metrics, "num-examples": data.n_test})},
    )
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from fedstudy_trainer.models import build_model

    study = _study()
    sites = len(study.spec.sites)
    first = study.spec.sites[0].name
    model = build_model(study.spec.model, _data(first).input_shape, study.spec.seed)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=sites,
        min_evaluate_nodes=sites,
        min_available_nodes=sites,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(os.environ[ROUNDS_ENV]),
    )
    _cache["final"] = result.arrays


def run(study: Path, rounds: int, cpus_per_client: float) -> dict[str, Any]:
    from fedstudy_trainer.train import evaluate as evaluate_model

    os.environ[STUDY_ENV] = str(study.resolve())
    os.environ[ROUNDS_ENV] = str(rounds)
    spec = _study().spec
    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=len(spec.sites),
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
    )
    inside = time.perf_counter() - t0
    final = _cache.get("final")
    if final is None:
        raise SystemExit("the ServerApp ended without a final model")
    accuracy = {}
    for site in spec.sites:
        model = _model(site.name, final)
        data = _data(site.name)
        accuracy[site.name] = evaluate_model(model, data.X_test, data.y_test)["accuracy"]
    return {
        "inside_run_simulation_s": inside,
        "process_s": time.perf_counter() - STARTED,
        "accuracy": accuracy,
        "mean_accuracy": float(np.mean(list(accuracy.values()))),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cpus-per-client", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(run(args.study, args.rounds, args.cpus_per_client)), flush=True)
