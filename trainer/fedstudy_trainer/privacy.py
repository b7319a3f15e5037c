"""Differential privacy at a site: DP-SGD with Opacus, its calibration and the privacy ledger.

- ``SitePrivacy.create`` checks the settings against the site's data and model, calibrates the
  noise once for the whole planned study (``rounds * localSteps`` steps at sample rate
  ``batchSize / train rows``) and opens the site's ledger.
- ``train_private`` runs DP-SGD steps with Poisson sampling: each row joins a step's batch
  independently with the sample rate, each row's gradient is clipped to ``maxGradNorm`` and
  Gaussian noise of standard deviation ``noise * maxGradNorm`` is added to their sum. It uses
  Opacus's ghost clipping where every trainable layer has a norm sampler (Linear, Embedding,
  ...) and the per-sample gradient hooks otherwise. The model is wrapped for one call only and
  unwrapped before it returns: the caller's module keeps its own parameter names.
- ``Ledger``: every step's (noise multiplier, sample rate), compressed as runs, on the site's
  state volume, written atomically before an update leaves the site. A restarted trainer
  continues it; an unreadable ledger is an error, never a fresh start.

Opacus (with the parts of torch.distributed and SciPy it pulls in: most of a second) is
imported by the functions that use it, so a study without ``spec.privacy`` never loads it.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from fedstudy import fsutil
from fedstudy.spec import Privacy, StudySpec, Training
from fedstudy_trainer.runtime import CPU, Runtime
from fedstudy_trainer.train import BatchAugment, FloatArray, TrainResult, make_optimizer

LEDGER_FILE = "privacy-ledger.json"
LEAVE_REASON = "privacy-budget-exhausted"
Mode = Literal["ghost", "hooks"]

# Opacus's backward hooks fire on the module outputs (the input rows need no gradient), and
# its RDP analysis notes when the best order is the largest it tries (the bound still holds).
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

# Relative slack when comparing an accountant's ε with the target: the same history summed
# in another order may differ in the last bits.
_EPS_SLACK = 1e-9


class PrivacyError(ValueError):
    """Privacy settings that cannot be used at this site; the message names the fix."""


class BudgetExhausted(Exception):
    """One more round would take the site past its target ε: it does not train."""


# --- accounting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """``steps`` consecutive DP-SGD steps with the same noise multiplier and sample rate."""

    noise: float
    sample_rate: float
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {"noise": self.noise, "sample_rate": self.sample_rate, "steps": self.steps}


def epsilon_of(runs: list[Run], delta: float, accountant: str) -> float:
    """ε after ``runs`` at ``delta``, by a fresh Opacus accountant of the named kind."""
    runs = [r for r in runs if r.steps > 0]
    if not runs:
        return 0.0
    if accountant == "gdp" and len({(r.noise, r.sample_rate) for r in runs}) > 1:
        raise PrivacyError(
            "spec.privacy.accountant: gdp cannot compose steps of different noise multipliers "
            "or sample rates (this site's ledger holds several); use rdp or prv"
        )
    from opacus.accountants import create_accountant  # type: ignore[import-untyped]

    acc = create_accountant(mechanism=accountant)
    if accountant == "gdp":
        acc.history = [(runs[0].noise, runs[0].sample_rate, sum(r.steps for r in runs))]
    else:
        acc.history = [(r.noise, r.sample_rate, r.steps) for r in runs]
    return float(acc.get_epsilon(delta=delta))


def sample_rate_of(batch_size: int, n_train: int) -> float:
    if n_train < 1:
        raise PrivacyError("DP-SGD needs at least one training row")
    return min(1.0, batch_size / n_train)


def calibrate(privacy: Privacy, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose ε after ``steps`` steps at
    ``sample_rate`` is at most ``privacy.targetEpsilon``."""
    from opacus.accountants.utils import get_noise_multiplier  # type: ignore[import-untyped]

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=privacy.targetEpsilon,
                target_delta=privacy.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=privacy.accountant,
            )
        )
    except ValueError as e:
        raise PrivacyError(
            f"spec.privacy.targetEpsilon: cannot calibrate noise for ε={privacy.targetEpsilon} "
            f"over {steps} steps at sample rate {sample_rate:.4g} ({e}); raise the budget or "
            "plan fewer rounds or local steps"
        ) from None


@dataclass
class Ledger:
    """The site's privacy history on its state volume."""

    path: Path
    study: str
    site: str
    runs: list[Run] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, study: str, site: str) -> Ledger:
        """The ledger at ``path``, or an empty one when there is no file yet."""
        if not path.exists():
            return cls(path, study, site)
        try:
            doc = fsutil.read_json(path)
            runs = [
                Run(float(r["noise"]), float(r["sample_rate"]), int(r["steps"]))
                for r in doc["runs"]
            ]
            rounds = [int(r) for r in doc.get("rounds", [])]
            owner = (doc["study"], doc["site"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PrivacyError(
                f"the privacy ledger {path} is unreadable ({e}); the site cannot know what it "
                "has spent, so it does not train. Restore the file from a backup"
            ) from None
        if owner != (study, site):
            raise PrivacyError(
                f"the privacy ledger {path} belongs to study {owner[0]!r}, site {owner[1]!r}, "
                f"not study {study!r}, site {site!r}; give this trainer its own --state-dir"
            )
        return cls(path, study, site, runs, rounds)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.runs)

    def add(self, run: Run, round_: int) -> None:
        """Adds ``run`` (merged into the last run when the settings are the same)."""
        last = self.runs[-1] if self.runs else None
        if last is not None and (last.noise, last.sample_rate) == (run.noise, run.sample_rate):
            self.runs[-1] = Run(last.noise, last.sample_rate, last.steps + run.steps)
        else:
            self.runs.append(run)
        self.rounds.append(round_)

    def save(self, **extra: Any) -> None:
        fsutil.atomic_write_json(
            self.path,
            {
                "study": self.study,
                "site": self.site,
                "runs": [r.to_json() for r in self.runs],
                "rounds": self.rounds,
                **extra,
                "updated_at": round(time.time(), 3),
            },
        )


# --- the model ----------------------------------------------------------------------------


def check_model(model: nn.Module) -> None:
    """Refuses layers DP-SGD cannot handle (BatchNorm mixes rows, ...), naming each layer."""
    from opacus.validators import ModuleValidator  # type: ignore[import-untyped]

    problems = []
    for name, sub in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is None or not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        for err in validator(sub):
            why = (
                "BatchNorm mixes the rows of a batch, so no row's gradient can be clipped alone"
                if isinstance(sub, nn.modules.batchnorm._BatchNorm)
                else str(err)
            )
            problems.append(f"layer {name or '(root)'} ({type(sub).__name__}): {why}")
    if problems:
        raise PrivacyError(
            "spec.model: DP-SGD cannot train this model: "
            + "; ".join(problems)
            + ". Use a model without these layers (BatchNorm → GroupNorm or LayerNorm: for "
            "cnn and densenet121 set spec.model.norm to group, or auto; "
            "opacus.validators.ModuleValidator.fix makes such replacements), or remove "
            "spec.privacy"
        )


def choose_mode(model: nn.Module) -> Mode:
    """Ghost clipping when every layer holding parameters has a norm sampler, else hooks.

    Opacus's recurrent layers (``DPGRU``, ``DPLSTM``) apply their linear layers
    (``RNNLinear``) once per time step: a row's gradient is the sum over its steps, which the
    per-sample gradient hooks compute and a linear layer's norm sampler does not, so such a
    model always trains with hooks."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping  # type: ignore[import-untyped]
    from opacus.layers.dp_rnn import RNNLinear  # type: ignore[import-untyped]

    samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for sub in model.modules():
        if isinstance(sub, RNNLinear):
            return "hooks"
        if any(True for _ in sub.parameters(recurse=False)) and type(sub) not in samplers:
            return "hooks"
    return "ghost"


# --- training -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DPSettings:
    noise: float
    sample_rate: float
    max_grad_norm: float
    expected_batch_size: float

    @property
    def noise_std(self) -> float:
        return self.noise * self.max_grad_norm


def _wrap(model: nn.Module, mode: Mode, settings: DPSettings) -> nn.Module:
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    wrapped: nn.Module
    if mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=settings.max_grad_norm,
            use_ghost_clipping=True,
        )
    else:
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return wrapped


def train_private(
    model: nn.Module,
    x: FloatArray,
    y: FloatArray,
    training: Training,
    settings: DPSettings,
    *,
    seed: int,
    steps: int,
    proximal_mu: float = 0.0,
    mode: Mode | None = None,
    runtime: Runtime = CPU,
    augment: BatchAugment | None = None,
) -> TrainResult:
    """Runs ``steps`` DP-SGD steps on (x, y), in place on ``model``.

    Batches are Poisson samples (each row with probability ``settings.sample_rate``; a batch
    may be empty and still gets its noise). Clipped gradients plus noise are divided by the
    expected batch size. FedProx's proximal gradient, which reads no data, is added after the
    noise. The loss returned is computed from the private data: keep it on the site.

    On a CUDA device the noise is drawn there, from a generator on that device: the same
    distribution as on a CPU, not the same numbers. Mixed precision is bfloat16 only (a
    float16 loss scale would scale the per-row gradients before they are clipped).
    """
    if runtime.loss_scaling:
        raise ValueError("DP-SGD cannot train with float16 loss scaling; use bfloat16")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping  # type: ignore[import-untyped]
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping  # type: ignore[import-untyped]

    started = time.perf_counter()
    mode = mode or choose_mode(model)
    model.to(runtime.device)
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    n = len(labels)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    base = make_optimizer(params, training)
    noise_gen = torch.Generator(device=runtime.device).manual_seed(seed)
    sampler = np.random.default_rng(seed)
    if augment is not None:
        augment.reseed(seed)
    expected = settings.expected_batch_size
    wrapped = _wrap(model, mode, settings)
    optimizer: DPOptimizer
    criterion: DPLossFastGradientClipping | None = None
    if mode == "ghost":
        optimizer = DPOptimizerFastGradientClipping(
            base,
            noise_multiplier=settings.noise,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction="mean",
            generator=noise_gen,
        )
        assert isinstance(wrapped, GradSampleModuleFastGradientClipping)
        criterion = DPLossFastGradientClipping(
            wrapped, optimizer, nn.BCEWithLogitsLoss(reduction="mean"), "mean"
        )
    else:
        optimizer = DPOptimizer(
            base,
            noise_multiplier=settings.noise,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction="mean",
            generator=noise_gen,
        )
    losses: list[torch.Tensor] = []
    samples = (np.flatnonzero(sampler.random(n) < settings.sample_rate) for _ in range(steps))
    wrapped.train()
    try:
        with torch.random.fork_rng(devices=runtime.rng_devices):
            torch.manual_seed(seed)  # dropout masks
            for xb, yb in runtime.batches(features, labels, samples):
                optimizer.zero_grad(set_to_none=True)
                if len(yb) == 0:
                    # No row in this step's sample: the update is the noise alone.
                    for p in params:
                        noise = torch.normal(
                            0.0,
                            settings.noise_std,
                            p.shape,
                            generator=noise_gen,
                            device=p.device,
                        )
                        p.grad = noise / expected
                else:
                    inputs = augment(xb) if augment is not None else xb
                    with runtime.autocast():
                        logits = wrapped(inputs)
                    logits = logits.float()
                    if criterion is not None:
                        dp_loss = criterion(logits, yb)
                        dp_loss.backward()
                        losses.append(dp_loss.detach())
                    else:
                        loss = functional.binary_cross_entropy_with_logits(logits, yb)
                        loss.backward()  # type: ignore[no-untyped-call]
                        losses.append(loss.detach())
                    optimizer.pre_step()
                if anchor:
                    for p, a in zip(params, anchor, strict=True):
                        assert p.grad is not None
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
                base.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        plain = wrapped.to_standard_module()  # type: ignore[operator]
        assert plain is model
    model.eval()
    counted = len(losses)
    total = sum(float(v) for v in losses)  # one synchronisation with the device, at the end
    return TrainResult(
        loss=total / counted if counted else math.nan,
        steps=steps,
        seconds=time.perf_counter() - started,
    )


# --- the site -----------------------------------------------------------------------------


@dataclass
class SitePrivacy:
    """One site's DP settings, calibrated noise and ledger."""

    privacy: Privacy
    settings: DPSettings
    steps_per_round: int
    planned_steps: int
    ledger: Ledger
    calibrated: bool
    mode: Mode

    @classmethod
    def create(
        cls,
        spec: StudySpec,
        study: str,
        site: str,
        n_train: int,
        model: nn.Module,
        state_dir: Path,
    ) -> SitePrivacy:
        privacy = spec.privacy
        if privacy is None:
            raise ValueError("the study has no spec.privacy")
        if n_train < 1:
            raise PrivacyError(f"site {site} has no training rows")
        if privacy.delta >= 1.0 / n_train:
            raise PrivacyError(
                f"spec.privacy.delta: {privacy.delta:g} is not below 1 / {n_train} "
                f"(site {site} has {n_train} train rows); a δ that large allows "
                f"leaking a whole row. Set delta below {1.0 / n_train:.3g}, e.g. "
                f"{10 ** math.floor(math.log10(0.1 / n_train)):g}"
            )
        model.train()
        check_model(model)
        model.eval()
        q = sample_rate_of(spec.training.batchSize, n_train)
        per_round = spec.training.localSteps
        planned = spec.rounds * per_round
        calibrated = privacy.noiseMultiplier is None
        noise = (
            calibrate(privacy, q, planned) if calibrated else float(privacy.noiseMultiplier or 0)
        )
        settings = DPSettings(
            noise=noise,
            sample_rate=q,
            max_grad_norm=privacy.maxGradNorm,
            expected_batch_size=q * n_train,
        )
        ledger = Ledger.open(state_dir / LEDGER_FILE, study, site)
        return cls(privacy, settings, per_round, planned, ledger, calibrated, choose_mode(model))

    def epsilon(self) -> float:
        """ε spent so far, by the study's accountant, from the ledger."""
        return epsilon_of(self.ledger.runs, self.privacy.delta, self.privacy.accountant)

    def next_round(self) -> Run:
        return Run(self.settings.noise, self.settings.sample_rate, self.steps_per_round)

    def epsilon_after_next_round(self) -> float:
        runs = [*self.ledger.runs, self.next_round()]
        return epsilon_of(runs, self.privacy.delta, self.privacy.accountant)

    def exhausted(self) -> bool:
        """Whether training one more round would pass the target ε."""
        target = self.privacy.targetEpsilon
        return self.epsilon_after_next_round() > target * (1 + _EPS_SLACK)

    def charge(self, round_: int) -> float:
        """Records one round's steps in the ledger, on disk, and returns ε after them.

        Called before the round's update leaves the site (a crash after it only overstates
        what was spent)."""
        self.ledger.add(self.next_round(), round_)
        spent = self.epsilon()
        self.ledger.save(
            accountant=self.privacy.accountant,
            delta=self.privacy.delta,
            target_epsilon=self.privacy.targetEpsilon,
            epsilon=spent,
        )
        return spent

    def metrics(self) -> dict[str, float]:
        """What the site reports with each evaluation: ε spent so far and δ."""
        return {"epsilon": self.epsilon(), "delta": self.privacy.delta}

    def train(
        self,
        model: nn.Module,
        x: FloatArray,
        y: FloatArray,
        training: Training,
        *,
        seed: int,
        proximal_mu: float = 0.0,
        runtime: Runtime = CPU,
        augment: BatchAugment | None = None,
    ) -> TrainResult:
        return train_private(
            model,
            x,
            y,
            training,
            self.settings,
            seed=seed,
            steps=self.steps_per_round,
            proximal_mu=proximal_mu,
            mode=self.mode,
            runtime=runtime,
            augment=augment,
        )

    def train_round(
        self,
        model: nn.Module,
        x: FloatArray,
        y: FloatArray,
        training: Training,
        *,
        round_: int,
        seed: int,
        proximal_mu: float = 0.0,
        runtime: Runtime = CPU,
        augment: BatchAugment | None = None,
    ) -> TrainResult:
        """Checks the budget, charges the ledger (on disk) and trains one round.

        Raises BudgetExhausted, training nothing and charging nothing, when the round would
        take the site past its target ε."""
        if self.exhausted():
            spent, target = self.epsilon(), self.privacy.targetEpsilon
            raise BudgetExhausted(
                f"privacy budget exhausted: ε spent {spent:.4g}, round {round_} would bring it "
                f"to {self.epsilon_after_next_round():.4g}, above the target {target:g} "
                f"(δ={self.privacy.delta:g}, noise multiplier {self.settings.noise:.4g})"
            )
        self.charge(round_)
        return self.train(
            model,
            x,
            y,
            training,
            seed=seed,
            proximal_mu=proximal_mu,
            runtime=runtime,
            augment=augment,
        )

    def describe(self) -> dict[str, Any]:
        """The site's DP settings and what its ledger holds, for the logs."""
        return {
            "noise_multiplier": self.settings.noise,
            "calibrated": self.calibrated,
            "sample_rate": self.settings.sample_rate,
            "max_grad_norm": self.settings.max_grad_norm,
            "planned_steps": self.planned_steps,
            "target_epsilon": self.privacy.targetEpsilon,
            "delta": self.privacy.delta,
            "accountant": self.privacy.accountant,
            "mode": self.mode,
            "ledger": str(self.ledger.path),
            "ledger_steps": self.ledger.steps,
            "epsilon_spent": self.epsilon(),
        }
