"""The round state machine alone: every transition, the timeouts, ``minSites`` and finishing,
with the time passed in by hand (no gRPC, no threads, no clock)."""

from __future__ import annotations

import pytest
from fedstudy_aggregator.rounds.machine import (
    DONE,
    FINISHING,
    TRAINING,
    UPDATE,
    WAITING,
    CloseRound,
    EnterFinishing,
    Finish,
    NextStage,
    OpenRound,
    Roster,
    RoundMachine,
    Step,
    Work,
)


def roster(*joined: str, reported: tuple[str, ...] = (), available: int | None = None) -> Roster:
    return Roster(
        joined=frozenset(joined),
        reported=frozenset(reported),
        available=len(joined) if available is None else available,
    )


def machine(
    rounds: int = 2, min_sites: int = 2, timeout: float = 10.0, **kw: object
) -> RoundMachine:
    return RoundMachine(rounds=rounds, min_sites=min_sites, timeout=timeout, **kw)  # type: ignore[arg-type]


def take(m: RoundMachine, step: Step | None, now: float = 0.0) -> None:
    """Takes a step as the coordinator does."""
    assert step is not None
    if isinstance(step, OpenRound):
        m.open_round(step.round, now)
    elif isinstance(step, NextStage):
        m.next_stage(now)
    elif isinstance(step, CloseRound):
        m.close_round(now)
    elif isinstance(step, EnterFinishing):
        m.enter_finishing(now)
    else:
        m.finish()


def started(m: RoundMachine, *sites: str) -> RoundMachine:
    """``m`` with the initial model in and round 1 open for ``sites``."""
    m.initial_model()
    take(m, m.next_step(roster(*sites)))
    return m


# ------------------------------------------------------------------ waiting


def test_without_an_initial_model_the_machine_waits_whoever_joined() -> None:
    m = machine()
    assert m.next_step(roster("a", "b", "c")) is None
    assert m.phase == WAITING
    assert m.next_round() == 0


def test_the_first_site_to_ask_gets_the_lease_for_the_initial_model() -> None:
    m = machine(timeout=10.0)
    assert m.work_for("a", joined=True, reported=False, now=0.0) == Work("init")
    assert m.work_for("b", joined=True, reported=False, now=1.0) is None
    assert m.work_for("a", joined=True, reported=False, now=2.0) == Work("init")
    assert m.init_lease == ("a", 10.0)


def test_an_expired_lease_goes_to_the_next_site_that_asks() -> None:
    m = machine(timeout=10.0)
    m.work_for("a", joined=True, reported=False, now=0.0)
    assert m.work_for("b", joined=True, reported=False, now=10.0) == Work("init")
    assert m.init_lease == ("b", 20.0)
    assert m.work_for("a", joined=True, reported=False, now=11.0) is None


def test_a_lease_holder_that_leaves_frees_the_lease() -> None:
    m = machine()
    m.work_for("a", joined=True, reported=False, now=0.0)
    m.release_lease("b")
    assert m.init_lease is not None
    m.release_lease("a")
    assert m.init_lease is None
    assert m.work_for("b", joined=True, reported=False, now=1.0) == Work("init")


def test_the_initial_model_ends_the_lease_and_sets_version_0() -> None:
    m = machine()
    m.work_for("a", joined=True, reported=False, now=0.0)
    m.initial_model()
    assert m.version == 0
    assert m.init_lease is None
    assert m.work_for("b", joined=True, reported=False, now=1.0) is None


def test_a_round_opens_only_once_min_sites_have_joined() -> None:
    m = machine(min_sites=3)
    m.initial_model()
    assert m.next_step(roster("a", "b")) is None
    assert m.next_step(roster("a", "b", "c")) == OpenRound(1)


def test_a_site_not_joined_is_told_to_rejoin_and_one_done_is_told_so() -> None:
    m = machine()
    assert m.work_for("a", joined=False, reported=False, now=0.0) == Work("rejoin")
    m.finish()
    assert m.work_for("a", joined=False, reported=False, now=0.0) == Work("done")


# ------------------------------------------------------------------ training


def test_opening_a_round_gives_every_joined_site_its_training_work() -> None:
    m = started(machine(), "a", "b")
    assert m.phase == TRAINING
    assert m.round == 1
    assert m.stage == UPDATE
    want = Work("stage", round=1, model_version=0, stage=UPDATE)
    assert m.work_for("a", joined=True, reported=False, now=0.0) == want
    assert m.work_for("b", joined=True, reported=False, now=0.0) == want


def test_a_round_closes_when_every_joined_site_has_answered() -> None:
    m = started(machine(), "a", "b")
    m.answer("a")
    assert m.next_step(roster("a", "b")) is None
    assert m.work_for("a", joined=True, reported=False, now=0.0) is None
    m.answer("b")
    assert m.next_step(roster("a", "b")) == CloseRound(1)


def test_closing_a_round_makes_its_model_the_next_version_and_reports_who_took_part() -> None:
    m = started(machine(rounds=3), "a", "b")
    m.answer("a")
    m.exclude("b")
    closed = m.close_round(now=4.5)
    assert (closed.round, closed.duration_s) == (1, 4.5)
    assert closed.answered == {"a"}
    assert closed.excluded == {"b"}
    assert (m.phase, m.version, m.round) == (WAITING, 1, None)
    assert not m.answered
    assert not m.excluded
    assert m.next_step(roster("a", "b")) == OpenRound(2)


def test_an_excluded_site_is_not_waited_for_nor_asked_again() -> None:
    m = started(machine(), "a", "b")
    m.answer("a")
    m.exclude("b")
    assert m.work_for("b", joined=True, reported=False, now=0.0) is None
    assert m.next_step(roster("a", "b")) == CloseRound(1)


def test_a_round_where_every_site_was_excluded_does_not_close_by_itself() -> None:
    m = started(machine(), "a", "b")
    m.exclude("a")
    m.exclude("b")
    assert m.next_step(roster("a", "b")) is None


def test_a_site_that_joins_mid_round_is_waited_for_too() -> None:
    m = started(machine(), "a", "b")
    m.answer("a")
    m.answer("b")
    assert m.next_step(roster("a", "b", "c")) is None
    assert m.work_for("c", joined=True, reported=False, now=0.0) is not None


def test_a_site_that_leaves_mid_round_is_no_longer_waited_for() -> None:
    m = started(machine(min_sites=1), "a", "b")
    m.answer("a")
    assert m.next_step(roster("a")) == CloseRound(1)


# ------------------------------------------------------------------ timeouts


def test_the_timeout_closes_a_round_with_min_sites_answers_and_names_the_stragglers() -> None:
    m = started(machine(min_sites=2, timeout=10.0), "a", "b", "c")
    m.answer("a")
    m.answer("b")
    assert m.timeout_step(roster("a", "b", "c"), now=9.9) is None
    step = m.timeout_step(roster("a", "b", "c"), now=10.0)
    assert step == CloseRound(1, timed_out=True, stragglers=("c",))


def test_the_timeout_does_not_close_a_round_below_min_sites() -> None:
    m = started(machine(min_sites=2, timeout=10.0), "a", "b", "c")
    m.answer("a")
    assert m.timeout_step(roster("a", "b", "c"), now=1000.0) is None


def test_the_timeout_counts_from_the_round_opening() -> None:
    m = machine(min_sites=1, timeout=10.0)
    m.initial_model()
    take(m, m.next_step(roster("a", "b")), now=100.0)
    m.answer("a")
    assert m.timeout_step(roster("a", "b"), now=109.0) is None
    assert m.timeout_step(roster("a", "b"), now=110.0) == CloseRound(
        1, timed_out=True, stragglers=("b",)
    )


def test_no_timeout_applies_while_waiting() -> None:
    m = machine()
    m.initial_model()
    assert m.timeout_step(roster("a"), now=1e9) is None


# ------------------------------------------------------------------ finishing


def run_all_rounds(m: RoundMachine, *sites: str) -> None:
    for r in range(1, m.rounds + 1):
        take(m, m.next_step(roster(*sites)), now=float(r))
        for s in sites:
            m.answer(s)
        assert m.next_step(roster(*sites)) == CloseRound(r)
        take(m, CloseRound(r), now=float(r))


def test_after_the_last_round_the_machine_finishes_and_asks_for_final_reports() -> None:
    m = machine(rounds=2)
    m.initial_model()
    run_all_rounds(m, "a", "b")
    assert (m.phase, m.version) == (FINISHING, 2)
    assert m.next_round() is None
    assert m.work_for("a", joined=True, reported=False, now=3.0) == Work("finish", model_version=2)
    assert m.work_for("a", joined=True, reported=True, now=3.0) is None


def test_finishing_ends_when_every_joined_site_has_reported() -> None:
    m = machine(rounds=1)
    m.initial_model()
    run_all_rounds(m, "a", "b")
    assert m.next_step(roster("a", "b", reported=("a",))) is None
    assert m.next_step(roster("a", "b", reported=("a", "b"))) == Finish(completed=True)
    m.finish()
    assert m.phase == DONE
    assert m.next_step(roster("a", "b", reported=("a", "b"))) is None


def test_finishing_stops_waiting_at_the_timeout_and_names_who_did_not_report() -> None:
    m = machine(rounds=1, timeout=5.0)
    m.initial_model()
    run_all_rounds(m, "a", "b")  # the round closed at t=1
    assert m.timeout_step(roster("a", "b", reported=("a",)), now=5.9) is None
    step = m.timeout_step(roster("a", "b", reported=("a",)), now=6.0)
    assert step == Finish(completed=True, timed_out=True, missing=("b",))


def test_waiting_with_every_round_done_enters_finishing() -> None:
    m = machine(rounds=2)
    m.version = 2
    assert m.next_step(roster("a")) == EnterFinishing()
    m.enter_finishing(now=3.0)
    assert (m.phase, m.finishing_since) == (FINISHING, 3.0)


# ------------------------------------------------------------------ leaving


def test_a_round_that_can_no_longer_reach_min_sites_ends_the_study_incomplete() -> None:
    m = started(machine(min_sites=2), "a", "b")
    assert m.after_leave(roster("a", "b"), "b left") is None
    assert m.after_leave(roster("a"), "b left") == Finish(completed=False, reason="b left")


def test_waiting_ends_the_study_when_too_few_sites_have_not_left() -> None:
    m = machine(min_sites=2)
    assert m.after_leave(roster("a", available=2), "c left") is None
    assert m.after_leave(roster("a", available=1), "b left") == Finish(
        completed=False, reason="b left"
    )


def test_finishing_with_no_site_left_ends_the_study_complete() -> None:
    m = machine(rounds=1)
    m.initial_model()
    run_all_rounds(m, "a", "b")
    assert m.after_leave(roster("a"), "b left") is None
    assert m.after_leave(roster(), "a left") == Finish(completed=True)


def test_nothing_moves_once_done() -> None:
    m = machine()
    m.finish()
    assert m.next_step(roster("a", "b")) is None
    assert m.timeout_step(roster("a", "b"), now=1e9) is None


# ------------------------------------------------------------------ stages


def test_a_round_of_several_stages_waits_in_each_for_the_sites_that_answered_the_last() -> None:
    m = started(machine(min_sites=2, stages=("keys", UPDATE)), "a", "b", "c")
    assert m.stage == "keys"
    assert m.work_for("a", joined=True, reported=False, now=0.0) == Work(
        "stage", round=1, model_version=0, stage="keys"
    )
    m.answer("a")
    m.answer("b")
    assert m.next_step(roster("a", "b", "c")) is None
    step = m.timeout_step(roster("a", "b", "c"), now=10.0)
    assert step == NextStage(1, UPDATE)
    before = m.position()
    take(m, step, now=10.0)
    assert m.position() != before
    assert m.stage == UPDATE
    assert m.work_for("c", joined=True, reported=False, now=10.0) is None  # missed "keys"
    m.answer("a")
    assert m.next_step(roster("a", "b", "c")) is None
    m.answer("b")
    assert m.next_step(roster("a", "b", "c")) == CloseRound(1)
    closed = m.close_round(now=12.0)
    assert closed.duration_s == 12.0  # from the round's opening, not the stage's
    assert m.stage is None


def test_each_stage_has_its_own_timeout() -> None:
    m = started(machine(min_sites=1, timeout=10.0, stages=("keys", UPDATE)), "a", "b", "c")
    m.answer("a")
    m.answer("b")
    take(m, m.timeout_step(roster("a", "b", "c"), now=10.0), now=10.0)
    m.answer("a")
    assert m.next_step(roster("a", "b", "c")) is None  # b answered "keys": it is waited for
    assert m.timeout_step(roster("a", "b", "c"), now=19.0) is None
    assert m.timeout_step(roster("a", "b", "c"), now=20.0) == CloseRound(
        1, timed_out=True, stragglers=("b",)
    )


def test_a_machine_needs_a_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        RoundMachine(rounds=1, min_sites=1, timeout=1.0, stages=())


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize(
    ("phase", "version", "want"),
    [
        ("waiting", None, WAITING),
        ("waiting", 1, WAITING),
        ("training", 1, WAITING),  # a round in flight is run again
        ("waiting", 3, FINISHING),
        ("finishing", 3, FINISHING),
        ("done", 2, DONE),
    ],
)
def test_resume_takes_up_the_checkpointed_position(
    phase: str, version: int | None, want: str
) -> None:
    m = machine(rounds=3)
    m.resume(phase, version, now=7.0)
    assert (m.phase, m.version) == (want, version)
    if want == FINISHING:
        assert m.finishing_since == 7.0
