"""Gradient-boosted trees with XGBoost's federated mode: every site a federated worker.

The aggregator runs XGBoost's federated tracker (a gRPC server of its own) beside the study's
aggregator. Each site's trainer joins the study as usual, and, from its first round, the
tracker too, as worker ``rank`` (the site's place in ``spec.sites``) of as many workers as
the study has sites, over mutual TLS with the study's certificates (the site's certificate
and key, the study's CA).

Every site then makes the same XGBoost calls in the same order, one tree per round: building
the training matrix agrees the histogram bins of every feature across the sites (XGBoost
merges the sites' quantile sketches), and each split is chosen from the gradient and hessian
histograms summed over the sites by the tracker. So every site ends a round with the same
tree, grown from every site's rows while no row leaves its site (the tracker sees sketches
and histogram sums, not rows; like model updates, they are not differentially private).

The round's update is the forest as fixed-shape tensors (``encode_booster``): one slot per
planned round, each tree laid out as a complete binary tree of ``maxDepth`` levels. The sites'
updates are equal, so the aggregator's weighted mean of them is that same forest; a site
checks that the global model it downloads is the forest it holds, and evaluates it with
``forest_margin``, plain numpy, so evaluating never calls XGBoost inside the communicator.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from fedstudy import logs
from fedstudy.spec import Model, StudySpec
from fedstudy.tensors import Weights as WireWeights
from fedstudy.tensors import digest
from fedstudy.tls import CredentialFiles
from fedstudy_trainer.client import SiteTrainer
from fedstudy_trainer.data import SiteDataset
from fedstudy_trainer.models import Weights
from fedstudy_trainer.train import FloatArray, TrainResult, ranking_metrics

FEATURE = "trees.feature"  # int32 [trees, nodes]: split feature, LEAF, or UNUSED
THRESHOLD = "trees.threshold"  # float32: a row goes left when its value is below it
DEFAULT_LEFT = "trees.default_left"  # bool: where a missing value goes
VALUE = "trees.value"  # float32: a leaf's contribution to the margin (learning rate applied)
BASE_MARGIN = "base_margin"  # float32 [1]: the margin before any tree
LEAF = -1
UNUSED = -2

DEFAULT_MAX_DEPTH = 3
DEFAULT_LEARNING_RATE = 0.3
DEFAULT_MIN_CHILD_WEIGHT = 1.0
DEFAULT_REG_LAMBDA = 1.0
DEFAULT_MAX_BIN = 256


class BoostingError(RuntimeError):
    """XGBoost's federated training cannot go on; the message says why and what to do."""


def _xgboost() -> Any:
    try:
        import xgboost
    except ModuleNotFoundError as e:
        raise BoostingError(
            f"model xgboost needs the package xgboost (cannot import {e.name}): install the "
            "boosting extra, pip install 'fedstudy[boosting]'"
        ) from None
    return xgboost


# --- the forest as tensors --------------------------------------------------------------------


def node_count(depth: int) -> int:
    """Nodes of a complete binary tree with ``depth`` levels below its root."""
    return (1 << (depth + 1)) - 1


def max_depth_of(model: Model) -> int:
    return DEFAULT_MAX_DEPTH if model.maxDepth is None else model.maxDepth


def empty_forest(trees: int, depth: int, base_margin: float = 0.0) -> WireWeights:
    """A forest of ``trees`` unused slots (no tree yet): the model before the first round."""
    nodes = node_count(depth)
    return {
        FEATURE: np.full((trees, nodes), UNUSED, dtype=np.int32),
        THRESHOLD: np.zeros((trees, nodes), dtype=np.float32),
        DEFAULT_LEFT: np.zeros((trees, nodes), dtype=np.bool_),
        VALUE: np.zeros((trees, nodes), dtype=np.float32),
        BASE_MARGIN: np.array([base_margin], dtype=np.float32),
    }


def _base_margin(learner: dict[str, Any]) -> float:
    """The margin of XGBoost's ``base_score`` (a probability, for binary:logistic)."""
    text = str(learner["learner_model_param"]["base_score"]).strip("[] ")
    p = float(text.split(",")[0])
    return math.log(p / (1.0 - p))


def encode_booster(model: dict[str, Any], trees: int, depth: int) -> WireWeights:
    """A booster (its JSON model, ``save_raw("json")``) as a forest of ``trees`` slots of
    ``depth`` levels. Node ``i`` of a slot has its children at ``2i + 1`` and ``2i + 2``."""
    learner = model["learner"]
    forest = empty_forest(trees, depth, _base_margin(learner))
    nodes = node_count(depth)
    grown = learner["gradient_booster"]["model"]["trees"]
    if len(grown) > trees:
        raise BoostingError(f"the booster has {len(grown)} trees, the study plans {trees}")
    for t, tree in enumerate(grown):
        left, right = tree["left_children"], tree["right_children"]
        features, conditions = tree["split_indices"], tree["split_conditions"]
        defaults, kinds = tree["default_left"], tree["split_type"]
        stack = [(0, 0)]
        while stack:
            node, slot = stack.pop()
            if slot >= nodes:
                raise BoostingError(f"tree {t + 1} is deeper than maxDepth {depth}")
            if left[node] == -1:
                forest[FEATURE][t, slot] = LEAF
                forest[VALUE][t, slot] = conditions[node]
                continue
            if kinds[node] != 0:
                raise BoostingError(f"tree {t + 1} has a categorical split; features are numeric")
            forest[FEATURE][t, slot] = features[node]
            forest[THRESHOLD][t, slot] = conditions[node]
            forest[DEFAULT_LEFT][t, slot] = bool(defaults[node])
            stack.append((left[node], 2 * slot + 1))
            stack.append((right[node], 2 * slot + 2))
    return forest


def forest_margin(forest: WireWeights, x: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """The forest's margin (log-odds) for each row of ``x``, as XGBoost computes it."""
    feature = np.asarray(forest[FEATURE])
    threshold = np.asarray(forest[THRESHOLD], dtype=np.float32)
    default_left = np.asarray(forest[DEFAULT_LEFT], dtype=np.bool_)
    value = np.asarray(forest[VALUE], dtype=np.float32)
    rows = np.asarray(x, dtype=np.float32)
    n = len(rows)
    depth = (feature.shape[1] + 1).bit_length() - 2
    margin = np.full(n, float(np.asarray(forest[BASE_MARGIN])[0]), dtype=np.float32)
    index = np.arange(n)
    for t in range(feature.shape[0]):
        if feature[t, 0] == UNUSED:
            continue
        slot = np.zeros(n, dtype=np.int64)
        for _ in range(depth):
            split = feature[t, slot]
            inner = split >= 0
            if not inner.any():
                break
            cells = rows[index, np.where(inner, split, 0)]
            go_left = np.where(np.isnan(cells), default_left[t, slot], cells < threshold[t, slot])
            slot = np.where(inner, 2 * slot + np.where(go_left, 1, 2), slot)
        margin += value[t, slot]
    return margin.astype(np.float64)


def margin_metrics(margin: npt.NDArray[np.float64], y: FloatArray) -> dict[str, float]:
    """Loss (binary cross-entropy), accuracy (probability > 0.5), AUC and AUPRC, as
    ``train.evaluate`` reports them for the torch models."""
    z = np.asarray(margin, dtype=np.float64)
    truth = np.asarray(y, dtype=np.float64)
    loss = float(np.mean(np.maximum(z, 0.0) - z * truth + np.log1p(np.exp(-np.abs(z)))))
    probs = 1.0 / (1.0 + np.exp(-z))
    metrics = {"loss": loss, "accuracy": float(((probs > 0.5) == (truth > 0.5)).mean())}
    if len(np.unique(truth)) == 2:
        metrics.update(ranking_metrics(truth, probs))
    return metrics


def booster_params(model: Model, seed: int) -> dict[str, Any]:
    """XGBoost's parameters for the study's model (the same at every site)."""
    return {
        "objective": "binary:logistic",
        "tree_method": "hist",
        "max_depth": max_depth_of(model),
        "eta": DEFAULT_LEARNING_RATE if model.learningRate is None else model.learningRate,
        "min_child_weight": (
            DEFAULT_MIN_CHILD_WEIGHT if model.minChildWeight is None else model.minChildWeight
        ),
        "lambda": DEFAULT_REG_LAMBDA if model.regLambda is None else model.regLambda,
        "max_bin": DEFAULT_MAX_BIN if model.maxBin is None else model.maxBin,
        # The margin starts at 0 (probability 0.5) at every site, so the initial model is
        # known before any data is seen.
        "base_score": 0.5,
        "seed": seed,
        "nthread": 1,
        "verbosity": 1,
    }


def local_forest(spec: StudySpec, data: SiteDataset) -> WireWeights:
    """The site's local-only model: the same trees, rounds and parameters on its rows alone
    (outside any communicator)."""
    xgb = _xgboost()
    dtrain = xgb.DMatrix(data.X_train, label=data.y_train, nthread=1)
    booster = xgb.train(booster_params(spec.model, spec.seed), dtrain, num_boost_round=spec.rounds)
    model = json.loads(bytes(booster.save_raw("json")))
    return encode_booster(model, spec.rounds, max_depth_of(spec.model))


# --- the federated worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrackerLink:
    """How a site reaches the aggregator's XGBoost tracker."""

    address: str  # HOST:PORT
    world: int  # the study's number of sites
    rank: int  # this site's place in spec.sites
    tls: CredentialFiles | None  # None: no TLS (--insecure)
    timeout_s: int

    def communicator_args(self) -> dict[str, str | int]:
        args: dict[str, str | int] = {
            "dmlc_communicator": "federated",
            "federated_server_address": self.address,
            "federated_world_size": self.world,
            "federated_rank": self.rank,
            "dmlc_timeout": self.timeout_s,
        }
        if self.tls is not None:
            args["federated_server_cert_path"] = str(self.tls.ca)
            args["federated_client_key_path"] = str(self.tls.key)
            args["federated_client_cert_path"] = str(self.tls.cert)
        return args


T = TypeVar("T")


class _OneThread:
    """Runs calls one after the other on a single daemon thread.

    XGBoost's communicator belongs to the thread that opened it, so every call inside it
    must come from that thread; a daemon thread, so a call that never returns (a tracker
    that never answers) cannot keep the process alive."""

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller's thread
                    future.set_exception(e)

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        """``fn()`` on the thread; TimeoutError when it takes longer than ``timeout``."""
        future: Future[T] = Future()
        self._calls.put((fn, future))
        return future.result(timeout)

    def stop(self) -> None:
        self._calls.put(None)


class FederatedBooster:
    """One site's booster inside XGBoost's federated communicator, a tree per round.

    The communicator opens at round 1 and closes after the last round (or at exit). Every
    site must make the same calls in the same order, so a site that did not grow the earlier
    trees with the others cannot join later."""

    def __init__(
        self, link: TrackerLink, params: dict[str, Any], x: FloatArray, y: FloatArray
    ) -> None:
        self.link = link
        self.params = params
        self.x = x
        self.y = y
        self.rounds_done = 0
        self.model: dict[str, Any] | None = None
        self._booster: Any = None
        self._dtrain: Any = None
        self._open = False
        self._stuck = False  # a round outlived the timeout: the communicator is unusable
        self._thread = _OneThread("xgboost")

    def train_round(self, round_: int) -> dict[str, Any]:
        """Grows round ``round_``'s tree with every other site; returns the JSON model."""
        if round_ == self.rounds_done and self.model is not None:
            return self.model  # asked again (the aggregator lost the update): the same tree
        if round_ != self.rounds_done + 1:
            raise BoostingError(
                f"round {round_}: this site holds {self.rounds_done} trees (its trainer "
                "restarted?). XGBoost's federated mode grows every tree with every site from "
                "round 1, so a site cannot join in the middle: run the study again"
            )
        if self._stuck:
            raise BoostingError(f"round {round_}: an earlier round never finished")
        xgb = _xgboost()
        from xgboost import collective

        def grow() -> None:
            if not self._open:
                collective.init(**self.link.communicator_args())
                self._open = True
                # Collective: agrees the histogram bins of every feature across the sites.
                self._dtrain = xgb.DMatrix(self.x, label=self.y, nthread=1)
                self._booster = xgb.Booster(self.params, [self._dtrain])
            self._booster.update(self._dtrain, round_ - 1)

        # XGBoost waits for every site without a deadline of its own (a site that never
        # joins the tracker, or whose certificate the tracker refuses, stalls the others).
        try:
            self._thread.call(grow, self.link.timeout_s)
        except TimeoutError:
            self._stuck = True
            raise BoostingError(
                f"round {round_}: the sites did not complete the round through XGBoost's "
                f"federated tracker at {self.link.address} within {self.link.timeout_s} s "
                "(roundTimeoutSeconds): a site has not reached the tracker, or the tracker "
                "refused its certificate (every site needs one from the study's CA)"
            ) from None
        except xgb.core.XGBoostError as e:
            raise BoostingError(
                f"round {round_}: XGBoost's federated training failed (tracker "
                f"{self.link.address}): {_first_line(str(e))}"
            ) from None
        self.rounds_done = round_
        self.model = json.loads(bytes(self._booster.save_raw("json")))
        return self.model

    def close(self) -> None:
        """Leaves the communicator (once every tree is grown, or at exit)."""
        if self._open and not self._stuck:
            from xgboost import collective

            self._open = False
            self._thread.call(collective.finalize, self.link.timeout_s)
        self._thread.stop()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Stack trace", "[bt]"))]
    return (useful or lines or [text])[-1][:500]


# --- the site trainer -------------------------------------------------------------------------


class BoostingSiteTrainer(SiteTrainer):
    """A site of an XGBoost study: the same protocol, lifecycle and reports as any site,
    with a tree grown per round instead of local SGD steps."""

    def __init__(self, *args: Any, tracker: TrackerLink, **kwargs: Any) -> None:
        self.link = tracker
        super().__init__(*args, **kwargs)

    def _init_model(self) -> Weights:
        self.depth = max_depth_of(self.spec.model)
        self.forest = empty_forest(self.spec.rounds, self.depth)
        self.global_forest: WireWeights = self.forest
        self.booster = FederatedBooster(
            self.link,
            booster_params(self.spec.model, self.spec.seed),
            self.data.X_train,
            self.data.y_train,
        )
        logs.event(
            self.log,
            "boosting",
            tracker=self.link.address,
            rank=self.link.rank,
            workers=self.link.world,
            mutual_tls=self.link.tls is not None,
            max_depth=self.depth,
            trees=self.spec.rounds,
        )
        return cast(Weights, self.forest)

    def _use_global(self, version: int, weights: WireWeights) -> None:
        if version == self.booster.rounds_done and digest(weights) != digest(self.forest):
            raise BoostingError(
                f"global model version {version} is not the forest this site grew with the "
                f"others ({digest(weights)[:12]} against {digest(self.forest)[:12]}): every "
                "site must hold the same trees"
            )
        self.global_forest = weights

    def _evaluate(self, version: int) -> dict[str, float]:
        margin = forest_margin(self.global_forest, self.data.X_test)
        metrics = margin_metrics(margin, self.data.y_test)
        logs.event(self.log, "evaluated", model_version=version, metrics=metrics)
        return metrics

    def _train_round(self, round_: int, proximal_mu: float) -> TrainResult:
        started = time.perf_counter()
        model = self.booster.train_round(round_)
        self.forest = encode_booster(model, self.spec.rounds, self.depth)
        if round_ >= self.spec.rounds:
            self.booster.close()
        loss = margin_metrics(forest_margin(self.forest, self.data.X_train), self.data.y_train)
        return TrainResult(loss=loss["loss"], steps=1, seconds=time.perf_counter() - started)

    def _trained_weights(self) -> Weights:
        return cast(Weights, self.forest)

    def _local_baseline(self) -> dict[str, float]:
        self.booster.close()
        forest = local_forest(self.spec, self.data)
        return margin_metrics(forest_margin(forest, self.data.X_test), self.data.y_test)

    def _baseline_steps(self) -> int:
        return self.spec.rounds  # trees

    def run(self) -> int:
        try:
            return super().run()
        finally:
            try:
                self.booster.close()
            except Exception as e:  # leaving is best effort once the study is over
                logs.event(self.log, "boosting-close-failed", logging.WARNING, error=str(e))
