"""Pure status logic: what the world looks like in, the study's ``status`` out.

Recomputed from observations every time (level-based): the children's own status, the
aggregator's ``/status`` answer and the IRB date. The previous status is read only to keep
``lastTransitionTime`` when a condition has not flipped, and to remember the aggregator's last
answer while it cannot be reached.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ConditionType = Literal["Ready", "Progressing", "Succeeded", "Failed", "Blocked"]
CONDITION_TYPES: tuple[ConditionType, ...] = (
    "Ready",
    "Progressing",
    "Succeeded",
    "Failed",
    "Blocked",
)
TrainerPhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


@dataclasses.dataclass(frozen=True)
class Condition:
    type: ConditionType
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return {True: "True", False: "False", None: "Unknown"}[self.status]


@dataclasses.dataclass(frozen=True)
class AggregatorReport:
    """The aggregator's ``/status`` answer, as far as the operator uses it."""

    state: str  # waiting | training | finishing | done
    completed_rounds: int
    planned_rounds: int
    joined: tuple[str, ...]
    epsilon: float | None = None
    ended_reason: str | None = None
    completed: bool | None = None  # once done: False when the study ended early

    @property
    def ended_early(self) -> bool:
        return self.state == "done" and self.completed is False

    @classmethod
    def from_json(cls, doc: Any) -> AggregatorReport | None:
        """Reads the aggregator's JSON (snake_case) or our stored copy (camelCase)."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("state"), str):
            return None

        def num(*keys: str) -> int:
            for k in keys:
                v = doc.get(k)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
            return 0

        joined = doc.get("joined")
        epsilon: float | None = None
        sites = doc.get("sites")
        if isinstance(sites, Mapping):
            for site in sites.values():
                if not isinstance(site, Mapping):
                    continue
                metrics = site.get("metrics")
                for e in (site.get("epsilon"), (metrics or {}).get("epsilon")):
                    if isinstance(e, int | float) and not isinstance(e, bool):
                        epsilon = float(e) if epsilon is None else max(epsilon, float(e))
        stored_eps = doc.get("epsilon")
        if epsilon is None and isinstance(stored_eps, int | float):
            epsilon = float(stored_eps)
        ended = doc.get("ended_reason", doc.get("endedReason"))
        completed = doc.get("completed")
        return cls(
            state=doc["state"],
            completed_rounds=num("completed_rounds", "completedRounds"),
            planned_rounds=num("planned_rounds", "plannedRounds"),
            joined=tuple(str(s) for s in joined) if isinstance(joined, list) else (),
            epsilon=epsilon,
            ended_reason=ended if isinstance(ended, str) and ended else None,
            completed=completed if isinstance(completed, bool) else None,
        )

    def to_status(self, reachable: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "completedRounds": self.completed_rounds,
            "plannedRounds": self.planned_rounds,
            "joined": list(self.joined),
            "reachable": reachable,
        }
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        if self.ended_reason is not None:
            out["endedReason"] = self.ended_reason
        if self.completed is not None:
            out["completed"] = self.completed
        return out


def trainer_phase(job: Mapping[str, Any] | None) -> TrainerPhase:
    """A trainer Job's phase from its ``status`` (and ``spec.suspend``)."""
    if job is None:
        return "Pending"
    status = job.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("status") != "True":
            continue
        if c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Succeeded"
        if c.get("type") == "Failed":
            return "Failed"
    if (status.get("succeeded") or 0) >= 1:
        return "Succeeded"
    if (job.get("spec") or {}).get("suspend"):
        return "Suspended"
    if (status.get("active") or 0) >= 1:
        return "Running"
    return "Pending"


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the reconcile saw in the cluster for one valid study."""

    role: str
    planned_rounds: int
    total_sites: int
    trainers: Mapping[str, TrainerPhase]  # the sites this cluster runs
    aggregator_ready: bool = False
    report: AggregatorReport | None = None  # fresh answer, None when unreachable/not ours
    last_report: AggregatorReport | None = None  # from the previous status
    irb_problem: str | None = None  # the IRB message when approval has lapsed
    irb_note: str = ""  # "approved until ..." when it has not
    site_missing: str | None = None  # site role: this site is not in the study


def _fmt_epsilon(eps: float | None) -> str:
    return "" if eps is None else f"{eps:.2f}"


def compute(obs: Observation) -> tuple[str, list[Condition], dict[str, Any]]:
    """The phase, the five conditions and the display fields for a valid study."""
    report = obs.report or obs.last_report
    agg_done = report is not None and report.state == "done" and not report.ended_early
    trainers = dict(obs.trainers)
    failed = sorted(s for s, p in trainers.items() if p == "Failed")
    if obs.role == "coordinator":
        succeeded = agg_done
    elif obs.role == "site":
        succeeded = bool(trainers) and all(p == "Succeeded" for p in trainers.values())
    else:
        succeeded = bool(trainers) and all(p == "Succeeded" for p in trainers.values()) and agg_done

    blocked = obs.irb_problem is not None
    blocked_c = (
        Condition("Blocked", True, "IRBApprovalExpired", obs.irb_problem or "")
        if blocked
        else Condition(
            "Blocked", False, "IRBApproved" if obs.irb_note else "NoIRBExpiry", obs.irb_note
        )
    )

    if obs.site_missing is not None:
        msg = obs.site_missing
        phase = "Pending"
        conds = [
            Condition("Ready", False, "SiteNotInStudy", msg),
            Condition("Progressing", False, "SiteNotInStudy", msg),
            Condition("Succeeded", False, "SiteNotInStudy", msg),
            Condition("Failed", False, "SiteNotInStudy", msg),
            blocked_c,
        ]
    elif failed or (report is not None and report.ended_early):
        if failed:
            reason = "TrainerFailed"
            msg = (
                f"the trainer Job of site {', '.join(failed)} failed "
                "(it exhausted its retries); see its pods' logs"
            )
        else:
            reason = "StudyEndedEarly"
            why = report.ended_reason if report is not None else None
            msg = f"the aggregator ended the study before its last round: {why or 'no reason'}"
        phase = "Failed"
        conds = [
            Condition("Ready", False, reason, msg),
            Condition("Progressing", False, reason, msg),
            Condition("Succeeded", False, reason, msg),
            Condition("Failed", True, reason, msg),
            blocked_c,
        ]
    elif succeeded:
        done = f"the study completed {report.completed_rounds} rounds" if report else ""
        msg = done or "every trainer finished"
        if report and report.ended_reason:
            msg += f" ({report.ended_reason})"
        phase = "Succeeded"
        conds = [
            Condition("Ready", True, "StudyCompleted", msg),
            Condition("Progressing", False, "StudyCompleted", msg),
            Condition("Succeeded", True, "StudyCompleted", msg),
            Condition("Failed", False, "StudyCompleted", ""),
            blocked_c,
        ]
    elif blocked:
        msg = obs.irb_problem or ""
        phase = "Blocked"
        conds = [
            Condition("Ready", False, "IRBApprovalExpired", msg),
            Condition("Progressing", False, "IRBApprovalExpired", msg),
            Condition("Succeeded", False, "IRBApprovalExpired", ""),
            Condition("Failed", False, "IRBApprovalExpired", ""),
            blocked_c,
        ]
    else:
        phase, ready, progressing = _running(obs, report)
        conds = [
            ready,
            progressing,
            Condition("Succeeded", False, "InProgress", ""),
            Condition("Failed", False, "InProgress", ""),
            blocked_c,
        ]

    display = {
        "round": (
            f"{report.completed_rounds}/{report.planned_rounds or obs.planned_rounds}"
            if report
            else f"?/{obs.planned_rounds}"
        ),
        "sites": f"{len(report.joined)}/{obs.total_sites}" if report else f"?/{obs.total_sites}",
        "epsilon": _fmt_epsilon(report.epsilon if report else None),
        "trainers": {s: p for s, p in sorted(trainers.items())},
    }
    return phase, conds, display


def _running(obs: Observation, report: AggregatorReport | None) -> tuple[str, Condition, Condition]:
    trainers = obs.trainers
    running_sites = sorted(s for s, p in trainers.items() if p == "Running")
    if obs.role == "site":
        if running_sites:
            ready = Condition("Ready", True, "TrainerRunning", "the trainer is running")
            msg = "the trainer is taking part in the study"
            return "Running", ready, Condition("Progressing", True, "Training", msg)
        ready = Condition("Ready", False, "TrainerPending", "the trainer Job has no running pod")
        msg = "waiting for the trainer's pod to start"
        return "Pending", ready, Condition("Progressing", True, "Starting", msg)
    if not obs.aggregator_ready:
        ready = Condition("Ready", False, "AggregatorNotReady", "the aggregator is not ready yet")
        msg = "waiting for the aggregator to become ready"
        return "Pending", ready, Condition("Progressing", True, "Starting", msg)
    ready = Condition("Ready", True, "AggregatorReady", "the aggregator is serving")
    if obs.report is None:
        why = "the aggregator's /status cannot be reached; its state is unknown"
        return "Running", ready, Condition("Progressing", None, "AggregatorUnreachable", why)
    state = obs.report.state
    if state == "waiting":
        msg = f"{len(obs.report.joined)} of {obs.total_sites} sites joined"
        return "Running", ready, Condition("Progressing", True, "WaitingForSites", msg)
    if state in ("finishing", "done"):
        msg = "the rounds are over; the sites are evaluating the final model"
        return "Running", ready, Condition("Progressing", True, "Finishing", msg)
    msg = f"round {obs.report.completed_rounds + 1} of {obs.report.planned_rounds}"
    return "Running", ready, Condition("Progressing", True, "Training", msg)


def invalid_conditions(problems: Sequence[str]) -> list[Condition]:
    msg = "\n".join(problems)
    return [
        Condition("Ready", False, "InvalidSpec", msg),
        Condition("Progressing", False, "InvalidSpec", msg),
    ]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    new: Sequence[Condition],
    generation: int | None,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """New conditions as dicts; a condition whose status has not flipped keeps its time.

    Conditions not in ``new`` are kept as they were (an invalid spec says nothing new about
    success or failure).
    """
    prev = {c.get("type"): c for c in previous or [] if isinstance(c, Mapping)}
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out: dict[str, dict[str, Any]] = {}
    for t in CONDITION_TYPES:
        if t in prev:
            out[t] = dict(prev[t])
    for c in new:
        old = prev.get(c.type)
        since = stamp
        if old is not None and old.get("status") == c.status_text and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        d: dict[str, Any] = {
            "type": c.type,
            "status": c.status_text,
            "reason": c.reason,
            "message": c.message,
            "lastTransitionTime": since,
        }
        if generation is not None:
            d["observedGeneration"] = generation
        out[c.type] = d
    return [out[t] for t in CONDITION_TYPES if t in out]


@dataclasses.dataclass(frozen=True)
class Transition:
    """A condition that flipped: becomes a Kubernetes Event."""

    warning: bool
    reason: str
    message: str


def transitions(
    previous: Sequence[Mapping[str, Any]] | None, current: Sequence[Mapping[str, Any]]
) -> list[Transition]:
    """Conditions that turned True (and Ready turning False), as Events to post."""
    prev = {c.get("type"): c for c in previous or [] if isinstance(c, Mapping)}
    out = []
    for c in current:
        old = prev.get(c["type"], {})
        if old.get("status") == c["status"] and old.get("reason") == c["reason"]:
            continue
        became_true = c["status"] == "True" and old.get("status") != "True"
        not_ready = c["type"] == "Ready" and c["status"] == "False"
        if not (became_true or not_ready):
            continue
        warning = c["type"] in ("Failed", "Blocked") or c["reason"] == "InvalidSpec"
        message = c["message"] or f"{c['type']} is now {c['status']}"
        out.append(Transition(warning=warning, reason=c["reason"], message=message))
    return out
