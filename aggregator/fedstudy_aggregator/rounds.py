"""The study's round lifecycle: one state machine, guarded by one ``threading.Condition``.

States: ``waiting`` (no initial model yet, or fewer than ``minSites`` joined), ``training``
(round r open), ``finishing`` (all rounds done; waiting for the sites' FINAL reports) and
``done``. Every call that changes something ends in ``_advance()``, which moves the machine
as far as the new facts allow; long polls wait on the condition and are woken by each change.

An update is received whole before it counts. A small model's update is received into
memory, one at a time (``_staging``); a large model's (above ``spool_above_bytes``) into a
nameless spool file, several side by side within a byte budget (``_spooling``). A site asks
for that room first (``reserve``, the ReserveUpload call) and waits for it holding nothing;
an update sent without asking waits for room with its stream open, and the data gRPC has
already taken in for it waits in memory. Then one pass
(``examine``) refuses NaN and infinity and computes the update's digest and the norm of its
change, and the strategy folds it into its running mean a block at a time. The aggregator
holds the global model and the running mean, and a spooled update never: memory stays near
two models whatever the number of sites. Refusals never stop a round.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedstudy.logs import event
from fedstudy.spec import FederatedStudy
from fedstudy.tensors import (
    Array,
    SpooledWeights,
    SpoolingAssembler,
    TensorAssembler,
    TensorSpec,
    Weights,
    WireError,
    digest,
    signature,
    signature_problem,
)
from fedstudy.wire import aggregator_pb2 as pb

from . import outputs
from .audit import StudyAudit
from .checkpoint import CheckpointError, CheckpointStore
from .metrics import AggregatorMetrics, epsilon_budget_of
from .records import (
    History,
    Metrics,
    RoundLine,
    SiteRecord,
    clean_metrics,
    combine_metrics,
    finite_or_none,
    history_from_json,
    history_to_json,
)
from .server_dp import ServerDP
from .strategies import Strategy, Update, make_strategy

WAITING = "waiting"
TRAINING = "training"
FINISHING = "finishing"
DONE = "done"

STREAM_MARGIN_BYTES = 1 << 20
# Refusals for what an update holds (not for when or how it came): the site's answer for the
# round is in, and refused; the round does not wait for it, nor ask it to train again. A stream
# cut short (missing-tensor, bad-stream) is not among them: the site may send it again.
CONTENT_REFUSALS = frozenset(
    {
        "non-finite",
        "norm-exceeded",
        "wrong-shape",
        "wrong-dtype",
        "unknown-tensor",
        "too-large",
    }
)
MAX_WAIT_SECONDS = 30.0
# Updates of models larger than this are received into a file (see ``examine`` and
# ``strategies.Update``), so the aggregator holds the global model and the round's running
# mean, and not the update too; smaller ones are received into memory.
SPOOL_ABOVE_BYTES = 64 << 20
# How many bytes of spooled updates may be arriving at once (always at least one update):
# beyond the kernel's dirty-page threshold the spool files would be written out to disk
# rather than read back from the page cache.
SPOOL_BUDGET_BYTES = 1 << 30
# And how many at once: each stream being received holds gRPC buffers of its own (about
# 25 MiB at full speed on loopback), and two keep two cores busy.
SPOOL_CONCURRENCY = 2
# Room held for a granted reservation whose update stream has not started is given back
# after this many seconds (the site died between the two calls, say).
RESERVATION_TTL_SECONDS = 30.0


class ByteBudget:
    """Admits work of a given size while the total in flight stays within ``limit`` bytes and
    ``max_items`` items (a single item larger than the limit is admitted alone)."""

    def __init__(self, limit: int, max_items: int | None = None) -> None:
        self.limit = limit
        self.max_items = max_items
        self.in_use = 0
        self.items = 0
        self._cond = threading.Condition()

    def _fits(self, nbytes: int) -> bool:
        if self.items == 0:
            return True
        room = self.max_items is None or self.items < self.max_items
        return room and self.in_use + nbytes <= self.limit

    def acquire(self, nbytes: int, timeout: float | None = None) -> bool:
        """Takes ``nbytes`` once they fit; False if they did not within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._fits(nbytes):
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                # Woken one at a time by release (hundreds of sites may wait here); the
                # timeout also re-checks now and then, should a wake-up go to a waiter that
                # has just given up.
                self._cond.wait(min(left, 1.0))
            self.in_use += nbytes
            self.items += 1
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= nbytes
            self.items -= 1
            self._cond.notify()

    @contextlib.contextmanager
    def take(self, nbytes: int) -> Iterator[None]:
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


@dataclass
class _Reservation:
    """Room in a ``ByteBudget`` held for one update, from its grant until its stream ends."""

    update_id: str
    budget: ByteBudget
    nbytes: int
    expires: float
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget.release(self.nbytes)


Task = pb.TaskResponse


class DownloadRefused(Exception):
    """A model download that cannot be served; ``code`` names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class _Refusal(Exception):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class DiskFailure(RuntimeError):
    """A checkpoint or output could not be written (a full disk, say)."""


def describe_mismatch(got: list[TensorSpec], want: list[TensorSpec]) -> str | None:
    """Says which tensor differs between two model signatures, or None when they agree."""
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"tensor {i}: the site has {g.describe()}, the study's model has {w.describe()}"
    if len(got) < len(want):
        return f"the site's model lacks {want[len(got)].describe()} ({len(got)} of {len(want)})"
    if len(got) > len(want):
        return f"the site's model has an extra tensor {got[len(want)].describe()}"
    return None


def model_bytes(specs: list[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


@dataclass(frozen=True)
class Examined:
    digest: str
    # The L2 norm of the change from the global model over the float tensors (None for an
    # initial model, which has nothing to change from).
    norm: float | None


def examine(received: Weights | SpooledWeights, base: Mapping[str, Array] | None) -> Examined:
    """One pass over an update as it arrived: refuses NaN and infinity (``WireError``
    non-finite), and computes its digest (as ``fedstudy.tensors.digest``) and the norm of its
    change from ``base``, a block at a time."""
    h = hashlib.sha256()
    total = 0.0
    update = Update(received)
    specs = received.specs.values() if isinstance(received, SpooledWeights) else signature(received)
    for spec in specs:
        h.update(f"{spec.name}\0{spec.dtype}\0{list(spec.shape)}\0".encode())
        floating = np.dtype(spec.dtype).kind == "f"
        g = base[spec.name].reshape(-1) if base is not None and floating else None
        for start, block in update.blocks(spec.name):
            if floating and not np.isfinite(block).all():
                raise WireError("non-finite", f"tensor {spec.name} holds NaN or infinity")
            h.update(np.ascontiguousarray(block).view(np.uint8).data)
            if g is not None:
                d = np.subtract(block, g[start : start + block.size], dtype=np.float64)
                # einsum, not dot: BLAS threads would spin against the gRPC threads.
                total += float(np.einsum("i,i->", d, d))
    return Examined(h.hexdigest(), float(np.sqrt(total)) if base is not None else None)


class Coordinator:
    """The aggregator's protocol logic, independent of gRPC and HTTP."""

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
        self._spooling = ByteBudget(spool_budget_bytes, max_items=spool_concurrency)
        self.study = study
        self.spool_dir = (
            None if spool_above_bytes is None else (spool_dir or state_dir / "incoming")
        )
        self.spool_above_bytes = spool_above_bytes or 0
        self.spec = study.spec
        self.name = study.name
        self.out_dir = out_dir
        self.log = log
        self.clock = clock
        self.cond = threading.Condition()
        self._staging = ByteBudget(0, max_items=1)  # one update at a time
        self._reservations: dict[str, _Reservation] = {}  # by site
        self._reservations_lock = threading.Lock()
        self.reservation_ttl = RESERVATION_TTL_SECONDS
        self.uploads_waiting = 0  # sites in ReserveUpload, waiting for room
        self.store = CheckpointStore(state_dir)
        self.strategy: Strategy = make_strategy(self.spec.strategy)
        if self.spec.serverPrivacy is not None:
            self.strategy.dp = ServerDP.from_spec(
                self.spec.serverPrivacy, self.spec.rounds, len(self.spec.sites)
            )
        self.timeout = float(self.spec.roundTimeoutSeconds)

        self.phase = WAITING
        self.model: Weights | None = None
        self._digested: Weights | None = None
        self._digest = ""
        self.version: int | None = None
        self.reference: list[TensorSpec] | None = None
        self.sites: dict[str, SiteRecord] = {s.name: SiteRecord(s.name) for s in self.spec.sites}
        self.history: History = {}
        self.seen_ids: set[str] = set()
        self.refused: Counter[str] = Counter()
        # Set when a write to disk failed: the process must stop (see _disk_failure).
        self.fatal: str | None = None
        # Calls refused before reaching the round logic (e.g. identity-mismatch under mTLS).
        self.refused_calls: Counter[str] = Counter()
        self.completed = False
        self.ended_reason: str | None = None

        self.round: int | None = None
        self.opened_at = 0.0
        self.answered: set[str] = set()
        # Sites whose update for the open round was refused for its content.
        self.excluded: set[str] = set()
        self.round_refused: Counter[str] = Counter()
        self.init_lease: tuple[str, float] | None = None
        self.finishing_since = 0.0
        self.done_at: float | None = None
        self.stopping = False
        self.accepted_total = 0
        self.bytes_received = 0
        self.last_round_duration: float | None = None
        self.metrics = AggregatorMetrics(
            self.name,
            [s.name for s in self.spec.sites],
            metric=self.spec.task.metric,
            planned_rounds=self.spec.rounds,
            epsilon_budget=epsilon_budget_of(self.spec),
        )

        state_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        # The audit trail goes on from what is on disk (AuditError when it does not verify).
        self.audit = StudyAudit(out_dir, study)
        self.audit.open()
        self._resume()
        self._watch_metrics()

    # ----------------------------------------------------------------- checkpoints

    def _resume(self) -> None:
        snap = self.store.load()
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
        st = snap.state
        if st.get("study") != self.name:
            raise CheckpointError(
                f"{self.store.state_path}: holds study {st.get('study')!r}, not {self.name!r}"
            )
        if st.get("strategy") != self.strategy.name:
            raise CheckpointError(
                f"{self.store.state_path}: was run with strategy {st.get('strategy')!r}, the "
                f"study now names {self.strategy.name!r}; use a fresh state folder"
            )
        self.model = snap.model
        self.version = st.get("version") if snap.model is not None else None
        if self.model is not None:
            self.reference = signature(self.model)
            self.strategy.load_state_dict(snap.strategy_state)
        for name, data in (st.get("sites") or {}).items():
            if name in self.sites:
                self.sites[name] = SiteRecord.from_json(name, data)
        self.history = history_from_json(st.get("history") or {})
        self.seen_ids = set(st.get("seen_update_ids") or [])
        self.refused = Counter({str(k): int(v) for k, v in (st.get("refused") or {}).items()})
        self.completed = bool(st.get("completed", False))
        self.ended_reason = st.get("ended_reason")
        self.audit.resumed(
            str(st.get("phase")),
            self.version,
            self.model_digest(),
        )
        if st.get("phase") == DONE:
            self.phase = DONE
            self.done_at = self.clock()
            if not (self.out_dir / outputs.SUMMARY_FILE).exists():
                self._write_outputs(final=True)
        elif self.version is not None and self.version >= self.spec.rounds:
            self._enter_finishing()
        event(
            self.log,
            "resumed",
            study=self.name,
            state=self.phase,
            completed_rounds=self.version or 0,
            planned_rounds=self.spec.rounds,
            next_round=self._next_round(),
        )

    def model_digest(self) -> str | None:
        """The global model's ``digest``, computed once per model (models are never changed
        in place: a new version is a new mapping)."""
        if self.model is None:
            return None
        if self._digested is not self.model:
            self._digest = digest(self.model)
            self._digested = self.model
        return self._digest

    def _state_json(self) -> dict[str, Any]:
        return {
            "study": self.name,
            "strategy": self.strategy.name,
            "planned_rounds": self.spec.rounds,
            "phase": self.phase,
            "version": self.version,
            "completed": self.completed,
            "ended_reason": self.ended_reason,
            "sites": {n: s.to_json() for n, s in self.sites.items()},
            "history": history_to_json(self.history),
            "seen_update_ids": sorted(self.seen_ids),
            "refused": dict(self.refused),
        }

    def _disk_failure(self, what: str, err: OSError) -> DiskFailure:
        """Marks the aggregator as halted by a failed write; the process then exits non-zero.

        The writes are atomic, so the last complete checkpoint is still on disk: a restart
        (once there is room) resumes from it.
        """
        self.fatal = f"{what} failed: {err.strerror or err} ({err.filename or self.store.dir})"
        event(
            self.log,
            "disk-failure",
            logging.CRITICAL,
            what=what,
            error=self.fatal,
            last_checkpoint=self.store.state_path.name,
        )
        self.cond.notify_all()
        return DiskFailure(self.fatal)

    def _checkpoint_model(self) -> None:
        assert self.model is not None
        assert self.version is not None
        try:
            self.store.save(
                self._state_json(),
                self.model,
                self.strategy.state_dict(),
                self.version,
                model_digest=self.model_digest(),
            )
        except OSError as e:
            raise self._disk_failure(f"checkpoint of model version {self.version}", e) from e

    def _checkpoint_state(self) -> None:
        try:
            self.store.save_state(self._state_json())
        except OSError as e:
            raise self._disk_failure("writing state.json", e) from e

    def _audit_write(self, what: str, write: Callable[[], None]) -> None:
        """Appends to the audit trail; a failed write halts the aggregator like a failed
        checkpoint (the entry would otherwise be missing from the trail)."""
        try:
            write()
        except OSError as e:
            raise self._disk_failure(f"writing the audit trail ({what})", e) from e

    def _write_outputs(self, final: bool) -> None:
        try:
            self._write_outputs_now(final)
        except OSError as e:
            raise self._disk_failure("writing the outputs", e) from e

    def _write_outputs_now(self, final: bool) -> None:
        """metrics.jsonl for the rounds whose lines are complete; at the end, every output."""
        v = self.version or 0
        upto = v if final else v - 1
        order = [s.name for s in self.spec.sites]
        outputs.write_metrics(self.out_dir, outputs.metrics_lines(self.history, order, upto))
        if not final:
            return
        if self.model is not None:
            outputs.write_model(self.out_dir, self.model, self.name, v)
        summary = self.summary()
        outputs.write_summary(self.out_dir, summary)
        outputs.write_model_card(self.out_dir, self.study, summary)

    def server_privacy(self) -> dict[str, float | int] | None:
        """Server-side DP's spend so far (ε after the completed rounds), or None."""
        dp = self.strategy.dp
        return None if dp is None else dp.report(self.version or 0)

    def summary(self) -> dict[str, Any]:
        out = outputs.build_summary(
            study=self.name,
            completed=self.completed,
            ended_reason=self.ended_reason,
            planned_rounds=self.spec.rounds,
            version=self.version,
            strategy=self.strategy.name,
            model=self.model,
            model_digest=self.model_digest(),
            sites=list(self.sites.values()),
            history=self.history,
            refused=self.refused,
        )
        if self.strategy.dp is not None:
            out["server_privacy"] = self.server_privacy()
        anchor = self.audit.anchor()
        if anchor is not None:
            out["audit"] = anchor
        return out

    def _watch_metrics(self) -> None:
        """Hands the state gauges to the metrics and publishes what a resumed state knows."""
        self.metrics.watch(
            round_fn=lambda: float(self.round if self.round is not None else (self.version or 0)),
            completed_fn=lambda: float(self.version or 0),
            joined_fn=lambda: float(len(self._joined())),
            answered_fn=lambda: float(len(self.answered)),
            waiting_fn=lambda: float(self.uploads_waiting),
            state_fn=lambda: self.phase,
        )
        dp = self.strategy.dp
        if dp is not None:
            self.metrics.server_epsilon.labels(self.name).set_function(
                lambda: dp.epsilon(self.version or 0)
            )
        for site in self.sites.values():
            self.metrics.site_round(site.name, site.last_round)
            self.metrics.site_metrics(site.name, site.metrics)
        self.metrics.global_metrics(self.latest_global()[1])

    # ----------------------------------------------------------------- transitions

    def _joined(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.joined]

    def _next_round(self) -> int | None:
        if self.phase in (FINISHING, DONE):
            return None
        return (self.version or 0) + 1 if self.version is not None else 0

    def _advance(self, wake_on_change: bool = False) -> None:
        """Moves the state machine as far as the facts allow, then wakes the long polls.
        ``wake_on_change``: wake them only if the phase, round or model version changed (an
        accepted update that does not close the round gives no waiting site new work, and
        waking hundreds of polls for each update costs more than the round itself)."""
        if self.phase == DONE:
            return
        before = (self.phase, self.round, self.version)
        if self.model is None or self.version is None:
            self.phase = WAITING
        elif self.phase == WAITING:
            if self.version >= self.spec.rounds:
                self._enter_finishing()
            elif len(self._joined()) >= self.spec.minSites:
                self._open_round(self.version + 1)
        elif self.phase == TRAINING:
            joined = self._joined()
            if self.answered and all(n in self.answered or n in self.excluded for n in joined):
                self._close_round()
        elif self.phase == FINISHING:
            joined = self._joined()
            reported = [n for n in joined if self.sites[n].final_reported]
            if reported and len(reported) == len(joined):
                self._finish(completed=True, reason=None)
        if not wake_on_change or (self.phase, self.round, self.version) != before:
            self.cond.notify_all()

    def _open_round(self, r: int) -> None:
        assert self.model is not None
        self.phase = TRAINING
        self.round = r
        self.opened_at = self.clock()
        self.answered = set()
        self.excluded = set()
        self.round_refused = Counter()
        self.audit.updates = {}
        self.strategy.begin_round(self.model)
        event(self.log, "round-open", round=r, sites=sorted(self._joined()), model_version=r - 1)

    def _close_round(self) -> None:
        assert self.round is not None
        r = self.round
        self.model = self.strategy.aggregate()
        self.version = r
        self.last_round_duration = self.clock() - self.opened_at
        self.metrics.round_closed(self.last_round_duration)
        self.phase = WAITING if r < self.spec.rounds else FINISHING
        if self.phase == FINISHING:
            self.finishing_since = self.clock()
        self.round = None
        # The round's entry goes to the audit trail before its checkpoint (write-ahead).
        self._audit_write(
            f"round {r}",
            lambda: self.audit.round_closed(
                r,
                participants=self.answered,
                excluded=self.excluded,
                model_digest=self.model_digest() or digest({}),
                duration_s=self.last_round_duration or 0.0,
                site_epsilon=self._site_epsilon(),
                server_privacy=self.server_privacy(),
            ),
        )
        self._checkpoint_model()
        if r >= 2:
            self._write_outputs(final=False)
        global_version, global_metrics, _ = self.latest_global()
        dp_fields: dict[str, Any] = {}
        if self.strategy.dp is not None:
            dp_fields["server_privacy"] = self.server_privacy()
        event(
            self.log,
            "round-complete",
            round=r,
            sites=sorted(self.answered),
            excluded=sorted(self.excluded),
            duration_s=round(self.last_round_duration, 3),
            refused=dict(self.round_refused),
            model_version=r,
            planned_rounds=self.spec.rounds,
            global_version=global_version,
            global_metrics=global_metrics,
            **dp_fields,
        )
        self.answered = set()
        self.excluded = set()
        if self.phase == FINISHING:
            event(self.log, "finishing", model_version=r, sites=sorted(self._joined()))
        self._advance()

    def _site_epsilon(self) -> dict[str, dict[str, Any]] | None:
        """Under DP-SGD, the ε each site last reported and the round it was spent through (a
        site reports with its evaluation of model version v: its spend over rounds 1..v)."""
        if self.spec.privacy is None:
            return None
        return {
            s.name: {"epsilon": s.metrics.get("epsilon"), "through_round": s.metrics_version}
            for s in self.sites.values()
            if "epsilon" in s.metrics
        }

    def _enter_finishing(self) -> None:
        self.phase = FINISHING
        self.finishing_since = self.clock()
        self.round = None
        event(self.log, "finishing", model_version=self.version, sites=sorted(self._joined()))

    def _finish(self, completed: bool, reason: str | None) -> None:
        self.phase = DONE
        self.completed = completed
        self.ended_reason = reason
        self.round = None
        self._audit_write(
            "study end",
            lambda: self.audit.study_end(
                completed=completed,
                ended_reason=reason,
                rounds_completed=self.version or 0,
                model_digest=self.model_digest(),
                refused_updates=self.refused,
                sites={
                    s.name: {
                        "rounds_participated": s.rounds_participated,
                        "train_samples": s.train_samples,
                        "test_samples": s.test_samples,
                        **({"left": s.left} if s.left else {}),
                        **({"epsilon": s.metrics["epsilon"]} if "epsilon" in s.metrics else {}),
                    }
                    for s in self.sites.values()
                },
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
            refused_updates=dict(self.refused),
        )
        self.cond.notify_all()

    def tick(self) -> None:
        """Timeouts: a round with enough answers closes; finishing stops waiting."""
        with self.cond:
            now = self.clock()
            if (
                self.phase == TRAINING
                and now - self.opened_at >= self.timeout
                and len(self.answered) >= self.spec.minSites
            ):
                stragglers = sorted(
                    n for n in self._joined() if n not in self.answered | self.excluded
                )
                event(
                    self.log,
                    "round-timeout",
                    round=self.round,
                    stragglers=stragglers,
                    timeout_s=self.timeout,
                )
                self._close_round()
            elif self.phase == FINISHING and now - self.finishing_since >= self.timeout:
                missing = sorted(n for n in self._joined() if not self.sites[n].final_reported)
                event(self.log, "finishing-timeout", missing=missing, timeout_s=self.timeout)
                self._finish(completed=True, reason=None)

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
            site = self.sites.get(req.site)
            sig = [TensorSpec.from_proto(p) for p in req.model]
            reason, message = "", ""
            if req.study != self.name:
                reason, message = "wrong-study", f"this aggregator runs study {self.name!r}"
            elif site is None:
                reason = "unknown-site"
                message = f"site {req.site!r} is not listed in study {self.name!r}"
            elif not sig:
                reason, message = "model-mismatch", "the join names no model tensors"
            elif (problem := signature_problem(sig)) is not None:
                reason, message = "model-mismatch", f"the model cannot be sent: {problem}"
            elif self.reference is not None:
                diff = describe_mismatch(sig, self.reference)
                if diff is not None:
                    reason, message = "model-mismatch", diff
            if reason:
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
            site.joined = True
            site.left = None
            site.signature = sig
            site.train_samples = int(req.train_samples)
            site.test_samples = int(req.test_samples)
            event(
                self.log,
                "site-joined",
                site=site.name,
                again=again,
                train_samples=site.train_samples,
                test_samples=site.test_samples,
                trainer_version=req.trainer_version,
                joined=len(self._joined()),
            )
            self._advance()
            return pb.JoinResponse(
                accepted=True, planned_rounds=self.spec.rounds, completed_rounds=self.version or 0
            )

    def leave(self, req: pb.LeaveRequest) -> pb.LeaveReceipt:
        with self.cond:
            site = self.sites.get(req.site)
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
            if self.init_lease is not None and self.init_lease[0] == site.name:
                self.init_lease = None
            joined = self._joined()
            why = (
                f"site {site.name} left ({req.reason or 'no reason'}"
                + (f": {req.message}" if req.message else "")
                + f"); {len(joined)} joined, minSites is {self.spec.minSites}"
            )
            if self.phase == TRAINING and len(joined) < self.spec.minSites:
                self._finish(completed=False, reason=why)
            elif self.phase == WAITING:
                available = [s for s in self.sites.values() if s.left is None]
                if len(available) < self.spec.minSites:
                    self._finish(completed=False, reason=why)
            elif self.phase == FINISHING and not joined:
                self._finish(completed=True, reason=None)
            self._advance()
            return pb.LeaveReceipt(accepted=True)

    # ----------------------------------------------------------------- GetTask

    def get_task(
        self, req: pb.TaskRequest, is_active: Callable[[], bool] = lambda: True
    ) -> pb.TaskResponse:
        """A long poll: work at once if there is some, else WAIT after ``wait_seconds``."""
        wait = min(max(float(req.wait_seconds), 0.0), MAX_WAIT_SECONDS)
        deadline = self.clock() + wait
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
            round=self.round or 0,
            model_version=self.version or 0,
            message=f"state {self.phase}",
        )

    def _task_for(self, req: pb.TaskRequest) -> pb.TaskResponse | None:
        site = self.sites.get(req.site)
        if req.study != self.name or site is None:
            return Task(kind=Task.REJOIN, message=f"join study {self.name!r} first")
        if self.phase == DONE:
            site.fetched_done = True
            self.cond.notify_all()
            return Task(
                kind=Task.DONE,
                model_version=self.version or 0,
                message=self.ended_reason or "the study is complete",
            )
        if not site.joined:
            return Task(kind=Task.REJOIN, message="the aggregator does not know this site")
        if self.phase == WAITING:
            if self.model is None:
                now = self.clock()
                lease = self.init_lease
                if lease is None or lease[1] <= now:
                    self.init_lease = (site.name, now + self.timeout)
                    event(self.log, "init-lease", site=site.name, timeout_s=self.timeout)
                    return Task(kind=Task.INIT, round=0, model_version=0)
                if lease[0] == site.name:
                    return Task(kind=Task.INIT, round=0, model_version=0)
            return None
        if self.phase == TRAINING:
            assert self.round is not None
            if site.name in self.answered or site.name in self.excluded:
                return None
            return Task(
                kind=Task.TRAIN,
                round=self.round,
                model_version=self.round - 1,
                proximal_mu=self.spec.strategy.proximal_mu,
            )
        if self.phase == FINISHING:
            if site.final_reported:
                return None
            return Task(kind=Task.FINISH, round=0, model_version=self.version or 0)
        return None

    # ----------------------------------------------------------------- DownloadModel

    def model_for_download(self, req: pb.DownloadRequest) -> Weights:
        with self.cond:
            if req.study != self.name:
                raise DownloadRefused("invalid-argument", f"this aggregator runs {self.name!r}")
            if req.site not in self.sites:
                raise DownloadRefused("not-found", f"site {req.site!r} is not in the study")
            if self.model is None or self.version is None:
                raise DownloadRefused("failed-precondition", "there is no global model yet")
            if req.model_version != self.version:
                raise DownloadRefused(
                    "failed-precondition",
                    f"model version {req.model_version} is not available; the current "
                    f"global model is version {self.version}",
                )
            self.metrics.bytes_sent(req.site, model_bytes(signature(self.model)))
            return self.model  # never changed in place: rounds make new arrays

    def record_refused_call(
        self, reason: str, rpc: str, claimed: str, peer: str | None, detail: str
    ) -> None:
        """Counts and logs a call refused at the door (before any protocol check)."""
        with self.cond:
            self.refused_calls[reason] += 1
            self.metrics.call_refused(reason, rpc)
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
            return self._refuse(None, _Refusal("bad-stream", "the stream must start with a header"))
        h = first.header
        held = self._claim_reservation(h.site, h.update_id)
        try:
            return self._receive(h, first, stream, held)
        finally:
            if held is not None:
                held.release()

    def _receive(
        self,
        h: pb.UpdateHeader,
        first: pb.UpdateChunk,
        stream: Iterator[pb.UpdateChunk],
        held: _Reservation | None,
    ) -> pb.UpdateReceipt:
        try:
            with self.cond:
                expected, bound = self._check_header(h)
            size = model_bytes(expected)
            spool = self._spooled(size)
            # In memory, one update is staged at a time; spooled ones stream in side by side.
            # A reserved update has its room already.
            with contextlib.nullcontext() if held is not None else self._room(size).take(size):
                with self.cond:
                    self._check_still_open(h)
                    base = self.model if h.round > 0 else None
                received: Weights | SpooledWeights | None = self._stage(
                    h, first.ByteSize(), stream, expected, bound, spool
                )
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
        except _Refusal as r:
            return self._refuse(h, r)
        except WireError as e:
            return self._refuse(h, _Refusal(e.reason, str(e)))
        return pb.UpdateReceipt(accepted=True, message=f"round {h.round} update accepted")

    def _spooled(self, size: int) -> bool:
        return self.spool_dir is not None and size > self.spool_above_bytes

    def _room(self, size: int) -> ByteBudget:
        """Where an update of ``size`` bytes waits for room to arrive."""
        return self._spooling if self._spooled(size) else self._staging

    # ---------------------------------------------------------------- ReserveUpload

    def reserve(self, req: pb.UploadReservation, is_active: Callable[[], bool]) -> pb.UploadGrant:
        """Holds room for the update ``req.header`` announces, waiting for it up to
        ``req.wait_seconds`` (at most MAX_WAIT_SECONDS); "busy" if none came, or the reason
        the update would be refused now. The room is the update's until its stream ends, or
        for ``reservation_ttl`` seconds if no stream with its update id comes."""
        h = req.header
        try:
            with self.cond:
                joined_with = self._check_sender(h)
                self._check_still_open(h)
                expected = joined_with if self.model is None else signature(self.model)
        except _Refusal as r:
            return pb.UploadGrant(granted=False, reason=r.reason, message=str(r))
        if not h.update_id:
            return pb.UploadGrant(
                granted=False, reason="bad-stream", message="the header has no update_id"
            )
        size = model_bytes(expected)
        room = self._room(size)
        self._drop_reservations(h.site)  # the site's newer attempt replaces an older one
        deadline = time.monotonic() + min(max(req.wait_seconds, 0.0), MAX_WAIT_SECONDS)
        with self._reservations_lock:
            self.uploads_waiting += 1
        try:
            while not room.acquire(size, timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or not is_active():
                    return pb.UploadGrant(
                        granted=False, reason="busy", message=f"no room yet for {size} bytes"
                    )
                self._drop_reservations(None)  # give back what expired, then look again
        finally:
            with self._reservations_lock:
                self.uploads_waiting -= 1
        if not is_active():  # the site gave up while it waited: the room goes on at once
            room.release(size)
            return pb.UploadGrant(granted=False, reason="busy", message="the call ended")
        held = _Reservation(h.update_id, room, size, self.clock() + self.reservation_ttl)
        with self._reservations_lock:
            older = self._reservations.pop(h.site, None)
            self._reservations[h.site] = held
        if older is not None:
            older.release()
        return pb.UploadGrant(granted=True, message=f"room for {size} bytes")

    def _claim_reservation(self, site: str, update_id: str) -> _Reservation | None:
        """The room reserved for this update, now the stream's; a reservation the site
        made for another update is given back."""
        with self._reservations_lock:
            held = self._reservations.pop(site, None)
        if held is not None and held.update_id != update_id:
            held.release()
            return None
        return held

    def _drop_reservations(self, site: str | None) -> None:
        """Gives back the reservations that expired, and ``site``'s."""
        now = self.clock()
        with self._reservations_lock:
            gone = [k for k, r in self._reservations.items() if k == site or r.expires <= now]
            dropped = [self._reservations.pop(k) for k in gone]
        for r in dropped:
            r.release()

    def _refuse(self, h: pb.UpdateHeader | None, r: _Refusal) -> pb.UpdateReceipt:
        with self.cond:
            self.refused[r.reason] += 1
            self.round_refused[r.reason] += 1
            self.audit.refused(
                h.site if h is not None else None,
                int(h.round) if h is not None else None,
                r.reason,
                str(r),
            )
            self.metrics.update_refused(r.reason)
            excluded = (
                h is not None
                and r.reason in CONTENT_REFUSALS
                and self.phase == TRAINING
                and h.round == self.round
                and h.site in self.sites
                and self.sites[h.site].joined
                and h.site not in self.answered
            )
            if excluded:
                assert h is not None
                self.excluded.add(h.site)
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

    def _check_sender(self, h: pb.UpdateHeader) -> list[TensorSpec]:
        """The study and the site the header names: one of ours, and joined; returns the
        site's model signature (from its Join)."""
        if h.study != self.name:
            raise _Refusal(
                "wrong-study", f"this aggregator runs study {self.name!r}, not {h.study!r}"
            )
        site = self.sites.get(h.site)
        if site is None:
            raise _Refusal("unknown-site", f"site {h.site!r} is not in study {self.name!r}")
        if not site.joined or site.signature is None:
            raise _Refusal(
                "not-joined",
                f"site {h.site} has not joined since the aggregator started: Join first",
            )
        return site.signature

    def _check_header(self, h: pb.UpdateHeader) -> tuple[list[TensorSpec], int]:
        """The header checks, in the protocol's order; returns (signature, byte bound)."""
        joined_with = self._check_sender(h)
        init = self.model is None
        if init:
            if self.phase == DONE:
                raise _Refusal("stale-round", "the study has ended")
            if h.round != 0:
                raise _Refusal(
                    "future-round", f"round {h.round} has not opened: there is no initial model yet"
                )
        else:
            self._check_round(h.round)
            if h.site in self.answered:
                raise _Refusal(
                    "duplicate", f"site {h.site} already has an accepted update in round {h.round}"
                )
        if not h.update_id:
            raise _Refusal("bad-stream", "the header has no update_id")
        if h.update_id in self.seen_ids:
            raise _Refusal("replay", f"update_id {h.update_id} was seen before")
        self.seen_ids.add(h.update_id)
        base = 0 if init else h.round - 1
        if h.base_version != base:
            raise _Refusal(
                "wrong-base",
                f"round {h.round} trains from model version {base}, "
                f"the update says {h.base_version}",
            )
        if not init and h.num_samples == 0:
            raise _Refusal("no-samples", "num_samples is 0: an update needs training samples")
        expected = joined_with if init else signature(self.model or {})
        bound = model_bytes(expected) + STREAM_MARGIN_BYTES
        if h.total_bytes > bound:
            raise _Refusal(
                "too-large", f"the header announces {h.total_bytes} bytes; the bound is {bound}"
            )
        return list(expected), bound

    def _check_round(self, r: int) -> None:
        v = self.version or 0
        if self.phase == TRAINING and self.round is not None:
            if r < self.round:
                raise _Refusal("stale-round", f"round {r} is over; round {self.round} is open")
            if r > self.round:
                raise _Refusal(
                    "future-round", f"round {r} has not opened; round {self.round} is open"
                )
            return
        if r <= v:
            raise _Refusal("stale-round", f"round {r} is over ({v} rounds completed)")
        raise _Refusal("future-round", f"round {r} is not open (state {self.phase})")

    def _check_still_open(self, h: pb.UpdateHeader) -> None:
        """Re-checks what may have changed while the update waited or streamed."""
        site = self.sites[h.site]
        if not site.joined:
            raise _Refusal("not-joined", f"site {h.site} left the study")
        if h.round == 0:
            if self.model is not None:
                raise _Refusal("stale-round", "another site's initial model arrived first")
            return
        self._check_round(h.round)
        if h.site in self.answered:
            raise _Refusal(
                "duplicate", f"site {h.site} already has an accepted update in round {h.round}"
            )

    def _stage(
        self,
        h: pb.UpdateHeader,
        header_bytes: int,
        stream: Iterator[pb.UpdateChunk],
        expected: list[TensorSpec],
        bound: int,
        spool: bool,
    ) -> Weights | SpooledWeights:
        """The update as it arrived: in arrays, or (``spool``) in a file under ``spool_dir``."""
        if spool:
            assert self.spool_dir is not None
            try:
                asm: TensorAssembler = SpoolingAssembler(expected, self.spool_dir, max_bytes=bound)
            except OSError as e:
                raise self._disk_failure(f"spooling an update in {self.spool_dir}", e) from None
        else:
            asm = TensorAssembler(expected, max_bytes=bound, check_finite=False)
        seen = header_bytes
        try:
            for msg in stream:
                seen += msg.ByteSize()
                if seen > bound:
                    raise _Refusal("too-large", f"the stream passed its bound of {bound} bytes")
                if msg.WhichOneof("part") != "tensor":
                    raise _Refusal("bad-stream", "a second header inside the stream")
                asm.add(msg.tensor)
            received = asm.finish_spooled() if isinstance(asm, SpoolingAssembler) else asm.finish()
        except OSError as e:
            assert isinstance(asm, SpoolingAssembler)
            asm.spool.close()
            raise self._disk_failure(f"spooling an update in {self.spool_dir}", e) from None
        except BaseException:
            if isinstance(asm, SpoolingAssembler):
                asm.spool.close()
            raise
        with self.cond:
            self.bytes_received += seen
            self.metrics.bytes_received(h.site, seen)
        tensors = len(received.specs) if isinstance(received, SpooledWeights) else len(received)
        if h.tensor_count != tensors or h.total_bytes != asm.received_bytes:
            if isinstance(received, SpooledWeights):
                received.close()
            raise _Refusal(
                "bad-stream",
                f"the header announced {h.tensor_count} tensors and {h.total_bytes} bytes; "
                f"the stream held {tensors} tensors and {asm.received_bytes} bytes",
            )
        return received

    def _clip_scale(self, h: pb.UpdateHeader, norm: float) -> float:
        """How far an update's change is scaled down: ``strategy.maxUpdateNorm`` clips it (or
        refuses it), then server-side DP clips it to its ``clipNorm``."""
        scale = 1.0
        bound = self.spec.strategy.maxUpdateNorm
        if bound is not None and norm > bound:
            if self.spec.strategy.normPolicy == "refuse":
                raise _Refusal(
                    "norm-exceeded", f"the update's norm {norm:.6g} is above the bound {bound:.6g}"
                )
            event(self.log, "update-clipped", site=h.site, round=h.round, norm=norm, bound=bound)
            scale = bound / norm
        dp = self.strategy.dp
        if dp is not None and norm * scale > dp.clip:
            scale = dp.clip / norm
        return scale

    def _fold(
        self, h: pb.UpdateHeader, received: Weights | SpooledWeights, found: Examined
    ) -> None:
        """Takes an accepted update in: the initial model, or one more in the round's mean.
        The caller then moves the state machine on (``_advance``). ``found``: what
        ``examine`` found in the update as it arrived (its digest and the norm of its change)."""
        site = self.sites[h.site]
        if h.round == 0:
            weights = received.load() if isinstance(received, SpooledWeights) else received
            self.accepted_total += 1
            self.metrics.update_accepted(site.name, int(h.round))
            self._audit_write(
                "initial model",
                lambda: self.audit.initial_model(
                    site.name,
                    found.digest,
                    tensors=len(weights),
                    parameters=sum(int(a.size) for a in weights.values()),
                ),
            )
            self.model = weights
            self._digested, self._digest = weights, found.digest
            self.version = 0
            self.reference = signature(weights)
            self.init_lease = None
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
        scale = self._clip_scale(h, found.norm)
        self.accepted_total += 1
        self.metrics.update_accepted(site.name, int(h.round))
        self.audit.accepted(site.name, int(h.num_samples), found.digest)
        self.strategy.accept(Update(received, self.model, scale, owned=True), int(h.num_samples))
        self.answered.add(site.name)
        site.rounds_participated += 1
        site.last_round = h.round
        line = self._line(h.round, site)
        line.train_samples = int(h.num_samples)
        line.train_loss = finite_or_none(h.train_loss)
        event(
            self.log,
            "update-accepted",
            site=site.name,
            round=h.round,
            num_samples=int(h.num_samples),
            train_loss=line.train_loss,
            answered=len(self.answered),
            joined=len(self._joined()),
        )

    def _line(self, r: int, site: SiteRecord) -> RoundLine:
        lines = self.history.setdefault(r, {})
        if site.name not in lines:
            lines[site.name] = RoundLine(test_samples=site.test_samples)
        return lines[site.name]

    # ----------------------------------------------------------------- Report

    def report(self, req: pb.ReportRequest) -> pb.ReportReceipt:
        with self.cond:
            site = self.sites.get(req.site)
            reason, message = "", ""
            if req.study != self.name:
                reason, message = "wrong-study", f"this aggregator runs study {self.name!r}"
            elif site is None:
                reason, message = "unknown-site", f"site {req.site!r} is not in the study"
            elif self.version is None or req.model_version > self.version:
                reason = "future-version"
                message = f"model version {req.model_version} does not exist yet"
            elif req.kind == pb.ReportRequest.FINAL and (
                self.phase not in (FINISHING, DONE) or req.model_version != self.version
            ):
                reason = "not-final"
                message = f"model version {req.model_version} is not the study's final model"
            elif req.kind not in (pb.ReportRequest.EVALUATION, pb.ReportRequest.FINAL):
                reason, message = "bad-kind", "a report is EVALUATION or FINAL"
            if reason:
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
            v = int(req.model_version)
            line = self._line(v, site)
            if req.test_samples:
                line.test_samples = int(req.test_samples)
            line.metrics = clean_metrics(req.metrics)
            if site.metrics_version is None or v >= site.metrics_version:
                site.metrics = dict(line.metrics)
                site.metrics_version = v
            final = req.kind == pb.ReportRequest.FINAL
            self.metrics.report(site.name, "final" if final else "evaluation")
            self.metrics.site_metrics(site.name, site.metrics)
            self.metrics.global_metrics(self.latest_global()[1])
            event(
                self.log,
                "report",
                site=site.name,
                kind="final" if final else "evaluation",
                model_version=v,
                metrics=line.metrics,
            )
            if final:
                site.local_only = clean_metrics(req.local_only_metrics)
                site.final_reported = True
                if self.phase == DONE:
                    self._write_outputs(final=True)
                self._checkpoint_state()
                self._advance()
            return pb.ReportReceipt(accepted=True)

    # ----------------------------------------------------------------- status & exit

    def latest_global(self) -> tuple[int | None, Metrics, dict[str, float]]:
        """(version, weighted, site mean) for the newest model version with evaluations."""
        for v in sorted(self.history, reverse=True):
            per_site = {
                s: (line.test_samples, line.metrics)
                for s, line in self.history[v].items()
                if line.metrics
            }
            if per_site:
                weighted, mean = combine_metrics(per_site)
                return v, dict(weighted), mean
        return None, {}, {}

    def status(self) -> dict[str, Any]:
        """A JSON-able picture of the study, for ``/status``."""
        with self.cond:
            gv, weighted, _ = self.latest_global()
            return {
                "study": self.name,
                "state": self.phase,
                "round": self.round if self.round is not None else (self.version or 0),
                "completed_rounds": self.version or 0,
                "planned_rounds": self.spec.rounds,
                "min_sites": self.spec.minSites,
                "strategy": self.strategy.name,
                "joined": self._joined(),
                "sites": {
                    n: {
                        "joined": s.joined,
                        "answered": s.name in self.answered,
                        "last_round": s.last_round,
                        "rounds_participated": s.rounds_participated,
                        "train_samples": s.train_samples,
                        "test_samples": s.test_samples,
                        "metrics": s.metrics,
                        "metrics_version": s.metrics_version,
                        "local_only": s.local_only,
                        "left": s.left,
                    }
                    for n, s in self.sites.items()
                },
                "global": weighted,
                "global_version": gv,
                "refused_updates": dict(sorted(self.refused.items())),
                "refused_calls": dict(sorted(self.refused_calls.items())),
                "completed": self.completed if self.phase == DONE else None,
                "ended_reason": self.ended_reason,
                **({"server_privacy": self.server_privacy()} if self.strategy.dp else {}),
            }

    def prometheus(self) -> str:
        """The metrics in the Prometheus text format (``/metrics``)."""
        with self.cond:
            return self.metrics.text()

    def exit_due(self, linger: float) -> bool:
        """Done, and every joined site has been told, or ``linger`` seconds passed."""
        with self.cond:
            if self.phase != DONE or self.done_at is None:
                return False
            joined = self._joined()
            if joined and all(self.sites[n].fetched_done for n in joined):
                return True
            return self.clock() - self.done_at >= linger

    def stop(self) -> None:
        """Wakes every long poll so the server can stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
