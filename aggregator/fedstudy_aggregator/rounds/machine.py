"""The round state machine: phases and transitions, and nothing else.

Phases: ``waiting`` (no initial model yet, or fewer than ``minSites`` joined), ``training``
(round r open), ``finishing`` (every round done; waiting for the sites' final reports) and
``done``.

A round is a sequence of stages. A plain round has one, ``update``: every joined site trains
and sends its update. A protocol that needs more exchanges per round (keys before the
updates, shares after them) names more stages; the sites that answered one stage are the ones
the next stage waits for. A stage is complete when every site it waits for has answered or
been excluded (its answer was refused for its content); at the round's timeout it is complete
with at least ``minSites`` answers, and the sites that did not answer are stragglers, dropped
from the round, not from the study.

The machine does no I/O, takes no lock, starts no thread and reads no clock: it is told the
facts (a ``Roster`` of the sites, the time) and answers with the next ``Step``. Its owner
carries the step's effects out (aggregating, the audit trail, the checkpoint) and then takes
the step with the method of the same name (``open_round``, ``next_stage``, ``close_round``,
``enter_finishing``, ``finish``). ``work_for`` says what a site asking for work should do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WAITING = "waiting"
TRAINING = "training"
FINISHING = "finishing"
DONE = "done"

UPDATE = "update"  # the stage in which sites train and send their updates


@dataclass(frozen=True)
class Roster:
    """What the machine is told about the sites: who is joined, who has sent its final
    report, and how many have not left the study."""

    joined: frozenset[str]
    reported: frozenset[str] = frozenset()
    available: int = 0


@dataclass(frozen=True)
class OpenRound:
    round: int


@dataclass(frozen=True)
class NextStage:
    round: int
    stage: str


@dataclass(frozen=True)
class CloseRound:
    round: int
    timed_out: bool = False
    stragglers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnterFinishing:
    pass


@dataclass(frozen=True)
class Finish:
    completed: bool
    reason: str | None = None
    timed_out: bool = False
    missing: tuple[str, ...] = ()


Step = OpenRound | NextStage | CloseRound | EnterFinishing | Finish


@dataclass(frozen=True)
class Work:
    """What a site asking for work is to do: ``init`` (send the initial model), ``stage``
    (answer the open stage of ``round``), ``finish`` (evaluate the final model and report),
    ``done`` (the study is over), ``rejoin`` (the site is not joined)."""

    kind: str
    round: int = 0
    model_version: int = 0
    stage: str = ""


@dataclass(frozen=True)
class ClosedRound:
    """What ``close_round`` hands back: the round, how long it ran, who took part."""

    round: int
    duration_s: float
    answered: frozenset[str]
    excluded: frozenset[str]


@dataclass
class RoundMachine:
    """The study's position: phase, open round and stage, completed model version, and the
    sites that answered the open stage."""

    rounds: int
    min_sites: int
    timeout: float
    stages: tuple[str, ...] = (UPDATE,)
    phase: str = WAITING
    round: int | None = None
    stage_index: int = 0
    # The completed model version: 0 once the initial model is in, r after round r closes;
    # None before the initial model.
    version: int | None = None
    opened_at: float = 0.0
    stage_opened_at: float = 0.0
    finishing_since: float = 0.0
    answered: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)
    # The sites the open stage waits for (None: every joined site).
    expected: frozenset[str] | None = None
    # Which site may send the initial model, and until when.
    init_lease: tuple[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a round needs at least one stage")

    # ------------------------------------------------------------------ questions

    @property
    def stage(self) -> str | None:
        return self.stages[self.stage_index] if self.phase == TRAINING else None

    def position(self) -> tuple[str, int | None, int, int | None]:
        """What a long-polling site's work depends on: phase, round, stage and version."""
        return self.phase, self.round, self.stage_index, self.version

    def next_round(self) -> int | None:
        """The round to open next (0: the initial model), or None once every round is done."""
        if self.phase in (FINISHING, DONE):
            return None
        return (self.version or 0) + 1 if self.version is not None else 0

    def waits_for(self, site: str) -> bool:
        """Whether the open stage still waits for ``site``'s answer (``site`` joined)."""
        if self.phase != TRAINING or site in self.answered or site in self.excluded:
            return False
        return self.expected is None or site in self.expected

    def _waiting_on(self, joined: frozenset[str]) -> list[str]:
        return sorted(n for n in joined if self.waits_for(n))

    def _stage_complete(self, joined: frozenset[str]) -> bool:
        return bool(self.answered) and not self._waiting_on(joined)

    def _stage_done_step(self, timed_out: bool, stragglers: tuple[str, ...]) -> Step:
        assert self.round is not None
        if self.stage_index + 1 < len(self.stages):
            return NextStage(self.round, self.stages[self.stage_index + 1])
        return CloseRound(self.round, timed_out=timed_out, stragglers=stragglers)

    def next_step(self, roster: Roster) -> Step | None:
        """The step the facts call for now, or None when the machine stays where it is."""
        if self.phase == DONE or self.version is None:
            return None
        if self.phase == WAITING:
            if self.version >= self.rounds:
                return EnterFinishing()
            if len(roster.joined) >= self.min_sites:
                return OpenRound(self.version + 1)
            return None
        if self.phase == TRAINING:
            if self._stage_complete(roster.joined):
                return self._stage_done_step(timed_out=False, stragglers=())
            return None
        # FINISHING
        reported = roster.joined & roster.reported
        if reported and reported == roster.joined:
            return Finish(completed=True)
        return None

    def timeout_step(self, roster: Roster, now: float) -> Step | None:
        """The step the time calls for: a stage past the timeout with at least ``minSites``
        answers is complete; finishing stops waiting for final reports."""
        if (
            self.phase == TRAINING
            and now - self.stage_opened_at >= self.timeout
            and len(self.answered) >= self.min_sites
        ):
            return self._stage_done_step(True, tuple(self._waiting_on(roster.joined)))
        if self.phase == FINISHING and now - self.finishing_since >= self.timeout:
            missing = tuple(sorted(roster.joined - roster.reported))
            return Finish(completed=True, timed_out=True, missing=missing)
        return None

    def after_leave(self, roster: Roster, why: str) -> Step | None:
        """The step a site's leaving calls for: a round that can no longer reach
        ``minSites`` ends the study, incomplete; finishing with no site left ends it."""
        if self.phase == TRAINING and len(roster.joined) < self.min_sites:
            return Finish(completed=False, reason=why)
        if self.phase == WAITING and roster.available < self.min_sites:
            return Finish(completed=False, reason=why)
        if self.phase == FINISHING and not roster.joined:
            return Finish(completed=True)
        return None

    def work_for(self, site: str, joined: bool, reported: bool, now: float) -> Work | None:
        """What ``site`` (one of the study's sites; ``joined``, and whether it has sent its
        final report) is to do now; None: nothing yet. The first site to ask before there
        is an initial model is given the lease to send it, for ``timeout`` seconds."""
        if self.phase == DONE:
            return Work("done", model_version=self.version or 0)
        if not joined:
            return Work("rejoin")
        if self.phase == WAITING:
            if self.version is not None:
                return None
            lease = self.init_lease
            if lease is None or lease[1] <= now:
                self.init_lease = (site, now + self.timeout)
                return Work("init")
            return Work("init") if lease[0] == site else None
        if self.phase == TRAINING:
            assert self.round is not None
            if not self.waits_for(site):
                return None
            stage = self.stages[self.stage_index]
            return Work("stage", round=self.round, model_version=self.round - 1, stage=stage)
        # FINISHING
        if reported:
            return None
        return Work("finish", model_version=self.version or 0)

    # ------------------------------------------------------------------ answers

    def answer(self, site: str) -> None:
        """``site``'s answer to the open stage was accepted."""
        self.answered.add(site)

    def exclude(self, site: str) -> None:
        """``site``'s answer to the open stage was refused for its content: the stage does
        not wait for it, nor ask it again."""
        self.excluded.add(site)

    def initial_model(self) -> None:
        """The initial model is in: model version 0."""
        self.version = 0
        self.init_lease = None

    def release_lease(self, site: str) -> None:
        """``site`` left: if it held the lease for the initial model, the next site may."""
        if self.init_lease is not None and self.init_lease[0] == site:
            self.init_lease = None

    # ------------------------------------------------------------------ steps

    def open_round(self, r: int, now: float) -> None:
        self.phase = TRAINING
        self.round = r
        self.stage_index = 0
        self.opened_at = self.stage_opened_at = now
        self.answered = set()
        self.excluded = set()
        self.expected = None

    def next_stage(self, now: float) -> None:
        """The open stage is complete: the next one waits for the sites that answered it."""
        self.expected = frozenset(self.answered)
        self.stage_index += 1
        self.stage_opened_at = now
        self.answered = set()
        self.excluded = set()

    def close_round(self, now: float) -> ClosedRound:
        """The last stage is complete: the round's model becomes version ``round``."""
        assert self.round is not None
        r = self.round
        closed = ClosedRound(
            r, now - self.opened_at, frozenset(self.answered), frozenset(self.excluded)
        )
        self.version = r
        self.phase = WAITING if r < self.rounds else FINISHING
        if self.phase == FINISHING:
            self.finishing_since = now
        self.round = None
        self.stage_index = 0
        self.answered = set()
        self.excluded = set()
        self.expected = None
        return closed

    def enter_finishing(self, now: float) -> None:
        self.phase = FINISHING
        self.finishing_since = now
        self.round = None

    def finish(self) -> None:
        self.phase = DONE
        self.round = None

    def resume(self, phase: str, version: int | None, now: float) -> None:
        """Takes up a checkpointed position: ``done`` stays done; every round completed goes
        on to finishing; otherwise waiting, to open the next round."""
        self.version = version
        if phase == DONE:
            self.phase = DONE
        elif version is not None and version >= self.rounds:
            self.enter_finishing(now)
