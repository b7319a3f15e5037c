"""How the aggregator turns a round's updates into the next global model.

Every strategy has the same small lifecycle: ``begin_round(global)``, then ``accept(weights,
num_samples)`` once per accepted update (folded at once into a running weighted mean, so
memory stays near one model whatever the number of sites), then ``aggregate()``.

The arithmetic lives in pure functions (``fold_mean``, ``finish_mean``, ``adam_step``,
``yogi_step``) so it can be tested on hand-computed numbers.

Robust strategies (coordinate-wise median, trimmed mean) need every update at once: they keep
each accepted update until the round aggregates, so their memory grows with the number of
sites. They ignore sample counts for float tensors (a site could lie about its count).
``update_norm``/``clip_update`` bound a single site's change, with any strategy.

Server optimizers (FedAdam, FedYogi; Reddi et al. 2021, "Adaptive Federated Optimization")
follow the paper without bias correction, as Flower does. Unlike Flower, the second moment
``v`` starts at zero rather than ``tau**2``: with zero moments the first step moves each
float parameter by about ``eta`` in the direction of the sites' average change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import cast

import numpy as np
import numpy.typing as npt

from fedstudy.spec import Strategy as StrategySpec
from fedstudy.tensors import BLOCK_VALUES, Array, SpooledWeights, Weights

from .server_dp import ServerDP

FloatArray = npt.NDArray[np.floating]

DEFAULT_ETA = 0.01
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.99
DEFAULT_TAU = 1e-3
DEFAULT_TRIM = 0.25
# Values per step of ``fold_mean`` on a large tensor (4 MiB of float32).
FOLD_BLOCK = 1 << 20


def accumulator_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.floating]:
    """The dtype a running mean of ``dtype`` is kept in: the tensor's own float type where
    it is precise enough (float32, float64), float32 for float16, float64 for ints and bools."""
    if dtype.kind == "f" and dtype.itemsize >= 8:
        return np.dtype(np.float64)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def fold_mean(mean: FloatArray, mean_weight: float, x: Array, weight: float) -> float:
    """Folds ``x`` with ``weight`` into the running weighted ``mean`` (in place).

    Returns the new total weight. A running mean, rather than a running sum, keeps values in
    the tensor's range, so float16/float32 accumulators cannot overflow on large weights.
    The work goes ``FOLD_BLOCK`` values at a time: the temporary stays small whatever the
    tensor's size.
    """
    total = mean_weight + weight
    if total <= 0:
        raise ValueError("weights must be positive")
    frac = weight / total
    xs = np.asarray(x)
    if not mean.flags.c_contiguous or xs.shape != mean.shape or mean.size <= FOLD_BLOCK:
        diff = np.subtract(xs, mean, dtype=mean.dtype)
        diff *= frac
        mean += diff
        return total
    flat_mean = mean.reshape(-1)
    flat_x = xs.reshape(-1)
    for start in range(0, flat_mean.size, FOLD_BLOCK):
        part = flat_mean[start : start + FOLD_BLOCK]
        diff = np.subtract(flat_x[start : start + FOLD_BLOCK], part, dtype=mean.dtype)
        diff *= frac
        part += diff
    return total


def finish_mean(mean: FloatArray, dtype: np.dtype[np.generic]) -> Array:
    """Casts a running mean back to the tensor's dtype: integers round, bools take the
    weighted majority. A mean already in the tensor's dtype is returned as it is (no copy)."""
    if dtype.kind == "f":
        return mean if mean.dtype == dtype else mean.astype(dtype)
    if dtype.kind == "b":
        return np.asarray(mean >= 0.5)
    out: Array = np.rint(mean).astype(dtype)
    return out


def weighted_average(updates: list[tuple[Weights, float]]) -> Weights:
    """The weighted mean of whole models (reference helper; strategies fold one at a time)."""
    if not updates:
        raise ValueError("no updates to average")
    first = updates[0][0]
    means = {k: v.astype(accumulator_dtype(v.dtype), copy=True) for k, v in first.items()}
    total = updates[0][1]
    for weights, w in updates[1:]:
        for k, mean in means.items():
            fold_mean(mean, total, weights[k], w)
        total += w
    return {k: finish_mean(means[k], first[k].dtype) for k in first}


def adam_step(
    current: FloatArray,
    average: FloatArray,
    m: FloatArray,
    v: FloatArray,
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """One FedAdam server step; returns (new weights, new m, new v). Inputs are not changed."""
    delta = average - current
    m_new = beta1 * m + (1.0 - beta1) * delta
    v_new = beta2 * v + (1.0 - beta2) * delta * delta
    return current + eta * m_new / (np.sqrt(v_new) + tau), m_new, v_new


def yogi_step(
    current: FloatArray,
    average: FloatArray,
    m: FloatArray,
    v: FloatArray,
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """One FedYogi server step; returns (new weights, new m, new v). Inputs are not changed."""
    delta = average - current
    sq = delta * delta
    m_new = beta1 * m + (1.0 - beta1) * delta
    v_new = v - (1.0 - beta2) * sq * np.sign(v - sq)
    return current + eta * m_new / (np.sqrt(v_new) + tau), m_new, v_new


class Update:
    """One accepted update as a strategy reads it: each tensor whole or a block at a time,
    from memory or from its spool file, moved towards the global model ``base`` by ``scale``
    where it was clipped (``base + scale * (update - base)`` on float tensors, in float64).

    ``owned``: in-memory arrays that nothing else holds; ``array`` then hands them over as
    they are where no scaling or cast is needed.
    """

    def __init__(
        self,
        values: Mapping[str, Array] | SpooledWeights,
        base: Mapping[str, Array] | None = None,
        scale: float = 1.0,
        *,
        owned: bool = False,
    ) -> None:
        if scale != 1.0 and base is None:
            raise ValueError("scaling an update needs the model it moves from")
        self.values = values
        self.base = base
        self.scale = scale
        self.owned = owned

    def _scaled(self, name: str, start: int, block: Array) -> Array:
        if self.scale == 1.0 or self.base is None or block.dtype.kind != "f":
            return block
        g = self.base[name].reshape(-1)[start : start + block.size]
        delta = np.subtract(block, g, dtype=np.float64)
        delta *= self.scale
        out: Array = np.add(g, delta, dtype=np.float64).astype(block.dtype)
        return out

    def blocks(self, name: str, block_values: int = BLOCK_VALUES) -> Iterator[tuple[int, Array]]:
        """(index of the first value in the flattened tensor, 1-d values), in order."""
        if isinstance(self.values, SpooledWeights):
            for start, block in self.values.blocks(name, block_values):
                yield start, self._scaled(name, start, block)
            return
        flat = np.asarray(self.values[name]).reshape(-1)
        for start in range(0, max(flat.size, 1), block_values):
            yield start, self._scaled(name, start, flat[start : start + block_values])

    def array(self, name: str, dtype: np.dtype[np.generic] | None = None) -> Array:
        """The whole tensor (in ``dtype`` where given), filled a block at a time; owned
        in-memory arrays that need no change are handed over as they are."""
        if isinstance(self.values, SpooledWeights):
            spec = self.values.specs[name]
            shape, own_dtype = spec.shape, np.dtype(spec.dtype).newbyteorder("<")
            if self.scale == 1.0 and (dtype is None or own_dtype == dtype):
                return self.values.array(name)  # read straight into its array
        else:
            src = np.asarray(self.values[name])
            if self.owned and self.scale == 1.0 and (dtype is None or src.dtype == dtype):
                return src
            shape, own_dtype = src.shape, src.dtype
        out: Array = np.empty(shape, dtype=own_dtype if dtype is None else dtype)
        flat = out.reshape(-1)
        for start, block in self.blocks(name):
            flat[start : start + block.size] = block
        return out

    def load(self) -> Weights:
        names = self.values.specs if isinstance(self.values, SpooledWeights) else self.values
        return {name: self.array(name) for name in names}


class Strategy(ABC):
    """A round's aggregation: begin, accept updates one by one, aggregate."""

    name: str = ""

    def __init__(self) -> None:
        self._global: Weights | None = None
        self._means: dict[str, FloatArray] | None = None
        self.total_weight = 0.0
        self.accepted = 0
        # Server-side DP: updates arrive clipped and count equally; the float means get noise.
        self.dp: ServerDP | None = None

    def begin_round(self, global_weights: Weights) -> None:
        """Starts a round from ``global_weights`` (kept by reference, never changed)."""
        self._global = global_weights
        self._means = None
        self.total_weight = 0.0
        self.accepted = 0

    def accept(
        self, weights: Mapping[str, Array] | Update, num_samples: int, *, owned: bool = False
    ) -> None:
        """Folds one validated update into the running weighted mean, a block at a time.

        ``owned``: the arrays are the caller's to give away (a freshly received update that
        nothing else holds); the round's first update then becomes the running mean as it is,
        without a copy, wherever its dtype is already the accumulator's.
        """
        if self._global is None:
            raise RuntimeError("begin_round first")
        if num_samples <= 0:
            raise ValueError("an update needs a positive sample count")
        update = weights if isinstance(weights, Update) else Update(weights, owned=owned)
        w = 1.0 if self.dp is not None else float(num_samples)
        if self._means is None:
            self._means = {
                k: cast(FloatArray, update.array(k, accumulator_dtype(g.dtype)))
                for k, g in self._global.items()
            }
            self.total_weight = w
        else:
            total = self.total_weight
            for k, mean in self._means.items():
                flat = mean.reshape(-1)
                for start, block in update.blocks(k):
                    fold_mean(flat[start : start + block.size], total, block, w)
            self.total_weight = total + w
        self.accepted += 1

    def mean_of(self, key: str) -> FloatArray:
        """The round's mean of tensor ``key`` in its accumulator dtype. Under server-side DP,
        a float tensor's mean is the global value plus the noisy sum of the (clipped) changes
        over the study's number of sites."""
        if self._global is None or self._means is None:
            raise RuntimeError("no update was accepted this round")
        mean = self._means[key]
        g = self._global[key]
        if self.dp is None or g.dtype.kind != "f":
            return mean
        current = g.astype(mean.dtype)
        change_sum = (mean - current) * self.accepted
        return np.asarray(current + self.dp.noisy_change(change_sum), dtype=mean.dtype)

    def average(self) -> Weights:
        """The weighted mean of the round's updates, in the model's dtypes. The running means
        become the result where they can (no copy of the model), so this ends the round's
        accumulation: ``begin_round`` starts the next."""
        if self._global is None or self._means is None:
            raise RuntimeError("no update was accepted this round")
        out = {k: finish_mean(self.mean_of(k), g.dtype) for k, g in self._global.items()}
        self._means = None
        return out

    @abstractmethod
    def aggregate(self) -> Weights:
        """The new global model (fresh arrays)."""

    def state_dict(self) -> dict[str, Array]:
        """Optimizer state to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restores what ``state_dict`` gave."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)}")


class FedAvg(Strategy):
    """The sample-weighted mean of the sites' weights (McMahan et al. 2017)."""

    name = "fedavg"

    def aggregate(self) -> Weights:
        return self.average()


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term is the trainers' (``TaskResponse.proximal_mu``)."""

    name = "fedprox"


class _ServerOptimizer(Strategy):
    """FedAdam/FedYogi: the averaged change drives a server-side adaptive optimizer on float
    tensors; integer and bool tensors take the plain weighted mean."""

    def __init__(
        self,
        eta: float = DEFAULT_ETA,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        tau: float = DEFAULT_TAU,
    ) -> None:
        super().__init__()
        self.eta = eta
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: dict[str, FloatArray] = {}
        self.v: dict[str, FloatArray] = {}

    def _step(
        self, current: FloatArray, average: FloatArray, m: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        raise NotImplementedError

    def aggregate(self) -> Weights:
        if self._global is None or self._means is None:
            raise RuntimeError("no update was accepted this round")
        out: Weights = {}
        for k, g in self._global.items():
            mean = self.mean_of(k)
            if g.dtype.kind != "f":
                out[k] = finish_mean(mean, g.dtype)
                continue
            current = g.astype(mean.dtype)
            m = self.m.get(k)
            v = self.v.get(k)
            if m is None or v is None:
                m = np.zeros_like(mean)
                v = np.zeros_like(mean)
            new, self.m[k], self.v[k] = self._step(current, mean, m, v)
            out[k] = new.astype(g.dtype)
        return out

    def state_dict(self) -> dict[str, Array]:
        state: dict[str, Array] = {}
        for k in self.m:
            state[f"m/{k}"] = self.m[k]
            state[f"v/{k}"] = self.v[k]
        return state

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        m: dict[str, FloatArray] = {}
        v: dict[str, FloatArray] = {}
        for key, arr in state.items():
            kind, _, name = key.partition("/")
            if kind == "m":
                m[name] = np.asarray(arr, dtype=accumulator_dtype(arr.dtype))
            elif kind == "v":
                v[name] = np.asarray(arr, dtype=accumulator_dtype(arr.dtype))
            else:
                raise ValueError(f"{self.name}: unexpected state entry {key!r}")
        if set(m) != set(v):
            raise ValueError(f"{self.name}: first and second moments name different tensors")
        self.m, self.v = m, v


class FedAdam(_ServerOptimizer):
    name = "fedadam"

    def _step(
        self, current: FloatArray, average: FloatArray, m: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        return adam_step(
            current, average, m, v, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau
        )


class FedYogi(_ServerOptimizer):
    name = "fedyogi"

    def _step(
        self, current: FloatArray, average: FloatArray, m: FloatArray, v: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        return yogi_step(
            current, average, m, v, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau
        )


def update_norm(weights: Mapping[str, Array], base: Mapping[str, Array]) -> float:
    """The L2 norm of the change from ``base`` to ``weights`` over the float tensors."""
    total = 0.0
    for k, g in base.items():
        if g.dtype.kind == "f":
            d = np.subtract(weights[k], g, dtype=np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(total))


def clip_update(weights: Mapping[str, Array], base: Mapping[str, Array], bound: float) -> Weights:
    """``weights`` moved back towards ``base`` so the change's norm is at most ``bound``."""
    norm = update_norm(weights, base)
    if norm <= bound:
        return dict(weights)
    scale = bound / norm
    out: Weights = {}
    for k, g in base.items():
        w = weights[k]
        if g.dtype.kind == "f":
            delta = np.subtract(w, g, dtype=np.float64) * scale
            out[k] = np.add(g, delta, dtype=np.float64).astype(g.dtype)
        else:
            out[k] = w
    return out


def coordinate_median(stack: FloatArray) -> FloatArray:
    """The median over the first axis, coordinate by coordinate."""
    return np.asarray(np.median(stack, axis=0))


def trimmed_mean(stack: FloatArray, fraction: float) -> FloatArray:
    """The mean over the first axis after dropping ``fraction`` of the values at each end.

    At least one value per coordinate is kept: with ``n`` values, ``min(floor(fraction*n),
    (n-1)//2)`` are dropped at each end.
    """
    n = stack.shape[0]
    k = min(int(fraction * n), (n - 1) // 2)
    ordered = np.sort(stack, axis=0)
    return np.asarray(ordered[k : n - k].mean(axis=0))


class _Robust(Strategy):
    """Keeps the round's updates and combines float tensors coordinate by coordinate;
    integer and bool tensors take the weighted mean, as with FedAvg."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[Mapping[str, Array]] = []

    def begin_round(self, global_weights: Weights) -> None:
        super().begin_round(global_weights)
        self._updates = []

    def accept(
        self, weights: Mapping[str, Array] | Update, num_samples: int, *, owned: bool = False
    ) -> None:
        # The update is kept whole until the round aggregates: never fold into its arrays.
        update = weights if isinstance(weights, Update) else Update(weights)
        kept = update.load() if update.scale != 1.0 or not isinstance(weights, Mapping) else weights
        super().accept(Update(kept), num_samples)
        self._updates.append(kept)

    def _combine(self, stack: FloatArray) -> FloatArray:
        raise NotImplementedError

    def aggregate(self) -> Weights:
        if self._global is None or not self._updates:
            raise RuntimeError("no update was accepted this round")
        out = self.average()
        for k, g in self._global.items():
            if g.dtype.kind == "f":
                stack = np.stack([u[k] for u in self._updates]).astype(accumulator_dtype(g.dtype))
                out[k] = self._combine(stack).astype(g.dtype)
        self._updates = []
        return out


class Median(_Robust):
    """The coordinate-wise median of the sites' weights (Yin et al. 2018)."""

    name = "median"

    def _combine(self, stack: FloatArray) -> FloatArray:
        return coordinate_median(stack)


class TrimmedMean(_Robust):
    """The coordinate-wise mean after trimming the extremes (Yin et al. 2018)."""

    name = "trimmed-mean"

    def __init__(self, fraction: float = DEFAULT_TRIM) -> None:
        super().__init__()
        self.fraction = fraction

    def _combine(self, stack: FloatArray) -> FloatArray:
        return trimmed_mean(stack, self.fraction)


def make_strategy(spec: StrategySpec) -> Strategy:
    """The strategy a study names, with its defaults filled in."""
    if spec.name == "fedavg":
        return FedAvg()
    if spec.name == "median":
        return Median()
    if spec.name == "trimmed-mean":
        return TrimmedMean(DEFAULT_TRIM if spec.trimFraction is None else spec.trimFraction)
    if spec.name == "fedprox":
        return FedProx()
    opts = {
        "eta": DEFAULT_ETA if spec.serverLearningRate is None else spec.serverLearningRate,
        "beta1": DEFAULT_BETA1 if spec.beta1 is None else spec.beta1,
        "beta2": DEFAULT_BETA2 if spec.beta2 is None else spec.beta2,
        "tau": DEFAULT_TAU if spec.tau is None else spec.tau,
    }
    if spec.name == "fedadam":
        return FedAdam(**opts)
    if spec.name == "fedyogi":
        return FedYogi(**opts)
    raise ValueError(f"unknown strategy {spec.name!r}")
