"""The pure status logic: phases, conditions, transition times, events."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fedstudy_operator import status
from fedstudy_operator.status import AggregatorReport, Condition, Observation

T0 = dt.datetime(2027, 1, 1, 12, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)


def report(state: str = "training", done: int = 2, joined: int = 2) -> AggregatorReport:
    return AggregatorReport(
        state=state,
        completed_rounds=done,
        planned_rounds=5,
        joined=tuple(f"s{i}" for i in range(joined)),
    )


def obs(**kw: Any) -> Observation:
    base: dict[str, Any] = {
        "role": "standalone",
        "planned_rounds": 5,
        "total_sites": 2,
        "trainers": {"s0": "Running", "s1": "Running"},
        "aggregator_ready": True,
        "report": report(),
    }
    return Observation(**{**base, **kw})


def conds(conditions: list[Condition]) -> dict[str, tuple[bool | None, str]]:
    return {c.type: (c.status, c.reason) for c in conditions}


def test_training() -> None:
    phase, c, display = status.compute(obs())
    assert phase == "Running"
    assert conds(c) == {
        "Ready": (True, "AggregatorReady"),
        "Progressing": (True, "Training"),
        "Succeeded": (False, "InProgress"),
        "Failed": (False, "InProgress"),
        "Blocked": (False, "NoIRBExpiry"),
    }
    assert display["round"] == "2/5"
    assert display["sites"] == "2/2"
    assert display["epsilon"] == ""


@pytest.mark.parametrize(
    ("kw", "phase", "ready", "progressing"),
    [
        ({"aggregator_ready": False, "report": None}, "Pending", False, "Starting"),
        ({"report": report("waiting", 0, 1)}, "Running", True, "WaitingForSites"),
        ({"report": None}, "Running", True, "AggregatorUnreachable"),
        ({"report": report("finishing", 5)}, "Running", True, "Finishing"),
    ],
)
def test_running_states(kw: dict[str, Any], phase: str, ready: bool, progressing: str) -> None:
    got_phase, c, _ = status.compute(obs(**kw))
    assert got_phase == phase
    assert conds(c)["Ready"][0] is ready
    assert conds(c)["Progressing"][1] == progressing


def test_success_needs_every_trainer_and_the_aggregator() -> None:
    done = {"s0": "Succeeded", "s1": "Succeeded"}
    assert status.compute(obs(trainers=done, report=report("finishing", 5)))[0] == "Running"
    assert status.compute(obs(trainers={"s0": "Succeeded", "s1": "Running"}))[0] == "Running"
    phase, c, _ = status.compute(obs(trainers=done, report=report("done", 5)))
    assert phase == "Succeeded"
    assert conds(c)["Succeeded"] == (True, "StudyCompleted")
    # The aggregator's last answer (kept in the status) counts when it cannot be reached.
    phase, _, display = status.compute(
        obs(trainers=done, report=None, last_report=report("done", 5))
    )
    assert phase == "Succeeded"
    assert display["round"] == "5/5"


def test_a_study_the_aggregator_ended_early_has_failed() -> None:
    r = AggregatorReport.from_json(
        {
            "state": "done",
            "completed_rounds": 2,
            "planned_rounds": 5,
            "joined": [],
            "completed": False,
            "ended_reason": "site s1 left (crash); 1 joined, minSites is 2",
        }
    )
    done = {"s0": "Succeeded", "s1": "Succeeded"}
    phase, c, _ = status.compute(obs(trainers=done, report=r))
    assert phase == "Failed"
    assert conds(c)["Failed"] == (True, "StudyEndedEarly")
    assert "minSites is 2" in next(x.message for x in c if x.type == "Failed")


def test_a_failed_trainer_fails_the_study() -> None:
    phase, c, display = status.compute(obs(trainers={"s0": "Failed", "s1": "Running"}))
    assert phase == "Failed"
    assert conds(c)["Failed"] == (True, "TrainerFailed")
    assert "s0" in next(x.message for x in c if x.type == "Failed")
    assert display["trainers"] == {"s0": "Failed", "s1": "Running"}


def test_expired_irb_blocks() -> None:
    msg = "IRB approval of protocol P-1 expired on 2026-12-31"
    phase, c, _ = status.compute(obs(irb_problem=msg))
    assert phase == "Blocked"
    assert conds(c)["Blocked"] == (True, "IRBApprovalExpired")
    assert conds(c)["Ready"] == (False, "IRBApprovalExpired")
    assert next(x.message for x in c if x.type == "Blocked") == msg


def test_roles() -> None:
    phase, _, display = status.compute(
        obs(role="site", trainers={"s1": "Succeeded"}, report=None, aggregator_ready=False)
    )
    assert phase == "Succeeded"
    assert display["sites"] == "?/2"
    assert display["round"] == "?/5"
    assert status.compute(obs(role="coordinator", trainers={}, report=report("done")))[0] == (
        "Succeeded"
    )
    phase, c, _ = status.compute(obs(role="site", trainers={}, site_missing="not listed"))
    assert phase == "Pending"
    assert conds(c)["Ready"] == (False, "SiteNotInStudy")


def test_epsilon_is_the_largest_spent_at_a_site() -> None:
    r = AggregatorReport.from_json(
        {
            "state": "training",
            "completed_rounds": 1,
            "planned_rounds": 5,
            "joined": ["a", "b"],
            "sites": {
                "a": {"metrics": {"epsilon": 0.4, "auc": 0.8}},
                "b": {"epsilon": 1.25, "metrics": None},
                "c": None,
            },
            "ended_reason": "",
        }
    )
    assert r is not None
    assert r.epsilon == 1.25
    assert r.ended_reason is None
    assert status.compute(obs(report=r))[2]["epsilon"] == "1.25"
    # Our stored copy reads back the same.
    again = AggregatorReport.from_json(r.to_status(reachable=True))
    assert again == r


@pytest.mark.parametrize("doc", [None, [], {"state": 3}, "done", {"completed_rounds": 1}])
def test_unusable_answers_are_unknown(doc: Any) -> None:
    assert AggregatorReport.from_json(doc) is None


@pytest.mark.parametrize(
    ("job", "phase"),
    [
        (None, "Pending"),
        ({"spec": {}, "status": {}}, "Pending"),
        ({"spec": {"suspend": True}, "status": {}}, "Suspended"),
        ({"status": {"active": 1}}, "Running"),
        ({"status": {"succeeded": 1}}, "Succeeded"),
        ({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "Succeeded"),
        ({"status": {"active": 1, "conditions": [{"type": "Failed", "status": "True"}]}}, "Failed"),
        (
            {"status": {"active": 1, "conditions": [{"type": "Failed", "status": "False"}]}},
            "Running",
        ),
    ],
)
def test_trainer_phase(job: Any, phase: str) -> None:
    assert status.trainer_phase(job) == phase


def test_transition_time_is_kept_unless_the_status_flips() -> None:
    first = status.merge_conditions(None, [Condition("Ready", False, "Starting")], 1, T0)
    assert first[0]["lastTransitionTime"] == "2027-01-01T12:00:00Z"
    assert first[0]["observedGeneration"] == 1
    same = status.merge_conditions(first, [Condition("Ready", False, "Other", "m")], 2, T1)
    assert same[0]["lastTransitionTime"] == "2027-01-01T12:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("Other", 2)
    flipped = status.merge_conditions(same, [Condition("Ready", True, "AggregatorReady")], 2, T1)
    assert flipped[0]["lastTransitionTime"] == "2027-01-01T12:05:00Z"
    assert flipped[0]["status"] == "True"


def test_conditions_not_recomputed_are_kept_in_order() -> None:
    before = status.merge_conditions(
        None, [Condition(t, False, "X") for t in status.CONDITION_TYPES], 1, T0
    )
    after = status.merge_conditions(before, status.invalid_conditions(["spec.rounds: bad"]), 2, T1)
    assert [c["type"] for c in after] == list(status.CONDITION_TYPES)
    assert after[0]["reason"] == "InvalidSpec"
    assert after[0]["message"] == "spec.rounds: bad"
    assert after[2] == before[2]


def test_events_for_conditions_that_turn_true_and_readiness_lost() -> None:
    before = status.merge_conditions(
        None,
        [Condition("Ready", True, "AggregatorReady"), Condition("Blocked", False, "IRBApproved")],
        1,
        T0,
    )
    after = status.merge_conditions(
        before,
        [
            Condition("Ready", False, "IRBApprovalExpired", "expired"),
            Condition("Blocked", True, "IRBApprovalExpired", "expired"),
        ],
        1,
        T1,
    )
    events = status.transitions(before, after)
    assert [(e.warning, e.reason) for e in events] == [
        (False, "IRBApprovalExpired"),
        (True, "IRBApprovalExpired"),
    ]
    assert status.transitions(after, after) == []
