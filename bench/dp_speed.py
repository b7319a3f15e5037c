"""Time per local epoch with DP-SGD (Opacus ghost clipping and per-sample hooks) vs without DP.

Usage: .venv/bin/python bench/dp_speed.py [--repeats 5] [--threads 1]

Two models: the heart-disease MLP (13 features, hidden [32], Cleveland's 199 train rows,
batch 4) and a ~1M-parameter MLP (1000 features, hidden [1000], 512 rows, batch 64). An
epoch is ``rows / batch`` steps; DP steps use Poisson batches of the same expected size.
Prints one line per (model, mode) with the median seconds per epoch and the ratio to no DP.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from fedstudy_trainer.models import build_model
from fedstudy_trainer.privacy import DPSettings, choose_mode, train_private
from fedstudy_trainer.train import train_local

from fedstudy.spec import Model, Training

CASES = {
    "heart-mlp-13x32": (13, [32], 199, 4),
    "mlp-1M-1000x1000": (1000, [1000], 512, 64),
}


def one_epoch(
    mode: str, features: int, hidden: list[int], rows: int, batch: int, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    model = build_model(Model(name="mlp", hidden=hidden), features, seed)
    steps = max(1, rows // batch)
    training = Training(localSteps=steps, batchSize=batch, learningRate=0.05)
    started = time.perf_counter()
    if mode == "no-dp":
        train_local(model, x, y, training, seed=seed)
    else:
        settings = DPSettings(
            noise=1.0, sample_rate=batch / rows, max_grad_norm=1.0, expected_batch_size=batch
        )
        train_private(model, x, y, training, settings, seed=seed, steps=steps, mode=mode)  # type: ignore[arg-type]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} epochs")
    for name, (features, hidden, rows, batch) in CASES.items():
        params = sum(
            p.numel() for p in build_model(Model(name="mlp", hidden=hidden), features).parameters()
        )
        chosen = choose_mode(build_model(Model(name="mlp", hidden=hidden), features))
        base = 0.0
        for mode in ("no-dp", "ghost", "hooks"):
            one_epoch(mode, features, hidden, rows, batch, seed=99)  # warm-up
            times = [
                one_epoch(mode, features, hidden, rows, batch, seed=i) for i in range(args.repeats)
            ]
            median = statistics.median(times)
            base = median if mode == "no-dp" else base
            print(
                f"{name:18s} params={params:8d} steps/epoch={rows // batch:3d} {mode:6s} "
                f"{median * 1e3:9.2f} ms/epoch  x{median / base:5.2f} vs no-dp"
                + ("  (trainer's choice)" if mode == chosen else "")
            )


if __name__ == "__main__":
    main()
