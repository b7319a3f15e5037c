"""Training throughput of the image models: images per second, with and without DP-SGD.

Usage: .venv/bin/python bench/imaging_speed.py [--size 224] [--batch 16] [--steps 5]
           [--repeats 3] [--models cnn,densenet121] [--device auto] [--mixed-precision]
           [--threads N]

For each model (the small CNN with ``--cnn-channels``, MONAI's DenseNet-121) it trains
``--steps`` local steps on random grayscale images of ``--size`` x ``--size`` pixels after two
warm-up steps, ``--repeats`` times, through the trainer's own code
(``train_local``; ``train_private`` for DP-SGD with Poisson batches of the same expected size,
noise multiplier 1, clipping 1), on the device a site with ``resources.device: --device``
would get here (a CUDA GPU when there is one).
Prints the device, then one line per (model, mode): milliseconds per step (the fastest run
and the median run: on a shared machine the fastest is the one least slowed by others) and
images per second of the fastest run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from fedstudy_trainer.models import build_model
from fedstudy_trainer.privacy import DPSettings, choose_mode, train_private
from fedstudy_trainer.runtime import Runtime, site_runtime
from fedstudy_trainer.train import train_local

from fedstudy.spec import Model, Training


def images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, size, size), dtype=np.float32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    return x, y


def timed(
    model_spec: Model,
    dp: bool,
    size: int,
    batch: int,
    steps: int,
    repeats: int,
    runtime: Runtime,
) -> tuple[float, float, str]:
    """Seconds per step of the fastest and the median of ``repeats`` runs of ``steps`` steps,
    and the DP mode."""
    rows = batch * 8
    x, y = images(rows, size, seed=0)
    model = build_model(model_spec, (1, size, size), seed=0, private=dp)
    training = Training(localSteps=steps, batchSize=batch, optimizer="sgd", learningRate=0.01)
    mode = choose_mode(model) if dp else "-"
    settings = DPSettings(
        noise=1.0, sample_rate=batch / rows, max_grad_norm=1.0, expected_batch_size=batch
    )

    def run(n: int) -> float:
        if runtime.cuda:
            torch.cuda.synchronize(runtime.device)
        started = time.perf_counter()
        if dp:
            train_private(model, x, y, training, settings, seed=1, steps=n, runtime=runtime)
        else:
            train_local(model, x, y, training, seed=1, steps=n, runtime=runtime)
        if runtime.cuda:
            torch.cuda.synchronize(runtime.device)
        return time.perf_counter() - started

    run(2)  # warm-up: allocations, kernels, Opacus hooks
    runs = [run(steps) / steps for _ in range(repeats)]
    return min(runs), statistics.median(runs), mode


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs")
    parser.add_argument("--models", default="cnn,densenet121")
    parser.add_argument("--cnn-channels", default="16,32,64", help="the CNN's blocks")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--mixed-precision", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.cnn_channels.split(",")]
    specs = {
        "cnn": Model(name="cnn", channels=channels),
        "densenet121": Model(name="densenet121"),
    }
    plain = site_runtime(args.device, args.mixed_precision, private=False)
    private = site_runtime(args.device, args.mixed_precision, private=True)
    described = plain.describe()
    print(
        f"torch {torch.__version__}, device {described['device']}"
        + (f" ({described['device_name']})" if "device_name" in described else "")
        + f", {torch.get_num_threads()} CPU thread(s), mixed precision "
        f"{described['mixed_precision'] or 'off'}, {args.size}x{args.size} grayscale, "
        f"batch {args.batch}, {args.repeats} runs of {args.steps} timed steps"
    )
    for name in args.models.split(","):
        spec = specs[name]
        params = sum(p.numel() for p in build_model(spec, (1, args.size, args.size)).parameters())
        base = 0.0
        for dp in (False, True):
            runtime = private if dp else plain
            per_step, median, mode = timed(
                spec, dp, args.size, args.batch, args.steps, args.repeats, runtime
            )
            base = per_step if not dp else base
            label = f"DP ({mode})" if dp else "no DP"
            print(
                f"{name:12s} params={params:9d} {label:12s} {per_step * 1e3:9.1f} ms/step "
                f"(median {median * 1e3:9.1f}) {args.batch / per_step:8.1f} images/s  "
                f"x{per_step / base:5.2f} vs no DP"
            )


if __name__ == "__main__":
    main()
