"""The one level-based reconcile: read the world, make it match the study, report status.

Reached from create, update, resume and the timer alike. It never trusts its own last status:
it parses the spec, builds every child it wants (pure builders), reads what exists, creates
what is missing, patches what differs, deletes what is no longer wanted, then recomputes the
status from what it saw. Running it twice changes nothing the second time; an operator
restarted half-way finds the children by their deterministic names and creates no duplicates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fedstudy.spec import FederatedStudy, StudyError, check_irb, parse_study
from fedstudy_operator import builders, status
from fedstudy_operator.kube import Conflict, Kube, StatusProbe
from fedstudy_operator.options import OperatorConfig, StudyOptions, parse_options

log = logging.getLogger("fedstudy.operator")

EventSink = Callable[[Mapping[str, Any], status.Transition], None]
# Kinds the operator deletes when no longer wanted. PVCs are kept: they hold the aggregator's
# checkpoints and each site's privacy ledger; they go with the study (owner reference).
PRUNED_KINDS = ("Job", "Deployment", "Service", "NetworkPolicy", "ConfigMap")
CHILD_KINDS = (*PRUNED_KINDS, "PersistentVolumeClaim")


@dataclasses.dataclass
class Outcome:
    phase: str
    problems: list[str] = dataclasses.field(default_factory=list)
    created: list[str] = dataclasses.field(default_factory=list)
    patched: list[str] = dataclasses.field(default_factory=list)
    deleted: list[str] = dataclasses.field(default_factory=list)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _today() -> dt.date:
    return dt.date.today()


def study_document(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of the resource the study model reads (server-added fields left out)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta
        },
        "spec": body.get("spec"),
    }


def _key(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid for r in refs)


def _patch_for(desired: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings ``live`` to ``desired``, or None when nothing differs."""
    kind = desired["kind"]
    dmeta = desired["metadata"]
    lmeta = live.get("metadata") or {}
    if kind == "PersistentVolumeClaim":
        return None  # immutable once bound; a new size or class needs a new claim
    if kind == "Job":
        # A Job's pod template is immutable: only suspension and labels follow the study.
        # (A new trainer image reaches a Job when it is deleted: the next reconcile remakes it.)
        want = bool(desired["spec"].get("suspend"))
        have = bool((live.get("spec") or {}).get("suspend"))
        labels_ok = all((lmeta.get("labels") or {}).get(k) == v for k, v in dmeta["labels"].items())
        if want == have and labels_ok:
            return None
        return {"metadata": {"labels": dmeta["labels"]}, "spec": {"suspend": want}}
    want_hash = dmeta["annotations"][builders.APPLIED_HASH]
    if (lmeta.get("annotations") or {}).get(builders.APPLIED_HASH) == want_hash:
        return None
    patch: dict[str, Any] = {
        "metadata": {
            "labels": dmeta.get("labels", {}),
            "annotations": dmeta.get("annotations", {}),
            "ownerReferences": dmeta.get("ownerReferences", []),
        }
    }
    for field in ("spec", "data"):
        if field in desired:
            patch[field] = desired[field]
    return patch


def _changes(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether a JSON merge patch would change ``current``."""
    for k, v in patch.items():
        if v is None:
            if k in current:
                return True
        elif isinstance(v, Mapping):
            have = current.get(k)
            if not isinstance(have, Mapping) or _changes(have, v):
                return True
        elif current.get(k) != v:
            return True
    return False


class Reconciler:
    """Holds the client, the configuration and a lock per study; ``reconcile`` does the work."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        probe: StatusProbe,
        *,
        events: EventSink | None = None,
        today: Callable[[], dt.date] = _today,
        now: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.kube = kube
        self.config = config
        self.probe = probe
        self.events = events
        self.today = today
        self.now = now
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        meta = body["metadata"]
        async with self._lock(meta["namespace"], meta["name"]):
            return await self._reconcile(body)

    # --- the steps ---------------------------------------------------------------------

    def _validate(
        self, body: Mapping[str, Any]
    ) -> tuple[FederatedStudy | None, StudyOptions | None, list[str]]:
        try:
            study = parse_study(study_document(body))
        except StudyError as e:
            return None, None, list(e.problems)
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        site_names = [s.name for s in study.spec.sites]
        options, problems = parse_options(annotations, self.config, site_names)
        problems += builders.data_path_problems(study)
        if self.config.runs_aggregator and not study.name[0].isalpha():
            problems.append(
                f"metadata.name: must start with a letter: it names the aggregator's Service "
                f"{builders.aggregator_name(study.name)!r}"
            )
        return study, options, problems

    async def _reconcile(self, body: Mapping[str, Any]) -> Outcome:
        meta = body["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        if meta.get("deletionTimestamp"):
            # Going away: its children go with it (owner references); make nothing new.
            return Outcome(phase="Deleting")
        study, options, problems = self._validate(body)
        if problems or study is None or options is None:
            await self._write_status(body, "Invalid", status.invalid_conditions(problems), {})
            log.warning("invalid study=%s/%s problems=%d", namespace, name, len(problems))
            return Outcome(phase="Invalid", problems=problems)

        irb_problem, irb_note = self._irb(study)
        site_missing: str | None = None
        if self.config.role == "site" and not builders.wanted_sites(study, self.config):
            site_missing = (
                f"this cluster runs site {self.config.site_name!r}, which the study does not "
                f"list (sites: {', '.join(s.name for s in study.spec.sites)})"
            )
        previous = body.get("status") or {}
        last = status.AggregatorReport.from_json(previous.get("aggregator"))
        # Done as recorded by an earlier reconcile: at least one resync after the aggregator
        # said so, which gives the sites time to hear it before it is scaled down.
        finished = last is not None and last.state == "done"
        outcome = Outcome(phase="")
        if site_missing is None:
            plan = builders.build_children(
                body,
                study,
                options,
                self.config,
                blocked=irb_problem is not None,
                finished=finished,
            )
            children, sites = plan.children, plan.sites
        else:
            children, sites = [], []
        existing = await self._existing(name, namespace)
        live = await self._apply(children, namespace, existing, outcome)
        await self._prune(meta.get("uid"), namespace, children, existing, outcome)

        trainers = {
            s: status.trainer_phase(live.get(f"Job/{builders.trainer_name(name, s)}"))
            for s in sites
        }
        deployment = live.get(f"Deployment/{builders.aggregator_name(name)}")
        ready = bool(((deployment or {}).get("status") or {}).get("readyReplicas"))
        report = None
        if self.config.runs_aggregator and irb_problem is None and not finished:
            url = self.config.status_url.format(
                name=builders.aggregator_name(name), namespace=namespace, study=name
            )
            report = status.AggregatorReport.from_json(await self.probe(url))
        obs = status.Observation(
            role=self.config.role,
            planned_rounds=study.spec.rounds,
            total_sites=len(study.spec.sites),
            trainers=trainers,
            aggregator_ready=ready,
            report=report,
            last_report=last,
            irb_problem=irb_problem,
            irb_note=irb_note,
            site_missing=site_missing,
        )
        phase, conditions, display = status.compute(obs)
        extra: dict[str, Any] = dict(display)
        old_trainers = previous.get("trainers") or {}
        extra["trainers"] = {
            **{s: None for s in old_trainers if s not in display["trainers"]},
            **display["trainers"],
        }
        if report is not None:
            extra["aggregator"] = report.to_status(reachable=True)
        elif last is not None:
            extra["aggregator"] = {"reachable": False}
        await self._write_status(body, phase, conditions, extra)
        outcome.phase = phase
        return outcome

    def _irb(self, study: FederatedStudy) -> tuple[str | None, str]:
        irb = study.spec.governance.irb
        if irb is None:
            return None, ""
        try:
            check_irb(study, self.today())
        except StudyError as e:
            detail = e.problems[0].split(": ", 1)[-1]
            return f"{detail}; the study's workloads are paused until then", ""
        return None, f"IRB protocol {irb.protocol} approved until {irb.approvedUntil.isoformat()}"

    async def _existing(self, study: str, namespace: str) -> dict[str, dict[str, Any]]:
        """The study's children as they are: one labelled list per kind."""
        out: dict[str, dict[str, Any]] = {}
        for kind in CHILD_KINDS:
            for obj in await self.kube.list(kind, namespace, {builders.STUDY_LABEL: study}):
                obj.setdefault("kind", kind)  # list items carry no kind
                out[_key(obj)] = obj
        return out

    async def _apply(
        self,
        children: list[dict[str, Any]],
        namespace: str,
        existing: Mapping[str, dict[str, Any]],
        outcome: Outcome,
    ) -> dict[str, dict[str, Any]]:
        """Creates the missing children and patches those that differ; returns what exists."""
        live: dict[str, dict[str, Any]] = {}
        for child in children:
            key = _key(child)
            kind, name = child["kind"], child["metadata"]["name"]
            current = existing.get(key)
            if current is None:
                try:
                    live[key] = await self.kube.create(child)
                    outcome.created.append(key)
                    log.info("created %s namespace=%s", key, namespace)
                    continue
                except Conflict:
                    # There, but not labelled as the study's: read it and judge it below.
                    current = await self.kube.get(kind, namespace, name)
                    if current is None:
                        raise
            if not _owned_by(current, child["metadata"]["ownerReferences"][0]["uid"]):
                log.warning(
                    "not touching %s namespace=%s: it exists and the study does not own it",
                    key,
                    namespace,
                )
            else:
                patch = _patch_for(child, current)
                if patch is not None:
                    current = await self.kube.patch(kind, namespace, name, patch)
                    outcome.patched.append(key)
                    log.info("patched %s namespace=%s", key, namespace)
            live[key] = current
        return live

    async def _prune(
        self,
        uid: str | None,
        namespace: str,
        children: list[dict[str, Any]],
        existing: Mapping[str, dict[str, Any]],
        outcome: Outcome,
    ) -> None:
        """Deletes the study's children that are no longer wanted (e.g. a removed site's Job)."""
        wanted = {_key(c) for c in children}
        for key, obj in existing.items():
            kind = obj["kind"]
            if key in wanted or kind not in PRUNED_KINDS or not _owned_by(obj, uid):
                continue
            await self.kube.delete(kind, namespace, obj["metadata"]["name"])
            outcome.deleted.append(key)
            log.info("deleted %s namespace=%s", key, namespace)

    async def _write_status(
        self,
        body: Mapping[str, Any],
        phase: str,
        conditions: list[status.Condition],
        extra: Mapping[str, Any],
    ) -> None:
        meta = body["metadata"]
        previous = body.get("status") or {}
        merged = status.merge_conditions(
            previous.get("conditions"), conditions, meta.get("generation"), self.now()
        )
        new = {
            "phase": phase,
            "observedGeneration": meta.get("generation"),
            "conditions": merged,
            **extra,
        }
        if not _changes(previous, new):
            return
        await self.kube.patch(
            "FederatedStudy", meta["namespace"], meta["name"], {"status": new}, "status"
        )
        if self.events is not None:
            for t in status.transitions(previous.get("conditions"), merged):
                self.events(body, t)
