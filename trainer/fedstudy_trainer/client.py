"""The trainer's side of the wire protocol (docs/protocol.md): join, then do what it is told.

The trainer keeps no opinion of where the study is: it asks the aggregator for a task, does
it, and asks again. Network failures are retried with exponential backoff and jitter; a
trainer that has had no successful call for ``connect_timeout`` seconds gives up.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedstudy import __version__, fsutil, logs
from fedstudy.spec import FederatedStudy
from fedstudy.tensors import Weights as WireWeights
from fedstudy.tensors import WireError, from_chunks, signature, to_chunks, total_bytes
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc
from fedstudy_trainer.data import SiteDataset
from fedstudy_trainer.imaging import make_augmenter
from fedstudy_trainer.models import Weights, build_study_model, get_weights, set_weights
from fedstudy_trainer.privacy import LEAVE_REASON, BudgetExhausted, SitePrivacy
from fedstudy_trainer.runtime import DeviceError, Runtime, site_runtime
from fedstudy_trainer.train import (
    TrainResult,
    derive_seed,
    evaluate,
    local_baseline,
    train_local,
)

T = TypeVar("T")

# Status codes that mean "the aggregator could not be reached or the call broke off": retried
# with backoff. Any other failed call abandons the task at hand and asks for a new one.
NETWORK_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 5.0
CALL_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 600.0
STATE_FILE = "trainer.json"

EXIT_DONE = 0
EXIT_REFUSED = 2
EXIT_UNREACHABLE = 3


class JoinRefused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(
            f"the aggregator refused the join: {reason}" + (f": {message}" if message else "")
        )


class GaveUp(Exception):
    """No successful call for longer than the connect timeout."""


class TaskAbandoned(Exception):
    """A task could not be done (a refused call, a bad model stream); ask for a new one."""


class LeftStudy(Exception):
    """The site told the aggregator it leaves the study (its privacy budget is spent)."""


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = err.code() if isinstance(err, grpc.Call) else None
    return code if isinstance(code, grpc.StatusCode) else None


def _details(err: grpc.RpcError) -> str:
    details = err.details() if isinstance(err, grpc.Call) else None
    return str(details) if details else str(err)


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """Only finite values travel: a NaN or infinite metric is left out."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


@dataclass
class Backoff:
    """Exponential backoff with jitter, and the deadline of the connect timeout."""

    connect_timeout: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    start: float = BACKOFF_START_S
    cap: float = BACKOFF_CAP_S

    def __post_init__(self) -> None:
        self.failures = 0
        self.last_ok = self.clock()
        self._random = random.Random()

    def ok(self) -> None:
        self.failures = 0
        self.last_ok = self.clock()

    def wait(self) -> float:
        """Sleeps before the next try; raises GaveUp when the connect timeout has passed."""
        left = self.connect_timeout - (self.clock() - self.last_ok)
        if left <= 0:
            raise GaveUp(f"no successful call to the aggregator for {self.connect_timeout:g} s")
        delay = min(self.cap, self.start * 2.0**self.failures)
        delay = delay / 2 + self._random.uniform(0, delay / 2)
        delay = min(delay, left)
        self.failures += 1
        self.sleep(delay)
        return delay


class SiteTrainer:
    """One site's trainer: its data, its model, and the loop over the aggregator's tasks."""

    def __init__(
        self,
        study: FederatedStudy,
        site: str,
        data: SiteDataset,
        stub: aggregator_pb2_grpc.AggregatorStub,
        state_dir: Path,
        logger: logging.Logger,
        *,
        connect_timeout: float = 600.0,
        wait_seconds: float = 10.0,
        backoff: Backoff | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.study = study
        self.spec = study.spec
        self.site = site
        self.data = data
        self.stub = stub
        self.state_path = state_dir / STATE_FILE
        self.log = logger
        self.wait_seconds = wait_seconds
        self.reserve_uploads = True  # until the aggregator says it has no ReserveUpload
        self.backoff = backoff or Backoff(connect_timeout)
        self.runtime = runtime or self._runtime()
        logs.event(self.log, "device", **self.runtime.describe())
        self.initial_weights = self._init_model()
        self.signature = signature(self.initial_weights)
        self.state: dict[str, Any] = self._load_state()
        self._baseline: dict[str, float] | None = None
        self.privacy: SitePrivacy | None = None
        if self.spec.privacy is not None:  # DP-SGD: checks, calibration, the site's ledger
            self.privacy = SitePrivacy.create(
                self.spec, study.name, site, data.n_train, self.model, state_dir
            )
            logs.event(self.log, "privacy", **self.privacy.describe())

    def _init_model(self) -> Weights:
        """Builds the study's model (and the augmentation of its batches); returns its initial
        weights."""
        self.model = build_study_model(self.spec, self.data.input_shape).to(self.runtime.device)
        self.augment = make_augmenter(self.spec, self.data.input_shape, self.runtime.device)
        return get_weights(self.model)

    def _runtime(self) -> Runtime:
        """The site's device; a DeviceError naming the field when this machine lacks it."""
        index = [s.name for s in self.spec.sites].index(self.site)
        try:
            return site_runtime(
                self.spec.sites[index].resources.device,
                self.spec.training.mixedPrecision,
                private=self.spec.privacy is not None,
            )
        except DeviceError as e:
            raise DeviceError(f"spec.sites[{index}].resources.device: {e}") from None

    # --- state -------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"study": self.study.name, "site": self.site}
        if not self.state_path.exists():
            return fresh
        try:
            state = fsutil.read_json(self.state_path)
        except (OSError, ValueError) as e:
            logs.event(
                self.log,
                "state-unreadable",
                logging.WARNING,
                path=str(self.state_path),
                error=str(e),
            )
            return fresh
        if (
            not isinstance(state, dict)
            or state.get("study") != self.study.name
            or state.get("site") != self.site
        ):
            logs.event(
                self.log,
                "state-ignored",
                logging.WARNING,
                path=str(self.state_path),
                why="written for another study or site",
            )
            return fresh
        logs.event(
            self.log,
            "state-loaded",
            path=str(self.state_path),
            last_round_trained=state.get("last_round_trained"),
            last_update_id=state.get("last_update_id"),
        )
        return state

    def _save_state(self, **changes: Any) -> None:
        self.state.update(changes, updated_at=round(time.time(), 3))
        fsutil.atomic_write_json(self.state_path, self.state)

    # --- calls -------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[], T]) -> T:
        """Runs one call, retrying network failures with backoff until the connect timeout."""
        while True:
            try:
                result = fn()
            except grpc.RpcError as err:
                code = _code(err)
                if code not in NETWORK_CODES:
                    raise
                delay = self.backoff.wait()
                logs.event(
                    self.log,
                    "reconnecting",
                    logging.WARNING,
                    call=name,
                    code=code.name if code else None,
                    error=_details(err),
                    attempt=self.backoff.failures,
                    delay_s=round(delay, 3),
                )
                continue
            self.backoff.ok()
            return result

    def _join(self) -> None:
        request = pb.JoinRequest(
            study=self.study.name,
            site=self.site,
            train_samples=self.data.n_train,
            test_samples=self.data.n_test,
            model=[s.to_proto() for s in self.signature],
            trainer_version=__version__,
        )
        response = self._call("Join", lambda: self.stub.Join(request, timeout=CALL_TIMEOUT_S))
        if not response.accepted:
            raise JoinRefused(response.reason, response.message)
        logs.event(
            self.log,
            "joined",
            study=self.study.name,
            site=self.site,
            train_samples=self.data.n_train,
            test_samples=self.data.n_test,
            planned_rounds=response.planned_rounds,
            completed_rounds=response.completed_rounds,
        )

    def _download(self, version: int) -> None:
        """Fetches global model ``version`` and loads it into the model."""
        request = pb.DownloadRequest(study=self.study.name, site=self.site, model_version=version)

        def fetch() -> WireWeights:
            stream = self.stub.DownloadModel(request, timeout=STREAM_TIMEOUT_S)
            try:
                return from_chunks(stream, expected=self.signature)
            except WireError:
                stream.cancel()  # stop the rest of a stream we refuse
                raise

        try:
            weights = self._call("DownloadModel", fetch)
        except WireError as e:
            logs.event(
                self.log,
                "download-refused",
                logging.ERROR,
                model_version=version,
                reason=e.reason,
                error=str(e),
            )
            raise TaskAbandoned(f"model version {version}: {e}") from None
        self._use_global(version, weights)

    def _use_global(self, version: int, weights: WireWeights) -> None:
        """Takes global model ``version`` as the model to evaluate and train from."""
        set_weights(self.model, weights)

    def _report(
        self,
        kind: pb.ReportRequest.Kind.ValueType,
        version: int,
        metrics: dict[str, float],
        local_only: dict[str, float] | None = None,
    ) -> None:
        request = pb.ReportRequest(
            study=self.study.name,
            site=self.site,
            kind=kind,
            model_version=version,
            test_samples=self.data.n_test,
            metrics=finite(metrics),
            local_only_metrics=finite(local_only or {}),
        )
        receipt = self._call("Report", lambda: self.stub.Report(request, timeout=CALL_TIMEOUT_S))
        if not receipt.accepted:
            logs.event(
                self.log,
                "report-refused",
                logging.WARNING,
                model_version=version,
                reason=receipt.reason,
                message=receipt.message,
            )

    def _reserve(self, header: pb.UpdateHeader) -> None:
        """Waits until the aggregator holds room for the update, so that it never waits
        half-sent in the aggregator's buffers. Not granted for another reason than "busy":
        the update is sent anyway, and its receipt says why it was refused. An aggregator
        without ReserveUpload receives it as before."""
        if not self.reserve_uploads:
            return
        request = pb.UploadReservation(header=header, wait_seconds=self.wait_seconds)
        while True:
            try:
                grant = self.stub.ReserveUpload(request, timeout=self.wait_seconds + CALL_TIMEOUT_S)
            except grpc.RpcError as err:
                if _code(err) != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.reserve_uploads = False
                return
            if grant.granted or grant.reason != "busy":
                return

    def _submit(self, round_: int, base: int, weights: Weights, loss: float) -> None:
        """Sends a full set of weights for ``round_``; a fresh update id for every attempt."""
        tensor_count = len(weights)
        size = total_bytes(weights)
        last_id = ""

        def send() -> pb.UpdateReceipt:
            nonlocal last_id
            last_id = str(uuid.uuid4())
            header = pb.UpdateHeader(
                study=self.study.name,
                site=self.site,
                round=round_,
                base_version=base,
                num_samples=self.data.n_train,
                update_id=last_id,
                train_loss=loss if math.isfinite(loss) else 0.0,
                tensor_count=tensor_count,
                total_bytes=size,
            )

            def chunks() -> Iterator[pb.UpdateChunk]:
                yield pb.UpdateChunk(header=header)
                for chunk in to_chunks(weights):
                    yield pb.UpdateChunk(tensor=chunk)

            self._reserve(header)
            return self.stub.SubmitUpdate(chunks(), timeout=STREAM_TIMEOUT_S)

        receipt = self._call("SubmitUpdate", send)
        status = "accepted" if receipt.accepted else "refused"
        self._save_state(
            last_update_id=last_id,
            last_update_round=round_,
            last_update_status=status,
            last_update_reason=receipt.reason,
        )
        if receipt.accepted:
            logs.event(self.log, "update-accepted", round=round_, update_id=last_id)
        else:
            logs.event(
                self.log,
                "update-refused",
                logging.WARNING,
                round=round_,
                update_id=last_id,
                reason=receipt.reason,
                message=receipt.message,
            )

    # --- tasks -------------------------------------------------------------------------

    def _evaluate(self, version: int) -> dict[str, float]:
        metrics = evaluate(self.model, self.data.X_test, self.data.y_test, self.runtime)
        logs.event(self.log, "evaluated", model_version=version, metrics=finite(metrics))
        return metrics

    def do_init(self) -> None:
        logs.event(self.log, "init", why="the aggregator has no model yet")
        self._submit(0, 0, self.initial_weights, math.nan)

    def do_train(self, task: pb.TaskResponse) -> None:
        round_, version = task.round, task.model_version
        if version != round_ - 1:
            logs.event(
                self.log, "unexpected-version", logging.WARNING, round=round_, model_version=version
            )
        if self.state.get("last_update_round") == round_:
            # e.g. this trainer restarted, or the aggregator did: train the round again
            # (same seed, same base model, so the same weights), with a fresh update id.
            logs.event(
                self.log,
                "round-again",
                round=round_,
                previous_update_id=self.state.get("last_update_id"),
                previous_status=self.state.get("last_update_status"),
            )
        self._download(version)
        self._report(pb.ReportRequest.EVALUATION, version, self._with_privacy(version))
        result = self._train_round(round_, task.proximal_mu)
        logs.event(
            self.log,
            "round-trained",
            round=round_,
            loss=result.loss,
            steps=result.steps,
            seconds=round(result.seconds, 3),
            proximal_mu=task.proximal_mu,
        )
        self._save_state(
            last_round_trained=round_,
            last_round_base_version=version,
            last_round_loss=result.loss if math.isfinite(result.loss) else None,
        )
        # Under DP the training loss stays here: it is computed from the private rows.
        sent_loss = result.loss if self.privacy is None else math.nan
        self._submit(round_, version, self._trained_weights(), sent_loss)

    def _train_round(self, round_: int, proximal_mu: float) -> TrainResult:
        """Trains round ``round_`` from the global model, in place."""
        if self.privacy is not None:
            return self._train_private(round_, proximal_mu)
        return train_local(
            self.model,
            self.data.X_train,
            self.data.y_train,
            self.spec.training,
            proximal_mu=proximal_mu,
            seed=derive_seed(self.spec.seed, self.site, round_),
            runtime=self.runtime,
            augment=self.augment,
        )

    def _trained_weights(self) -> Weights:
        """The weights to send after a round."""
        return get_weights(self.model)

    def _with_privacy(self, version: int) -> dict[str, float]:
        """The evaluation of ``version``, with the ε spent so far (and δ) under DP."""
        metrics = self._evaluate(version)
        return metrics if self.privacy is None else {**metrics, **self.privacy.metrics()}

    def _train_private(self, round_: int, proximal_mu: float) -> TrainResult:
        """One round of DP-SGD; when it would pass the budget, leaves the study instead."""
        assert self.privacy is not None
        try:
            return self.privacy.train_round(
                self.model,
                self.data.X_train,
                self.data.y_train,
                self.spec.training,
                round_=round_,
                seed=derive_seed(self.spec.seed, self.site, round_),
                proximal_mu=proximal_mu,
                runtime=self.runtime,
                augment=self.augment,
            )
        except BudgetExhausted as e:
            logs.event(
                self.log, "privacy-budget-exhausted", logging.WARNING, round=round_, why=str(e)
            )
            request = pb.LeaveRequest(
                study=self.study.name, site=self.site, reason=LEAVE_REASON, message=str(e)
            )
            self._call("Leave", lambda: self.stub.Leave(request, timeout=CALL_TIMEOUT_S))
            raise LeftStudy(str(e)) from None

    def do_finish(self, task: pb.TaskResponse) -> None:
        version = task.model_version
        self._download(version)
        metrics = self._with_privacy(version)
        local_only: dict[str, float] | None = None
        # Under DP no local-only baseline: it would be trained and reported outside the ledger.
        if self.spec.localBaseline and self.privacy is None:
            if self._baseline is None:
                started = time.perf_counter()
                self._baseline = self._local_baseline()
                logs.event(
                    self.log,
                    "local-baseline",
                    metrics=finite(self._baseline),
                    steps=self._baseline_steps(),
                    seconds=round(time.perf_counter() - started, 3),
                )
            local_only = self._baseline
        self._report(pb.ReportRequest.FINAL, version, metrics, local_only)
        self._save_state(finished_version=version)

    def _local_baseline(self) -> dict[str, float]:
        """The metrics of a model trained on this site's data alone, with the same budget."""
        return local_baseline(self.spec, self.site, self.data, self.runtime, self.augment)

    def _baseline_steps(self) -> int:
        return self.spec.rounds * self.spec.training.localSteps

    def run(self) -> int:
        """Joins and follows the aggregator's tasks until DONE. Returns the exit code."""
        for note in self.data.notes:
            logs.event(self.log, "data-note", logging.WARNING, note=note)
        self._join()
        request = pb.TaskRequest(
            study=self.study.name, site=self.site, wait_seconds=self.wait_seconds
        )
        kinds = pb.TaskResponse
        while True:
            asked = time.monotonic()
            try:
                task = self._call(
                    "GetTask",
                    lambda: self.stub.GetTask(request, timeout=self.wait_seconds + CALL_TIMEOUT_S),
                )
                if task.kind == kinds.DONE:
                    logs.event(self.log, "done", message=task.message)
                    return EXIT_DONE
                if task.kind == kinds.WAIT:
                    if time.monotonic() - asked < 0.05:
                        time.sleep(0.1)  # an aggregator that answers at once: do not spin
                elif task.kind == kinds.INIT:
                    self.do_init()
                elif task.kind == kinds.TRAIN:
                    self.do_train(task)
                elif task.kind == kinds.FINISH:
                    self.do_finish(task)
                elif task.kind == kinds.REJOIN:
                    logs.event(self.log, "rejoining", message=task.message)
                    self._join()
                else:
                    logs.event(self.log, "unknown-task", logging.WARNING, kind=int(task.kind))
                    self.backoff.wait()
            except grpc.RpcError as err:
                code = _code(err)
                logs.event(
                    self.log,
                    "call-failed",
                    logging.WARNING,
                    code=code.name if code else None,
                    error=_details(err),
                )
                self.backoff.wait()
            except TaskAbandoned:
                self.backoff.wait()
            except LeftStudy as e:
                logs.event(self.log, "left-study", reason=LEAVE_REASON, message=str(e))
                return EXIT_DONE
