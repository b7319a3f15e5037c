"""The coordinator: the aggregator's protocol logic, independent of gRPC and HTTP.

It puts the parts together under one ``threading.Condition``: the round machine
(``machine``) decides, the checks (``checks``) refuse, admission (``admission``) makes room,
the update store (``store``) receives, the strategy folds, persistence
(``persistence``) checkpoints, and the study's record (``record``) remembers and shows. Every
call that changes something ends in ``_advance()``, which takes the machine's steps as far as
the new facts allow and carries out their effects; long polls wait on the condition and are
woken by each change. Refusals never stop a round.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedstudy.logs import event
from fedstudy.spec import FederatedStudy
from fedstudy.tensors import SpooledWeights, TensorSpec, Weights, WireError, digest, signature
from fedstudy.wire import aggregator_pb2 as pb

from .. import outputs
from ..audit import StudyAudit
from ..metrics import AggregatorMetrics
from ..records import SiteRecord
from ..server_dp import ServerDP
from ..strategies import Strategy, Update, make_strategy
from . import checks
from .admission import (
    SPOOL_ABOVE_BYTES,
    SPOOL_BUDGET_BYTES,
    SPOOL_CONCURRENCY,
    Admission,
    Reservation,
    capped_wait,
)
from .checks import CONTENT_REFUSALS, Refusal, model_bytes
from .machine import (
    DONE,
    FINISHING,
    TRAINING,
    CloseRound,
    EnterFinishing,
    Finish,
    NextStage,
    OpenRound,
    RoundMachine,
    Step,
)
from .persistence import DiskFailure, Persistence
from .record import StudyRecord
from .store import Examined, GlobalModel, SpoolFailure, UpdateStore, check_announced, examine

Task = pb.TaskResponse


class DownloadRefused(Exception):
    """A model download that cannot be served; ``code`` names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class Coordinator:
    """One study's aggregator logic: Join, GetTask, DownloadModel, ReserveUpload,
    SubmitUpdate, Report and Leave as plain method calls, and the timer's ``tick``."""

    def __init__(
        self,
        study: FederatedStudy,
        state_dir: Path,
        out_dir: Path,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
        *,
        spool_dir: Path | None = None,
        spool_above_bytes: int | None = SPOOL_ABOVE_BYTES,
        spool_budget_bytes: int = SPOOL_BUDGET_BYTES,
        spool_concurrency: int = SPOOL_CONCURRENCY,
    ) -> None:
        """``spool_dir`` (default ``state_dir/incoming``) receives the updates of models
        above ``spool_above_bytes`` (None: every update is received into memory), as many at
        once as ``spool_budget_bytes`` holds, at most ``spool_concurrency``."""
        self.study = study
        self.spec = study.spec
        self.name = study.name
        self.out_dir = out_dir
        self.log = log
        self.clock = clock
        self.cond = threading.Condition()
        self.admission = Admission(
            clock,
            spool_above_bytes=spool_above_bytes,
            spool_budget_bytes=spool_budget_bytes,
            spool_concurrency=spool_concurrency,
        )
        self.updates = UpdateStore(
            None if spool_above_bytes is None else (spool_dir or state_dir / "incoming")
        )
        self.persistence = Persistence(state_dir, log)
        self.strategy: Strategy = make_strategy(self.spec.strategy)
        if self.spec.serverPrivacy is not None:
            self.strategy.dp = ServerDP.from_spec(
                self.spec.serverPrivacy, self.spec.rounds, len(self.spec.sites)
            )
        self.machine = RoundMachine(
            rounds=self.spec.rounds,
            min_sites=self.spec.minSites,
            timeout=float(self.spec.roundTimeoutSeconds),
        )
        self.global_model = GlobalModel()
        # The model signature every site must join with: the first joiner's, or the model's.
        self.reference: list[TensorSpec] | None = None
        self.done_at: float | None = None
        self.stopping = False
        self.last_round_duration: float | None = None

        state_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        # The audit trail goes on from what is on disk (AuditError when it does not verify).
        self.audit = StudyAudit(out_dir, study)
        self.audit.open()
        self.record = StudyRecord(study, out_dir, self.audit)
        self._resume()
        self.record.watch_metrics(
            self.machine, self.strategy, lambda: float(self.admission.waiting)
        )

    # ----------------------------------------------------------------- views

    @property
    def model(self) -> Weights | None:
        return self.global_model.weights

    @property
    def version(self) -> int | None:
        return self.machine.version

    @property
    def phase(self) -> str:
        return self.machine.phase

    @property
    def sites(self) -> dict[str, SiteRecord]:
        return self.record.sites

    @property
    def metrics(self) -> AggregatorMetrics:
        return self.record.metrics

    @property
    def fatal(self) -> str | None:
        return self.persistence.fatal

    def model_digest(self) -> str | None:
        return self.global_model.digest()

    def server_privacy(self) -> dict[str, float | int] | None:
        """Server-side DP's spend so far (ε after the completed rounds), or None."""
        dp = self.strategy.dp
        return None if dp is None else dp.report(self.machine.version or 0)

    def summary(self) -> dict[str, Any]:
        return self.record.summary(self.machine, self.global_model, self.strategy)

    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the study, for ``/status``."""
        with self.cond:
            return self.record.status(self.machine, self.strategy)

    def prometheus(self) -> str:
        """The metrics in the Prometheus text format (``/metrics``)."""
        with self.cond:
            return self.record.metrics.text()

    # ----------------------------------------------------------------- checkpoints

    def _resume(self) -> None:
        snap = self.persistence.load(self.name, self.strategy)
        if snap is None:
            self.audit.started()
            event(
                self.log,
                "fresh-start",
                study=self.name,
                rounds=self.spec.rounds,
                strategy=self.strategy.name,
            )
            return
        Persistence.restore(
            snap, self.record, self.machine, self.strategy, self.global_model, self.clock()
        )
        self.reference = self.global_model.signature()
        self.audit.resumed(str(snap.state.get("phase")), self.version, self.model_digest())
        if self.machine.phase == DONE:
            self.done_at = self.clock()
            if not (self.out_dir / outputs.SUMMARY_FILE).exists():
                self._write_outputs(final=True)
        elif self.machine.phase == FINISHING:
            event(self.log, "finishing", model_version=self.version, sites=self._joined())
        event(
            self.log,
            "resumed",
            study=self.name,
            state=self.machine.phase,
            completed_rounds=self.version or 0,
            planned_rounds=self.spec.rounds,
            next_round=self.machine.next_round(),
        )

    def _disk_failure(self, what: str, err: OSError) -> DiskFailure:
        """Halts the aggregator (see ``Persistence.disk_failure``) and wakes every long poll."""
        failure = self.persistence.disk_failure(what, err)
        with self.cond:  # reentrant: the caller may hold it already
            self.cond.notify_all()
        return failure

    def _checkpoint_model(self) -> None:
        try:
            self.persistence.save_model(self.record, self.machine, self.strategy, self.global_model)
        finally:
            if self.fatal is not None:  # halted: wake every long poll
                self.cond.notify_all()

    def _checkpoint_state(self) -> None:
        try:
            self.persistence.save_state(self.record, self.machine, self.strategy)
        finally:
            if self.fatal is not None:
                self.cond.notify_all()

    def _audit_write(self, what: str, write: Callable[[], None]) -> None:
        """Appends to the audit trail; a failed write halts the aggregator like a failed
        checkpoint (the entry would otherwise be missing from the trail)."""
        try:
            write()
        except OSError as e:
            raise self._disk_failure(f"writing the audit trail ({what})", e) from e

    def _write_outputs(self, final: bool) -> None:
        try:
            self.record.write_outputs(final, self.machine, self.global_model, self.strategy)
        except OSError as e:
            raise self._disk_failure("writing the outputs", e) from e

    # ----------------------------------------------------------------- transitions

    def _joined(self) -> list[str]:
        return sorted(self.record.joined())

    def _advance(self, wake_on_change: bool = False) -> None:
        """Takes the machine's steps as far as the facts allow, then wakes the long polls.
        ``wake_on_change``: wake them only if the phase, round, stage or model version changed
        (an accepted update that does not close the round gives no waiting site new work, and
        waking hundreds of polls for each update costs more than the round itself)."""
        if self.machine.phase == DONE:
            return
        before = self.machine.position()
        while (step := self.machine.next_step(self.record.roster())) is not None:
            self._take(step)
        if not wake_on_change or self.machine.position() != before:
            self.cond.notify_all()

    def _take(self, step: Step) -> None:
        """Carries out a step's effects and moves the machine on."""
        m = self.machine
        if isinstance(step, OpenRound):
            assert self.model is not None
            m.open_round(step.round, self.clock())
            self.record.round_refused.clear()
            self.audit.updates = {}
            self.strategy.begin_round(self.model)
            event(
                self.log,
                "round-open",
                round=step.round,
                sites=self._joined(),
                model_version=step.round - 1,
            )
        elif isinstance(step, NextStage):
            m.next_stage(self.clock())
            event(self.log, "stage-open", round=step.round, stage=step.stage)
        elif isinstance(step, CloseRound):
            if step.timed_out:
                event(
                    self.log,
                    "round-timeout",
                    round=step.round,
                    stragglers=list(step.stragglers),
                    timeout_s=m.timeout,
                )
            self._close_round()
        elif isinstance(step, EnterFinishing):
            m.enter_finishing(self.clock())
            event(self.log, "finishing", model_version=m.version, sites=self._joined())
        elif isinstance(step, Finish):
            if step.timed_out:
                event(
                    self.log, "finishing-timeout", missing=list(step.missing), timeout_s=m.timeout
                )
            self._finish(completed=step.completed, reason=step.reason)

    def _close_round(self) -> None:
        new_model = self.strategy.aggregate()
        self.global_model.set(new_model)
        closed = self.machine.close_round(self.clock())
        r = closed.round
        self.last_round_duration = closed.duration_s
        self.record.metrics.round_closed(closed.duration_s)
        # The round's entry goes to the audit trail before its checkpoint (write-ahead).
        self._audit_write(
            f"round {r}",
            lambda: self.audit.round_closed(
                r,
                participants=set(closed.answered),
                excluded=set(closed.excluded),
                model_digest=self.model_digest() or digest({}),
                duration_s=closed.duration_s,
                site_epsilon=self.record.site_epsilon(),
                server_privacy=self.server_privacy(),
            ),
        )
        self._checkpoint_model()
        if r >= 2:
            self._write_outputs(final=False)
        global_version, global_metrics, _ = self.record.latest_global()
        dp_fields: dict[str, Any] = {}
        if self.strategy.dp is not None:
            dp_fields["server_privacy"] = self.server_privacy()
        event(
            self.log,
            "round-complete",
            round=r,
            sites=sorted(closed.answered),
            excluded=sorted(closed.excluded),
            duration_s=round(closed.duration_s, 3),
            refused=dict(self.record.round_refused),
            model_version=r,
            planned_rounds=self.spec.rounds,
            global_version=global_version,
            global_metrics=global_metrics,
            **dp_fields,
        )
        if self.machine.phase == FINISHING:
            event(self.log, "finishing", model_version=r, sites=self._joined())

    def _finish(self, completed: bool, reason: str | None) -> None:
        self.machine.finish()
        rec = self.record
        rec.completed = completed
        rec.ended_reason = reason
        self._audit_write(
            "study end",
            lambda: self.audit.study_end(
                completed=completed,
                ended_reason=reason,
                rounds_completed=self.version or 0,
                model_digest=self.model_digest(),
                refused_updates=rec.refused,
                sites=rec.end_sites(),
                server_privacy=self.server_privacy(),
            ),
        )
        self._write_outputs(final=True)
        self._checkpoint_state()
        # The linger for the sites to hear DONE starts now: writing a large model's outputs
        # may take longer than the linger itself.
        self.done_at = self.clock()
        event(
            self.log,
            "study-done",
            study=self.name,
            completed=completed,
            ended_reason=reason,
            rounds_completed=self.version or 0,
            refused_updates=dict(rec.refused),
        )
        self.cond.notify_all()

    def tick(self) -> None:
        """Timeouts: a round with enough answers closes; finishing stops waiting."""
        with self.cond:
            step = self.machine.timeout_step(self.record.roster(), self.clock())
            if step is not None:
                self._take(step)
                self._advance()

    # ----------------------------------------------------------------- Join / Leave

    def join(
        self,
        req: pb.JoinRequest,
        certificate_sha256: str | None = None,
        mutual_tls: bool = False,
    ) -> pb.JoinResponse:
        """Admits a site. ``certificate_sha256`` is the fingerprint of the certificate the site
        presented under mutual TLS, for the audit trail."""
        with self.cond:
            site = self.record.sites.get(req.site)
            sig = [TensorSpec.from_proto(p) for p in req.model]
            problem = checks.join_problem(req, self.name, site, sig, self.reference)
            if problem is not None:
                reason, message = problem
                event(
                    self.log,
                    "join-refused",
                    logging.WARNING,
                    site=req.site,
                    reason=reason,
                    detail=message,
                )
                return pb.JoinResponse(
                    accepted=False,
                    reason=reason,
                    message=message,
                    planned_rounds=self.spec.rounds,
                    completed_rounds=self.version or 0,
                )
            assert site is not None
            again = site.joined
            self._audit_write(
                f"{site.name} joined",
                lambda: self.audit.site_joined(
                    site.name,
                    again=again,
                    train_samples=int(req.train_samples),
                    test_samples=int(req.test_samples),
                    trainer_version=req.trainer_version,
                    certificate_sha256=certificate_sha256,
                    mutual_tls=mutual_tls,
                ),
            )
            if self.reference is None:
                self.reference = sig
            self.record.site_joined(site, req, sig)
            event(
                self.log,
                "site-joined",
                site=site.name,
                again=again,
                train_samples=site.train_samples,
                test_samples=site.test_samples,
                trainer_version=req.trainer_version,
                joined=len(self.record.joined()),
            )
            self._advance()
            return pb.JoinResponse(
                accepted=True, planned_rounds=self.spec.rounds, completed_rounds=self.version or 0
            )

    def leave(self, req: pb.LeaveRequest) -> pb.LeaveReceipt:
        with self.cond:
            site = self.record.sites.get(req.site)
            if req.study != self.name or site is None:
                return pb.LeaveReceipt(accepted=False)
            was_joined = site.joined
            self._audit_write(
                f"{site.name} left",
                lambda: self.audit.site_left(site.name, req.reason or "left", req.message),
            )
            site.joined = False
            site.left = req.reason or "left"
            event(
                self.log,
                "site-left",
                logging.WARNING,
                site=site.name,
                reason=req.reason,
                detail=req.message,
                was_joined=was_joined,
            )
            self.machine.release_lease(site.name)
            joined = self.record.joined()
            why = (
                f"site {site.name} left ({req.reason or 'no reason'}"
                + (f": {req.message}" if req.message else "")
                + f"); {len(joined)} joined, minSites is {self.spec.minSites}"
            )
            step = self.machine.after_leave(self.record.roster(), why)
            if step is not None:
                self._take(step)
            self._advance()
            return pb.LeaveReceipt(accepted=True)

    # ----------------------------------------------------------------- GetTask

    def get_task(
        self, req: pb.TaskRequest, is_active: Callable[[], bool] = lambda: True
    ) -> pb.TaskResponse:
        """A long poll: work at once if there is some, else WAIT after ``wait_seconds``."""
        deadline = self.clock() + capped_wait(req.wait_seconds)
        with self.cond:
            while True:
                task = self._task_for(req)
                if task is not None:
                    return task
                remaining = deadline - self.clock()
                if remaining <= 0 or self.stopping or not is_active():
                    return self._wait_task()
                self.cond.wait(min(remaining, 1.0))

    def _wait_task(self) -> pb.TaskResponse:
        return Task(
            kind=Task.WAIT,
            round=self.machine.round or 0,
            model_version=self.version or 0,
            message=f"state {self.machine.phase}",
        )

    def _task_for(self, req: pb.TaskRequest) -> pb.TaskResponse | None:
        site = self.record.sites.get(req.site)
        if req.study != self.name or site is None:
            return Task(kind=Task.REJOIN, message=f"join study {self.name!r} first")
        had_lease = self.machine.init_lease
        work = self.machine.work_for(site.name, site.joined, site.final_reported, self.clock())
        if work is None:
            return None
        if work.kind == "done":
            site.fetched_done = True
            self.cond.notify_all()
            return Task(
                kind=Task.DONE,
                model_version=work.model_version,
                message=self.record.ended_reason or "the study is complete",
            )
        if work.kind == "rejoin":
            return Task(kind=Task.REJOIN, message="the aggregator does not know this site")
        if work.kind == "init":
            if self.machine.init_lease is not had_lease:
                event(self.log, "init-lease", site=site.name, timeout_s=self.machine.timeout)
            return Task(kind=Task.INIT, round=0, model_version=0)
        if work.kind == "stage":
            return Task(
                kind=Task.TRAIN,
                round=work.round,
                model_version=work.model_version,
                proximal_mu=self.spec.strategy.proximal_mu,
            )
        return Task(kind=Task.FINISH, round=0, model_version=work.model_version)

    # ----------------------------------------------------------------- DownloadModel

    def model_for_download(self, req: pb.DownloadRequest) -> Weights:
        with self.cond:
            if req.study != self.name:
                raise DownloadRefused("invalid-argument", f"this aggregator runs {self.name!r}")
            if req.site not in self.record.sites:
                raise DownloadRefused("not-found", f"site {req.site!r} is not in the study")
            model, version = self.model, self.version
            if model is None or version is None:
                raise DownloadRefused("failed-precondition", "there is no global model yet")
            if req.model_version != version:
                raise DownloadRefused(
                    "failed-precondition",
                    f"model version {req.model_version} is not available; the current "
                    f"global model is version {version}",
                )
            self.record.metrics.bytes_sent(req.site, model_bytes(signature(model)))
            return model  # never changed in place: rounds make new arrays

    def record_refused_call(
        self, reason: str, rpc: str, claimed: str, peer: str | None, detail: str
    ) -> None:
        """Counts and logs a call refused at the door (before any protocol check)."""
        with self.cond:
            self.record.count_refused_call(reason, rpc)
        event(
            self.log,
            "call-refused",
            logging.WARNING,
            rpc=rpc,
            reason=reason,
            site=claimed,
            peer=peer,
            detail=detail,
        )

    # ----------------------------------------------------------------- SubmitUpdate

    def submit(self, stream: Iterator[pb.UpdateChunk]) -> pb.UpdateReceipt:
        """Receives one update stream; checks it; folds it into the round or refuses it."""
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            return self._refuse(None, Refusal("bad-stream", "the stream must start with a header"))
        h = first.header
        held = self.admission.claim(h.site, h.update_id)
        try:
            return self._receive(h, first, stream, held)
        finally:
            if held is not None:
                held.release()

    def _check_header(self, h: pb.UpdateHeader) -> tuple[list[TensorSpec], int]:
        return checks.check_header(
            h,
            study=self.name,
            sites=self.record.sites,
            machine=self.machine,
            model_signature=self.global_model.signature(),
            seen_ids=self.record.seen_ids,
        )

    def _check_still_open(self, h: pb.UpdateHeader) -> None:
        checks.check_still_open(h, self.record.sites, self.machine, self.model is not None)

    def _receive(
        self,
        h: pb.UpdateHeader,
        first: pb.UpdateChunk,
        stream: Iterator[pb.UpdateChunk],
        held: Reservation | None,
    ) -> pb.UpdateReceipt:
        try:
            with self.cond:
                expected, bound = self._check_header(h)
            size = model_bytes(expected)
            spool = self.admission.spooled(size)
            # In memory, one update is staged at a time; spooled ones stream in side by side.
            # A reserved update has its room already.
            room = self.admission.room(size)
            with contextlib.nullcontext() if held is not None else room.take(size):
                with self.cond:
                    self._check_still_open(h)
                    base = self.model if h.round > 0 else None
                try:
                    arrived = self.updates.receive(
                        h, first.ByteSize(), stream, expected, bound, spool
                    )
                except SpoolFailure as e:
                    raise self._disk_failure(e.what, e.err) from None
                with self.cond:
                    self.record.bytes_received += arrived.stream_bytes
                    self.record.metrics.bytes_received(h.site, arrived.stream_bytes)
                check_announced(h, arrived)
                received: Weights | SpooledWeights | None = arrived.weights
                try:
                    assert received is not None
                    found = examine(received, base)
                    with self.cond:
                        self._check_still_open(h)
                        self._fold(h, received, found)
                        # The strategy has folded the update in (or kept it): drop the staged
                        # arrays before the round may close, so that closing never holds them
                        # next to the new model.
                        if isinstance(received, SpooledWeights):
                            received.close()
                        received = None
                        self._advance(wake_on_change=True)
                finally:
                    if isinstance(received, SpooledWeights):
                        received.close()
        except Refusal as r:
            return self._refuse(h, r)
        except WireError as e:
            return self._refuse(h, Refusal(e.reason, str(e)))
        return pb.UpdateReceipt(accepted=True, message=f"round {h.round} update accepted")

    def _fold(
        self, h: pb.UpdateHeader, received: Weights | SpooledWeights, found: Examined
    ) -> None:
        """Takes an accepted update in: the initial model, or one more in the round's mean.
        The caller then moves the state machine on (``_advance``). ``found``: what
        ``examine`` found in the update as it arrived (its digest and the norm of its change)."""
        site = self.record.sites[h.site]
        if h.round == 0:
            weights = received.load() if isinstance(received, SpooledWeights) else received
            self.record.update_accepted(site, h)
            self._audit_write(
                "initial model",
                lambda: self.audit.initial_model(
                    site.name,
                    found.digest,
                    tensors=len(weights),
                    parameters=sum(int(a.size) for a in weights.values()),
                ),
            )
            self.global_model.set(weights, known_digest=found.digest)
            self.machine.initial_model()
            self.reference = signature(weights)
            self._checkpoint_model()
            event(
                self.log,
                "initial-model",
                site=site.name,
                digest=found.digest,
                tensors=len(weights),
            )
            return
        assert found.norm is not None
        assert self.model is not None
        dp = self.strategy.dp
        scale = checks.clip_scale(found.norm, self.spec.strategy, None if dp is None else dp.clip)
        bound = self.spec.strategy.maxUpdateNorm
        if bound is not None and found.norm > bound:
            event(
                self.log, "update-clipped", site=h.site, round=h.round, norm=found.norm, bound=bound
            )
        line = self.record.update_accepted(site, h)
        assert line is not None
        self.audit.accepted(site.name, int(h.num_samples), found.digest)
        self.strategy.accept(Update(received, self.model, scale, owned=True), int(h.num_samples))
        self.machine.answer(site.name)
        event(
            self.log,
            "update-accepted",
            site=site.name,
            round=h.round,
            num_samples=int(h.num_samples),
            train_loss=line.train_loss,
            answered=len(self.machine.answered),
            joined=len(self.record.joined()),
        )

    def _refuse(self, h: pb.UpdateHeader | None, r: Refusal) -> pb.UpdateReceipt:
        m = self.machine
        with self.cond:
            rec = self.record
            rec.update_refused(r.reason)
            self.audit.refused(
                h.site if h is not None else None,
                int(h.round) if h is not None else None,
                r.reason,
                str(r),
            )
            excluded = (
                h is not None
                and r.reason in CONTENT_REFUSALS
                and m.phase == TRAINING
                and h.round == m.round
                and h.site in rec.sites
                and rec.sites[h.site].joined
                and h.site not in m.answered
            )
            if excluded:
                assert h is not None
                m.exclude(h.site)
        event(
            self.log,
            "update-refused",
            logging.WARNING,
            site=h.site if h is not None else None,
            round=h.round if h is not None else None,
            reason=r.reason,
            detail=str(r),
        )
        if excluded:
            with self.cond:
                self._advance()
        return pb.UpdateReceipt(accepted=False, reason=r.reason, message=str(r))

    # ---------------------------------------------------------------- ReserveUpload

    def reserve(self, req: pb.UploadReservation, is_active: Callable[[], bool]) -> pb.UploadGrant:
        """Holds room for the update ``req.header`` announces (see ``Admission.reserve``), or
        answers with the reason the update would be refused now."""
        h = req.header
        try:
            with self.cond:
                joined_with = checks.check_sender(h, self.name, self.record.sites)
                self._check_still_open(h)
                model_signature = self.global_model.signature()
                expected = joined_with if model_signature is None else model_signature
        except Refusal as r:
            return pb.UploadGrant(granted=False, reason=r.reason, message=str(r))
        if not h.update_id:
            return pb.UploadGrant(
                granted=False, reason="bad-stream", message="the header has no update_id"
            )
        grant = self.admission.reserve(
            h.site, h.update_id, model_bytes(expected), req.wait_seconds, is_active
        )
        return pb.UploadGrant(granted=grant.granted, reason=grant.reason, message=grant.message)

    # ----------------------------------------------------------------- Report

    def report(self, req: pb.ReportRequest) -> pb.ReportReceipt:
        with self.cond:
            rec = self.record
            site = rec.sites.get(req.site)
            problem = checks.report_problem(req, self.name, site, self.machine)
            if problem is not None:
                reason, message = problem
                event(
                    self.log,
                    "report-refused",
                    logging.WARNING,
                    site=req.site,
                    reason=reason,
                    detail=message,
                )
                return pb.ReportReceipt(accepted=False, reason=reason, message=message)
            assert site is not None
            line = rec.report(site, req)
            final = req.kind == pb.ReportRequest.FINAL
            event(
                self.log,
                "report",
                site=site.name,
                kind="final" if final else "evaluation",
                model_version=int(req.model_version),
                metrics=line.metrics,
            )
            if final:
                if self.machine.phase == DONE:
                    self._write_outputs(final=True)
                self._checkpoint_state()
                self._advance()
            return pb.ReportReceipt(accepted=True)

    # ----------------------------------------------------------------- exit

    def exit_due(self, linger: float) -> bool:
        """Done, and every joined site has been told, or ``linger`` seconds passed."""
        with self.cond:
            if self.machine.phase != DONE or self.done_at is None:
                return False
            joined = self.record.joined()
            if joined and all(self.record.sites[n].fetched_done for n in joined):
                return True
            return self.clock() - self.done_at >= linger

    def stop(self) -> None:
        """Wakes every long poll so the server can stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
