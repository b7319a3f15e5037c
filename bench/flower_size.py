"""Flower 1.42 at size, for bench/aggregation.py --flower: ``run_simulation`` with N
ClientApps that send back a perturbed copy of the model (no training) and FedAvg.

Runs with .venv-flower's Python. Prints one JSON line: seconds per round (the rounds'
total over their count), and the peak resident memory of this process, where the ServerApp
keeps the replies and aggregates them (Ray's workers and object store are other processes
and are not counted).

    .venv-flower/bin/python bench/flower_size.py --params 25000000 --sites 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

TENSOR_PARAMS = 4096 * 4096
PARAMS_ENV = "FEDSTUDY_BENCH_PARAMS"
ROUNDS_ENV = "FEDSTUDY_BENCH_ROUNDS"
SITES_ENV = "FEDSTUDY_BENCH_SITES"
_out: dict[str, float] = {}


def layout(params: int) -> list[tuple[str, tuple[int, int]]]:
    """As bench/benchlib.py's model_layout: float32 tensors of at most 4096 x 4096 values."""
    out, left, i = [], params, 0
    while left > 0:
        n = min(left, TENSOR_PARAMS)
        cols = 4096 if n % 4096 == 0 and n >= 4096 else n
        out.append((f"layer{i}.weight", (n // cols, cols)))
        left -= n
        i += 1
    return out


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    rng = np.random.default_rng(int(context.node_config["partition-id"]))
    out = {}
    for name, arr in arrays.items():  # type: ignore[union-attr]
        a = arr.numpy()
        a += np.float32(rng.normal(0, 1e-3))
        out[name] = Array(a)
    content = RecordDict(
        {"arrays": ArrayRecord(out), "metrics": MetricRecord({"num-examples": 100})}
    )
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    params = int(os.environ[PARAMS_ENV])
    sites = int(os.environ[SITES_ENV])
    rng = np.random.default_rng(0)
    initial = {
        name: rng.normal(0, 0.02, size=shape).astype(np.float32) for name, shape in layout(params)
    }
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=sites,
        min_available_nodes=sites,
    )
    arrays = ArrayRecord({name: Array(a) for name, a in initial.items()})
    del initial
    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(os.environ[ROUNDS_ENV]))
    _out["rounds_s"] = time.perf_counter() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--sites", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ[PARAMS_ENV] = str(args.params)
    os.environ[SITES_ENV] = str(args.sites)
    os.environ[ROUNDS_ENV] = str(args.rounds)
    idle = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=args.sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = 4 * args.params
    print(
        json.dumps(
            {
                "params": args.params,
                "sites": args.sites,
                "rounds": args.rounds,
                "round_s": _out["rounds_s"] / args.rounds if "rounds_s" in _out else None,
                "idle_rss": idle,
                "peak_rss": peak,
                "peak_over_model": (peak - idle) / model_bytes,
            }
        ),
        flush=True,
    )
