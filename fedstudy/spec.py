"""The FederatedStudy document: one strict, typed model shared by every engine.

A study is a Kubernetes custom resource and also a file that ``fedstudy run`` reads. This
module parses it (``load_study``), checks the parts that only make sense on the machine that
runs it (``check_local_files``) and turns every problem into a message that names the field
path and the value (``StudyError``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

API_VERSION = "fedstudy.io/v1alpha1"
KIND = "FederatedStudy"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class StudyError(ValueError):
    """A study document that cannot be used. Each problem is one line: ``path: message``."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "invalid study\n" + "\n".join(f"  {p}" for p in self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{what} must be a DNS-1123 label (lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most 63 characters), got {value!r}"
        )
    return value


class Metadata(BaseModel):
    """Kubernetes object metadata. Fields the API server adds (uid, resourceVersion, ...) pass."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_label(v, "a study name")


class Binarize(_Strict):
    """Turns a numeric label column into 0/1: positive when the value is above ``above``."""

    above: float = Field(strict=False)


class Task(_Strict):
    type: Literal["binary-classification"] = "binary-classification"
    label: str = Field(min_length=1)
    metric: Literal["auc", "auprc", "accuracy", "loss"] = "auc"
    binarize: Binarize | None = None


# Models that read images (examples of shape (channels, height, width)).
IMAGE_MODELS = ("cnn", "densenet121")
# Models that read sequences (examples of shape (time steps, channels)).
SEQUENCE_MODELS = ("gru", "lstm", "tcn")
# Gradient-boosted trees, grown with XGBoost's federated mode rather than by gradient steps.
TREE_MODELS = ("xgboost",)


def _either(names: tuple[str, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# The fields that belong to some models only, and the models they belong to.
_MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "hiddenSize": SEQUENCE_MODELS,
    "layers": SEQUENCE_MODELS,
    "kernelSize": ("tcn",),
    "maxDepth": TREE_MODELS,
    "learningRate": TREE_MODELS,
    "minChildWeight": TREE_MODELS,
    "regLambda": TREE_MODELS,
    "maxBin": TREE_MODELS,
}


class Model(_Strict):
    """The study's model.

    ``cnn`` is a small convolutional network: one block (3x3 convolution, normalisation, ReLU,
    2x2 max-pooling) per entry of ``channels``, then global average pooling and a linear layer.
    ``densenet121`` is MONAI's 2-D DenseNet-121. ``norm`` is their normalisation layer:
    ``auto`` is GroupNorm under DP-SGD (``spec.privacy``) and BatchNorm otherwise.

    ``gru`` and ``lstm`` read sequences with ``layers`` recurrent layers of ``hiddenSize``
    units (default 32 and 1); ``tcn`` with ``layers`` causal dilated 1-D convolutions
    (dilations 1, 2, 4, ...) of ``hiddenSize`` channels and width ``kernelSize`` (default 32,
    2 and 3). ``xgboost`` grows one tree of depth ``maxDepth`` (default 3) per round, with
    XGBoost's ``learningRate`` (eta, default 0.3), ``minChildWeight`` (default 1),
    ``regLambda`` (L2, default 1) and ``maxBin`` histogram bins (default 256).
    """

    name: Literal[
        "logistic-regression", "mlp", "cnn", "densenet121", "gru", "lstm", "tcn", "xgboost"
    ]
    hidden: list[PositiveInt] = Field(default_factory=list)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, strict=False)
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=list)
    norm: Literal["auto", "batch", "group", "none"] = "auto"
    hiddenSize: int | None = Field(default=None, ge=1, le=4096)
    layers: int | None = Field(default=None, ge=1, le=16)
    kernelSize: int | None = Field(default=None, ge=2, le=64)
    maxDepth: int | None = Field(default=None, ge=1, le=10)
    learningRate: float | None = Field(default=None, gt=0, le=1, strict=False)
    minChildWeight: float | None = Field(default=None, ge=0, strict=False)
    regLambda: float | None = Field(default=None, ge=0, strict=False)
    maxBin: int | None = Field(default=None, ge=2, le=4096)

    @model_validator(mode="after")
    def _hidden(self) -> Model:
        if self.name == "mlp" and not self.hidden:
            raise ValueError("an mlp needs at least one hidden layer size in 'hidden', e.g. [32]")
        if self.name == "logistic-regression" and self.hidden:
            raise ValueError(
                f"logistic-regression has no hidden layers; remove 'hidden' ({self.hidden}) "
                "or use name: mlp"
            )
        return self

    @model_validator(mode="after")
    def _image_fields(self) -> Model:
        image = self.name in IMAGE_MODELS
        if image and self.hidden:
            raise ValueError(
                f"{self.name} has no 'hidden' layer sizes ({self.hidden}); "
                + ("size its blocks with 'channels'" if self.name == "cnn" else "remove them")
            )
        if self.name == "cnn" and not self.channels:
            raise ValueError(
                "a cnn needs the output channels of each convolution block in 'channels', "
                "e.g. [16, 32]"
            )
        if self.name != "cnn" and self.channels:
            raise ValueError(f"'channels' sizes the blocks of a cnn; {self.name} does not use it")
        if not image and self.norm != "auto":
            raise ValueError(
                f"'norm' chooses the normalisation layers of {' and '.join(IMAGE_MODELS)}; "
                f"{self.name} has none"
            )
        if self.name == "densenet121" and self.norm == "none":
            raise ValueError("densenet121 needs a normalisation layer: use norm batch or group")
        return self

    @model_validator(mode="after")
    def _sequence_and_tree_fields(self) -> Model:
        for field, owners in _MODEL_FIELDS.items():
            value = getattr(self, field)
            if value is not None and self.name not in owners:
                raise _FieldProblem(
                    (field,),
                    f"{value!r}: '{field}' belongs to {_either(owners)}; "
                    f"{self.name} does not use it",
                )
        if self.name in SEQUENCE_MODELS and self.hidden:
            raise _FieldProblem(
                ("hidden",),
                f"{self.name} takes no 'hidden' list ({self.hidden}); size it with "
                "'hiddenSize' and 'layers'",
            )
        if self.name in TREE_MODELS:
            for field, default in (("hidden", []), ("dropout", 0.0)):
                if getattr(self, field) != default:
                    raise _FieldProblem(
                        (field,),
                        f"{getattr(self, field)!r}: xgboost grows trees and has no {field}; "
                        "remove it",
                    )
        return self

    @property
    def hidden_size(self) -> int:
        return 32 if self.hiddenSize is None else self.hiddenSize

    @property
    def layer_count(self) -> int:
        if self.layers is not None:
            return self.layers
        return 2 if self.name == "tcn" else 1

    @property
    def kernel_size(self) -> int:
        return 3 if self.kernelSize is None else self.kernelSize


StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed-mean"]


class Strategy(_Strict):
    """How the aggregator combines the sites' updates.

    ``mu`` is FedProx's proximal coefficient. FedAdam and FedYogi keep a server optimizer:
    ``serverLearningRate``, ``beta1``, ``beta2`` and ``tau`` (the adaptivity, Reddi et al. 2021).
    ``median`` and ``trimmed-mean`` are robust to a few bad sites: the coordinate-wise median,
    or the mean after dropping ``trimFraction`` of the values at each end.

    ``maxUpdateNorm`` bounds each site's update (the L2 norm of its change to the global
    model), with any strategy: ``normPolicy`` clips a larger update to the bound, or refuses it.
    """

    name: StrategyName = "fedavg"
    mu: float | None = Field(default=None, gt=0, strict=False)
    serverLearningRate: float | None = Field(default=None, gt=0, strict=False)
    beta1: float | None = Field(default=None, ge=0, lt=1, strict=False)
    beta2: float | None = Field(default=None, ge=0, lt=1, strict=False)
    tau: float | None = Field(default=None, gt=0, strict=False)
    trimFraction: float | None = Field(default=None, gt=0, lt=0.5, strict=False)
    maxUpdateNorm: float | None = Field(default=None, gt=0, strict=False)
    normPolicy: Literal["clip", "refuse"] = "clip"

    @model_validator(mode="after")
    def _fields_of_strategy(self) -> Strategy:
        adaptive = ("serverLearningRate", "beta1", "beta2", "tau")
        if self.name != "fedprox" and self.mu is not None:
            raise ValueError(f"'mu' is FedProx's proximal coefficient; {self.name} does not use it")
        if self.name not in ("fedadam", "fedyogi"):
            for field in adaptive:
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"'{field}' belongs to the server optimizer of fedadam/fedyogi; "
                        f"{self.name} does not use it"
                    )
        if self.name != "trimmed-mean" and self.trimFraction is not None:
            raise ValueError(f"'trimFraction' belongs to trimmed-mean; {self.name} does not use it")
        return self

    @property
    def proximal_mu(self) -> float:
        if self.name != "fedprox":
            return 0.0
        return 0.01 if self.mu is None else self.mu


class Training(_Strict):
    localSteps: PositiveInt = 100
    batchSize: PositiveInt = 16
    optimizer: Literal["sgd", "adam"] = "sgd"
    learningRate: PositiveFloat = Field(default=0.01, strict=False)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, strict=False)
    weightDecay: float = Field(default=0.0, ge=0.0, strict=False)
    # Mixed precision (torch.autocast) where a site trains on a CUDA device; full precision
    # on a CPU.
    mixedPrecision: bool = False


class Privacy(_Strict):
    """Differential privacy at each site: DP-SGD (Opacus) with Poisson sampling.

    Unless ``noiseMultiplier`` is given, each trainer calibrates the noise once for the whole
    planned study (``rounds * localSteps`` steps at sample rate ``batchSize / train rows``) so
    that the study ends at or below ``targetEpsilon``. ``delta`` must also be below
    ``1 / (a site's train rows)``; the trainer checks that once it has read its data.
    """

    targetEpsilon: float = Field(strict=False)
    delta: float = Field(strict=False)
    maxGradNorm: float = Field(default=1.0, strict=False)
    noiseMultiplier: float | None = Field(default=None, strict=False)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"

    @field_validator("targetEpsilon")
    @classmethod
    def _epsilon(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(
                f"the privacy budget must be above 0, got {v}; set it to e.g. 1.0 "
                "(stronger privacy) or 8.0 (weaker)"
            )
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(
                f"delta must lie strictly between 0 and 1, got {v}; use a value below "
                "1 / (the smallest site's train rows), e.g. 1.0e-5"
            )
        return v

    @field_validator("maxGradNorm")
    @classmethod
    def _clip(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(
                f"the per-sample gradient clipping bound must be above 0, got {v}; "
                "1.0 is a common start"
            )
        return v

    @field_validator("noiseMultiplier")
    @classmethod
    def _noise(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(
                f"the noise multiplier must be above 0, got {v}; remove it to have the "
                "trainer calibrate it from targetEpsilon"
            )
        return v


class Window(_Strict):
    """A DICOM VOI window (in the values after the rescale slope and intercept, e.g. HU)."""

    center: float = Field(strict=False)
    width: float = Field(ge=1.0, strict=False)


class Augment(_Strict):
    """Random changes to each training image, drawn anew at every step (never at evaluation).

    ``flip``: a left-right flip with probability 0.5; ``rotateDegrees``: a rotation drawn
    from ±that many degrees; ``shift``: a translation of up to that fraction of the height and
    width; ``zoom``: a scaling drawn from [1 - zoom, 1 + zoom].
    """

    flip: bool = False
    rotateDegrees: float = Field(default=0.0, ge=0.0, le=180.0, strict=False)
    shift: float = Field(default=0.0, ge=0.0, le=0.5, strict=False)
    zoom: float = Field(default=0.0, ge=0.0, lt=1.0, strict=False)


class ImagePreprocessing(_Strict):
    """How every site turns its images into arrays of shape (channels, height, width).

    ``size`` [height, width] resizes every image; without it every image of a site must
    already have the same size. ``intensity``: ``fixed`` maps the pixel range to [0, 1]
    (8-bit 0-255, 16-bit 0-65535; a DICOM image's window); ``minmax`` maps each image's own
    range to [0, 1]; ``zscore`` gives each image mean 0 and standard deviation 1 (after
    ``fixed``). ``window`` overrides the window of DICOM files (which otherwise use their
    own WindowCenter/WindowWidth, or their pixel range).
    """

    size: list[Annotated[int, Field(ge=1, le=8192)]] | None = Field(
        default=None, min_length=2, max_length=2
    )
    channels: Literal[1, 3] = 1
    intensity: Literal["fixed", "minmax", "zscore"] = "fixed"
    window: Window | None = None
    augment: Augment | None = None


class SequencePreprocessing(_Strict):
    """How every site turns a long-format table (one row per patient and time step) into
    sequences; see docs/ehr.md.

    ``idColumn`` names the patient, ``timeColumn`` orders a patient's rows (numbers, or
    date-times). ``labels``: ``per-patient`` takes one label per patient (from a labels
    table, ``sites[].data.labels``, or the label column, the same in all of a patient's
    rows) and the patient's last ``window`` steps (all of them without ``window``);
    ``early-warning`` reads the label column as 0 before an event and 1 from its onset, and
    makes one example per time step (every ``stride`` steps) from the ``window`` steps up to
    it, positive when the onset comes within the next ``horizon`` time units (hours for
    date-times); steps from the onset on make no example.
    """

    idColumn: str = Field(min_length=1)
    timeColumn: str = Field(min_length=1)
    labels: Literal["per-patient", "early-warning"] = "per-patient"
    window: int | None = Field(default=None, ge=1, le=100_000)
    horizon: float | None = Field(default=None, gt=0, strict=False)
    stride: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _fields_of_labels(self) -> SequencePreprocessing:
        if self.idColumn == self.timeColumn:
            raise _FieldProblem(
                ("timeColumn",),
                f"{self.timeColumn!r} is also the idColumn; name the column of the times",
            )
        if self.labels == "early-warning":
            for field, example in (("window", 12), ("horizon", 6)):
                if getattr(self, field) is None:
                    raise _FieldProblem(
                        (field,),
                        f"early-warning labels need '{field}' (e.g. {field}: {example})",
                    )
        else:
            for field in ("horizon", "stride"):
                if getattr(self, field) is not None:
                    raise _FieldProblem(
                        (field,),
                        f"{getattr(self, field)!r}: '{field}' belongs to early-warning labels; "
                        "per-patient labels make one example per patient",
                    )
        return self

    @property
    def step_stride(self) -> int:
        return 1 if self.stride is None else self.stride


class Preprocessing(_Strict):
    """How every site turns its table into features; the same at each site, so models align.

    ``categorical`` maps a column to its levels: declaring them keeps one-hot features
    identical at sites that have not seen every level.
    """

    columns: list[str] | None = None
    naValues: list[str] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)
    categorical: dict[str, list[int | str]] = Field(default_factory=dict)
    dropFirstLevel: bool = False
    missing: Literal["drop-rows", "impute-mean"] = "drop-rows"
    standardize: bool = True
    testFraction: float = Field(default=0.25, gt=0.0, lt=1.0, strict=False)
    splitSeed: int = Field(default=0, ge=0)
    stratify: bool = True
    image: ImagePreprocessing | None = None
    sequence: SequencePreprocessing | None = None

    @field_validator("categorical")
    @classmethod
    def _levels(cls, v: dict[str, list[int | str]]) -> dict[str, list[int | str]]:
        for column, levels in v.items():
            if len(levels) < 2:
                raise ValueError(f"column {column!r} needs at least two levels, got {levels}")
            if len(set(map(str, levels))) != len(levels):
                raise ValueError(f"column {column!r} lists a level twice: {levels}")
        return v


BUILTIN_DATASETS = ("breast-cancer", "digits", "synthetic-sepsis")
# Built-in datasets that are long-format tables of time steps (preprocessing.sequence).
SEQUENCE_DATASETS = ("synthetic-sepsis",)
# Data that are images: formats reading a folder, and built-in image datasets.
IMAGE_FORMATS = ("images", "dicom")
IMAGE_DATASETS = ("digits",)


class Partition(_Strict):
    """A deterministic share of a built-in dataset: ``index`` of ``count`` simulated sites.

    ``labelSkew`` in [0, 1) gives each site a different share of positives (0: iid).
    """

    index: int = Field(ge=0)
    count: PositiveInt
    labelSkew: float = Field(default=0.0, ge=0.0, lt=1.0, strict=False)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _index(self) -> Partition:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be below count {self.count}")
        return self


class SiteData(_Strict):
    """Where a site's data is. ``images`` and ``dicom`` read a folder (``path``) and a labels
    CSV (``labels``, relative to the folder, ``labels.csv`` by default) with one row per
    image: its file (column ``fileColumn``, relative to the folder) and its label (the
    column ``task.label``). ``skipBadFiles`` skips (and counts) an image that cannot be used
    instead of stopping with an error."""

    format: Literal["csv", "parquet", "builtin", "images", "dicom"]
    path: str | None = None
    header: bool = True
    dataset: Literal["breast-cancer", "digits", "synthetic-sepsis"] | None = None
    partition: Partition | None = None
    labels: str | None = Field(default=None, min_length=1)
    fileColumn: str = Field(default="file", min_length=1)
    skipBadFiles: bool = False

    @model_validator(mode="after")
    def _source(self) -> SiteData:
        if self.format == "builtin":
            if self.dataset is None:
                raise ValueError(
                    f"format builtin needs 'dataset' (one of {', '.join(BUILTIN_DATASETS)})"
                )
            if self.path is not None:
                raise ValueError("format builtin reads no file; remove 'path'")
        else:
            if not self.path:
                raise ValueError(f"format {self.format} needs 'path'")
            if self.dataset is not None or self.partition is not None:
                raise ValueError("'dataset' and 'partition' belong to format builtin")
            if self.format == "parquet" and not self.header:
                raise ValueError("parquet files always name their columns; remove 'header'")
        return self

    @model_validator(mode="after")
    def _image_source(self) -> SiteData:
        if self.format in IMAGE_FORMATS:
            if not self.header:
                raise ValueError(
                    f"'header' belongs to format csv; the labels CSV of format {self.format} "
                    "always has a header row"
                )
            return self
        defaults = {"labels": None, "fileColumn": "file", "skipBadFiles": False}
        if self.format in ("csv", "parquet"):
            del defaults["labels"]  # a per-patient labels table of sequence data
        for field, default in defaults.items():
            if getattr(self, field) != default:
                raise ValueError(
                    f"'{field}' belongs to formats {' and '.join(IMAGE_FORMATS)}; "
                    f"format {self.format} does not use it"
                )
        return self

    @property
    def is_image(self) -> bool:
        return self.format in IMAGE_FORMATS or (
            self.format == "builtin" and self.dataset in IMAGE_DATASETS
        )


_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")


class Resources(_Strict):
    """What a site's trainer runs on. ``gpu``, ``cpu`` and ``memory`` are the pod's requests
    on Kubernetes. ``device`` is the torch device the trainer trains on: ``auto`` (the first
    CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

    gpu: int = Field(default=0, ge=0)
    cpu: str | None = None
    memory: str | None = None
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (N a number), got {v!r}")
        return v

    @model_validator(mode="after")
    def _device_and_gpus(self) -> Resources:
        if self.gpu and self.device == "cpu":
            raise _FieldProblem(
                ("device",),
                f"device cpu would leave the {self.gpu} GPU(s) requested in 'gpu' unused; "
                "use device auto or cuda, or remove 'gpu'",
            )
        if self.gpu and self.device.startswith("cuda:") and int(self.device[5:]) >= self.gpu:
            raise _FieldProblem(
                ("device",),
                f"{self.device} is not among the GPUs the pod gets: gpu {self.gpu} gives "
                + ("cuda:0" if self.gpu == 1 else f"cuda:0 to cuda:{self.gpu - 1}"),
            )
        return self


class ServerPrivacy(_Strict):
    """Differential privacy at the aggregator (DP-FedAvg, McMahan et al. 2018).

    Each site's update (its change to the global model) is clipped to ``clipNorm``; the
    clipped changes are summed unweighted, Gaussian noise of standard deviation
    ``noiseMultiplier * clipNorm`` is added to the sum, and the sum is divided by the number
    of sites in the study (a fixed denominator, so the divisor reveals nothing). Give either
    ``noiseMultiplier`` or ``targetEpsilon`` (the noise is then calibrated so the planned
    rounds end at that ε). The guarantee is per site (a whole hospital's contribution), and
    is reported apart from the sites' own DP-SGD ε.
    """

    clipNorm: float = Field(gt=0, strict=False)
    noiseMultiplier: float | None = Field(default=None, gt=0, strict=False)
    targetEpsilon: float | None = Field(default=None, gt=0, strict=False)
    delta: float = Field(default=1e-5, gt=0, lt=1, strict=False)

    @model_validator(mode="after")
    def _one_noise_source(self) -> ServerPrivacy:
        if (self.noiseMultiplier is None) == (self.targetEpsilon is None):
            raise ValueError(
                "give exactly one of 'noiseMultiplier' (the noise as a multiple of clipNorm) "
                "or 'targetEpsilon' (the noise is calibrated for the planned rounds), got "
                f"noiseMultiplier={self.noiseMultiplier}, targetEpsilon={self.targetEpsilon}"
            )
        return self


class Site(_Strict):
    name: str
    data: SiteData
    resources: Resources = Field(default_factory=Resources)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _dns_label(v, "a site name")


class Irb(_Strict):
    protocol: str = Field(min_length=1)
    approvedUntil: dt.date = Field(strict=False)


class Governance(_Strict):
    irb: Irb | None = None
    # What the model is for, in the study's own words: the model card quotes it.
    intendedUse: str | None = Field(default=None, min_length=1, max_length=2000)


class StudySpec(_Strict):
    task: Task
    model: Model
    rounds: PositiveInt = Field(le=1_000_000)
    minSites: PositiveInt = 1
    roundTimeoutSeconds: float = Field(default=600.0, gt=0, strict=False)
    strategy: Strategy = Field(default_factory=Strategy)
    training: Training = Field(default_factory=Training)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    governance: Governance = Field(default_factory=Governance)
    privacy: Privacy | None = None
    serverPrivacy: ServerPrivacy | None = None
    seed: int = Field(default=0, ge=0)
    localBaseline: bool = True
    sites: list[Site] = Field(min_length=1)

    @model_validator(mode="after")
    def _sites(self) -> StudySpec:
        seen: dict[str, int] = {}
        for i, site in enumerate(self.sites):
            if site.name in seen:
                raise _FieldProblem(
                    ("sites", i, "name"),
                    f"duplicate site name {site.name!r} (also sites[{seen[site.name]}])",
                )
            seen[site.name] = i
        if self.minSites > len(self.sites):
            raise _FieldProblem(
                ("minSites",),
                f"{self.minSites} is more than the {len(self.sites)} sites the study lists",
            )
        _check_image_study(self)
        _check_sequence_study(self)
        _check_tree_study(self)
        if self.serverPrivacy is not None and self.strategy.name in ("median", "trimmed-mean"):
            raise _FieldProblem(
                ("serverPrivacy",),
                f"server-side DP adds noise to a mean of the sites' updates; strategy "
                f"{self.strategy.name!r} takes no mean: use fedavg, fedprox, fedadam or fedyogi",
            )
        return self

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def _check_image_study(spec: StudySpec) -> None:
    """Image models read image sites, and image settings need image sites."""
    model = spec.model
    image_model = model.name in IMAGE_MODELS
    for i, site in enumerate(spec.sites):
        if site.data.is_image != image_model:
            builtin = site.data.format == "builtin"
            field = "dataset" if builtin else "format"
            if image_model:
                what = f"built-in dataset {site.data.dataset}" if builtin else site.data.format
                message = (
                    f"model {model.name} reads images, but {what} is a table; use format "
                    f"{' or '.join(IMAGE_FORMATS)}, or a built-in image dataset "
                    f"({', '.join(IMAGE_DATASETS)})"
                )
            else:
                message = (
                    f"this site's data are images; model {model.name} reads tables: use one "
                    f"of {', '.join(IMAGE_MODELS)}"
                )
            raise _FieldProblem(("sites", i, "data", field), message)
    pre = spec.preprocessing
    if image_model:
        for name in ("columns", "naValues", "drop", "categorical"):
            if getattr(pre, name):
                raise _FieldProblem(
                    ("preprocessing", name), "applies to tables; this study reads images"
                )
        if model.norm == "batch" and spec.privacy is not None:
            raise _FieldProblem(
                ("model", "norm"),
                "BatchNorm mixes the rows of a batch, so DP-SGD (spec.privacy) cannot bound "
                "one row's influence; use norm group (or auto, which picks it under DP)",
            )
    elif pre.image is not None:
        raise _FieldProblem(
            ("preprocessing", "image"), "applies to images; this study reads tables"
        )
    dicom = any(s.data.format == "dicom" for s in spec.sites)
    if pre.image is not None and pre.image.window is not None and not dicom:
        raise _FieldProblem(
            ("preprocessing", "image", "window"),
            "a window applies to DICOM files; no site has format dicom",
        )


def _check_sequence_study(spec: StudySpec) -> None:
    """Sequence models read long-format tables (preprocessing.sequence), and only they do."""
    model = spec.model
    pre = spec.preprocessing
    seq = pre.sequence
    if model.name in SEQUENCE_MODELS and seq is None:
        raise _FieldProblem(
            ("preprocessing", "sequence"),
            f"model {model.name} reads sequences: describe the long-format table here "
            "(idColumn, timeColumn, labels, window)",
        )
    if seq is None:
        for i, site in enumerate(spec.sites):
            if site.data.format == "builtin" and site.data.dataset in SEQUENCE_DATASETS:
                raise _FieldProblem(
                    ("sites", i, "data", "dataset"),
                    f"{site.data.dataset} is a long-format table of time steps: set "
                    f"preprocessing.sequence and a sequence model ({', '.join(SEQUENCE_MODELS)})",
                )
            if site.data.format in ("csv", "parquet") and site.data.labels is not None:
                raise _FieldProblem(
                    ("sites", i, "data", "labels"),
                    "a labels table belongs to per-patient sequences (preprocessing.sequence); "
                    "a table's label is its task.label column",
                )
        return
    if model.name not in SEQUENCE_MODELS:
        raise _FieldProblem(
            ("preprocessing", "sequence"),
            f"sequences need a sequence model ({', '.join(SEQUENCE_MODELS)}); model "
            f"{model.name} reads a table's rows",
        )
    for i, site in enumerate(spec.sites):
        data = site.data
        if data.format == "builtin" and data.dataset not in SEQUENCE_DATASETS:
            raise _FieldProblem(
                ("sites", i, "data", "dataset"),
                f"{data.dataset} holds no time steps; sequences come from csv or parquet files "
                f"or a built-in sequence dataset ({', '.join(SEQUENCE_DATASETS)})",
            )
        if data.labels is not None and seq.labels == "early-warning":
            raise _FieldProblem(
                ("sites", i, "data", "labels"),
                "early-warning labels come from the label column of every time step; a labels "
                "table holds one label per patient (labels: per-patient)",
            )
    columns = pre.columns
    if columns is not None and (seq.idColumn not in columns or seq.timeColumn not in columns):
        raise _FieldProblem(
            ("preprocessing", "columns"),
            f"the declared columns must include idColumn {seq.idColumn!r} and timeColumn "
            f"{seq.timeColumn!r}",
        )
    if pre.categorical:
        raise _FieldProblem(
            ("preprocessing", "categorical"),
            "sequences take numeric columns only; code a categorical column as numbers or "
            "drop it (preprocessing.drop)",
        )
    if pre.missing != Preprocessing.model_fields["missing"].default:
        raise _FieldProblem(
            ("preprocessing", "missing"),
            f"{pre.missing!r}: sequences carry a patient's last value forward and mark every "
            "missing cell in a mask channel; remove 'missing'",
        )
    for field in ("idColumn", "timeColumn"):
        column = getattr(seq, field)
        if column == spec.task.label:
            raise _FieldProblem(
                ("preprocessing", "sequence", field),
                f"{column!r} is also the label column (task.label)",
            )
        if column in pre.drop:
            raise _FieldProblem(
                ("preprocessing", "drop"),
                f"{column!r} is the sequence's {field}; it cannot be dropped",
            )


def _check_tree_study(spec: StudySpec) -> None:
    """XGBoost's federated mode: every site in every round, no DP-SGD, no averaging choices."""
    if spec.model.name not in TREE_MODELS:
        return
    if spec.privacy is not None:
        raise _FieldProblem(
            ("privacy",),
            "DP-SGD clips and noises gradient steps; xgboost grows trees from the sites' "
            "gradient histograms: remove spec.privacy",
        )
    if spec.serverPrivacy is not None:
        raise _FieldProblem(
            ("serverPrivacy",),
            "server-side DP noises the sites' model changes; xgboost's trees are built "
            "together, not averaged: remove spec.serverPrivacy",
        )
    if spec.strategy != Strategy():
        raise _FieldProblem(
            ("strategy",),
            f"{spec.strategy.name!r}: xgboost's sites build every tree together (XGBoost's "
            "federated mode), so there is nothing to average: remove spec.strategy",
        )
    if spec.training != Training():
        raise _FieldProblem(
            ("training",),
            "xgboost takes its settings in spec.model (maxDepth, learningRate, "
            "minChildWeight, regLambda, maxBin): remove spec.training",
        )
    if spec.minSites != len(spec.sites):
        raise _FieldProblem(
            ("minSites",),
            f"{spec.minSites}: xgboost's federated mode needs every site in every round; "
            f"set minSites to the number of sites, {len(spec.sites)}",
        )


class FederatedStudy(_Strict):
    apiVersion: Literal["fedstudy.io/v1alpha1"]
    kind: Literal["FederatedStudy"]
    metadata: Metadata
    spec: StudySpec
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class _FieldProblem(ValueError):
    """Raised inside a validator to point at a nested field rather than the model."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        self.message = message
        super().__init__(message)


def _plain_key(key: str) -> bool:
    return bool(key) and all(c.isprintable() and not c.isspace() for c in key)


def _path(loc: Iterable[str | int]) -> str:
    """``spec.sites[0].name``; a key that is empty or holds spaces or control characters is
    quoted (``spec['odd key']``), so a path is always one line."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _plain_key(part):
            out += ("." if out else "") + part
        else:
            out += f"[{part!r}]"
    return out or "(document)"


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deeply to show>"
    except ValueError:
        # An integer with more digits than Python converts to text.
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldProblem):
            problems.append(f"{_path([*loc, *ctx_err.loc])}: {ctx_err.message}")
            continue
        kind = e["type"]
        msg = str(e["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = f"unknown field (value {_short(e['input'])})"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind not in ("value_error", "assertion_error") and "input" in e:
            msg = f"{msg}, got {_short(e['input'])}"
        problems.append(f"{_path(loc)}: {msg}")
    return problems


def parse_study(doc: Any, source: str | None = None) -> FederatedStudy:
    """Validates a document (already parsed from YAML/JSON) as a FederatedStudy."""
    if not isinstance(doc, dict):
        raise StudyError(
            [
                f"(document): a study is a mapping with apiVersion, kind, metadata and spec, "
                f"got {type(doc).__name__}"
            ],
            source,
        )
    try:
        return FederatedStudy.model_validate(doc)
    except ValidationError as err:
        raise StudyError(format_validation_error(err), source) from None


class _Loader(yaml.SafeLoader):
    """yaml's safe loader, with a value its constructors cannot build (``2026-02-30``,
    ``!!int abc``, ``!!timestamp x``) reported as a YAML error at the value's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, OverflowError) as e:
            what = node.tag.rsplit(":", 1)[-1]
            value = f"{_short(node.value)} " if isinstance(node, yaml.ScalarNode) else ""
            why = f" ({e})" if isinstance(e, ValueError | OverflowError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{value}is not a valid {what}{why}", node.start_mark
            ) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`` at line L, column C: problem`` on one line."""
    if isinstance(e, yaml.reader.ReaderError):
        char = e.character if isinstance(e.character, int) else ord(e.character)
        return f" at character {e.position + 1}: unacceptable character #x{char:04x}: {e.reason}"
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return f"{where}: {' '.join(str(problem).split())}"


def load_study(path: str | Path) -> FederatedStudy:
    """Reads and validates a study file (YAML or JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError([f"(file): no such file: {p}"], str(p)) from None
    except UnicodeDecodeError as e:
        byte = e.object[e.start : e.start + 1].hex()
        raise StudyError(
            [f"(file): not UTF-8 text: byte 0x{byte} at offset {e.start} ({e.reason})"], str(p)
        ) from None
    except OSError as e:
        raise StudyError([f"(file): cannot read: {e.strerror}"], str(p)) from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as e:
        raise StudyError([f"(document): not valid YAML{_yaml_problem(e)}"], str(p)) from None
    except RecursionError:
        raise StudyError(
            ["(document): not valid YAML: nested too deeply to read"], str(p)
        ) from None
    if len(docs) != 1:
        raise StudyError(
            [f"(document): a study file holds exactly one document, found {len(docs)}"], str(p)
        )
    return parse_study(docs[0], str(p))


def resolve_data_path(site: Site, base_dir: Path) -> Path | None:
    """The file a site reads, relative paths taken from the study file's folder."""
    if site.data.path is None:
        return None
    p = Path(site.data.path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def resolve_labels_path(site: Site, base_dir: Path) -> Path | None:
    """The labels CSV of an image site: ``labels`` (``labels.csv`` by default), a relative
    path taken from the site's image folder."""
    folder = resolve_data_path(site, base_dir)
    if folder is None or site.data.format not in IMAGE_FORMATS:
        return None
    p = Path(site.data.labels or "labels.csv").expanduser()
    return p if p.is_absolute() else (folder / p)


def resolve_patient_labels_path(site: Site, base_dir: Path) -> Path | None:
    """The per-patient labels table of a sequence site (csv or parquet), relative paths taken
    from the study file's folder, or None when the site has none."""
    if site.data.labels is None or site.data.format not in ("csv", "parquet"):
        return None
    p = Path(site.data.labels).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def check_local_files(
    study: FederatedStudy, base_dir: Path, sites: Iterable[str] | None = None
) -> None:
    """Checks the data files of the named sites (all by default) exist on this machine."""
    wanted = set(sites) if sites is not None else None
    problems = []
    for i, site in enumerate(study.spec.sites):
        if wanted is not None and site.name not in wanted:
            continue
        p = resolve_data_path(site, base_dir)
        if p is None:
            continue
        labels = resolve_labels_path(site, base_dir)
        if labels is not None:
            if not p.is_dir():
                what = "no such folder" if not p.exists() else "not a folder"
                problems.append(f"spec.sites[{i}].data.path: {what}: {p}")
            elif not labels.is_file():
                what = "no such file" if not labels.exists() else "not a regular file"
                field = "labels" if site.data.labels else "labels (default labels.csv)"
                problems.append(f"spec.sites[{i}].data.{field}: {what}: {labels}")
            continue
        if not p.exists():
            problems.append(f"spec.sites[{i}].data.path: no such file: {p}")
        elif not p.is_file():
            problems.append(f"spec.sites[{i}].data.path: not a regular file: {p}")
        patient_labels = resolve_patient_labels_path(site, base_dir)
        if patient_labels is not None and not patient_labels.is_file():
            what = "no such file" if not patient_labels.exists() else "not a regular file"
            problems.append(f"spec.sites[{i}].data.labels: {what}: {patient_labels}")
    if problems:
        raise StudyError(problems)


def check_irb(study: FederatedStudy, today: dt.date | None = None) -> None:
    """Refuses a study whose IRB approval has lapsed."""
    irb = study.spec.governance.irb
    if irb is None:
        return
    today = today or dt.date.today()
    if irb.approvedUntil < today:
        raise StudyError(
            [
                f"spec.governance.irb.approvedUntil: IRB approval of protocol {irb.protocol} "
                f"expired on {irb.approvedUntil.isoformat()} (today is {today.isoformat()}); "
                "renew the approval and update the date"
            ]
        )
