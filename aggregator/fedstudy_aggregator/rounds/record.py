"""The study's record: what the aggregator knows of each site and each round, the refusals,
and what it shows of them: the summary and the other outputs, the ``/status`` page and the
Prometheus metrics. (The audit trail's entries are in ``..audit``; the coordinator writes
them as things happen.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedstudy.spec import FederatedStudy
from fedstudy.tensors import TensorSpec
from fedstudy.wire import aggregator_pb2 as pb

from .. import outputs
from ..audit import StudyAudit
from ..metrics import AggregatorMetrics, epsilon_budget_of
from ..records import (
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
from ..strategies import Strategy
from .machine import DONE, Roster, RoundMachine
from .store import GlobalModel


class StudyRecord:
    """Sites, the rounds' lines, the update ids seen and the refusals counted; the parts that
    survive a restart go to and come from ``to_json``/``load_json``."""

    def __init__(self, study: FederatedStudy, out_dir: Path, audit: StudyAudit) -> None:
        self.study = study
        self.name = study.name
        self.out_dir = out_dir
        self.audit = audit
        spec = study.spec
        self.sites: dict[str, SiteRecord] = {s.name: SiteRecord(s.name) for s in spec.sites}
        self.history: History = {}
        self.seen_ids: set[str] = set()
        self.refused: Counter[str] = Counter()
        self.round_refused: Counter[str] = Counter()
        # Calls refused before reaching the round logic (e.g. identity-mismatch under mTLS).
        self.refused_calls: Counter[str] = Counter()
        self.completed = False
        self.ended_reason: str | None = None
        self.accepted_total = 0
        self.bytes_received = 0
        self.metrics = AggregatorMetrics(
            self.name,
            [s.name for s in spec.sites],
            metric=spec.task.metric,
            planned_rounds=spec.rounds,
            epsilon_budget=epsilon_budget_of(spec),
        )

    # ----------------------------------------------------------------- state

    def to_json(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "ended_reason": self.ended_reason,
            "sites": {n: s.to_json() for n, s in self.sites.items()},
            "history": history_to_json(self.history),
            "seen_update_ids": sorted(self.seen_ids),
            "refused": dict(self.refused),
        }

    def load_json(self, st: dict[str, Any]) -> None:
        for name, data in (st.get("sites") or {}).items():
            if name in self.sites:
                self.sites[name] = SiteRecord.from_json(name, data)
        self.history = history_from_json(st.get("history") or {})
        self.seen_ids = set(st.get("seen_update_ids") or [])
        self.refused = Counter({str(k): int(v) for k, v in (st.get("refused") or {}).items()})
        self.completed = bool(st.get("completed", False))
        self.ended_reason = st.get("ended_reason")

    # ----------------------------------------------------------------- sites and rounds

    def joined(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.joined]

    def roster(self) -> Roster:
        """The sites as the round machine needs to know them."""
        return Roster(
            joined=frozenset(self.joined()),
            reported=frozenset(n for n, s in self.sites.items() if s.final_reported),
            available=sum(1 for s in self.sites.values() if s.left is None),
        )

    def site_joined(self, site: SiteRecord, req: pb.JoinRequest, sig: list[TensorSpec]) -> None:
        site.joined = True
        site.left = None
        site.signature = sig
        site.train_samples = int(req.train_samples)
        site.test_samples = int(req.test_samples)

    def update_accepted(self, site: SiteRecord, h: pb.UpdateHeader) -> RoundLine | None:
        """Counts an accepted update; one of a round (not the initial model) goes into the
        site's line for the round, which is returned."""
        self.accepted_total += 1
        self.metrics.update_accepted(site.name, int(h.round))
        if h.round == 0:
            return None
        site.rounds_participated += 1
        site.last_round = h.round
        line = self.line(h.round, site)
        line.train_samples = int(h.num_samples)
        line.train_loss = finite_or_none(h.train_loss)
        return line

    def update_refused(self, reason: str) -> None:
        self.refused[reason] += 1
        self.round_refused[reason] += 1
        self.metrics.update_refused(reason)

    def report(self, site: SiteRecord, req: pb.ReportRequest) -> RoundLine:
        """Takes a site's evaluation of a model version in (and, with a FINAL report, its
        local-only baseline); returns its line for that version."""
        v = int(req.model_version)
        line = self.line(v, site)
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
        if final:
            site.local_only = clean_metrics(req.local_only_metrics)
            site.final_reported = True
        return line

    def line(self, r: int, site: SiteRecord) -> RoundLine:
        lines = self.history.setdefault(r, {})
        if site.name not in lines:
            lines[site.name] = RoundLine(test_samples=site.test_samples)
        return lines[site.name]

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

    def site_epsilon(self) -> dict[str, dict[str, Any]] | None:
        """Under DP-SGD, the ε each site last reported and the round it was spent through (a
        site reports with its evaluation of model version v: its spend over rounds 1..v)."""
        if self.study.spec.privacy is None:
            return None
        return {
            s.name: {"epsilon": s.metrics.get("epsilon"), "through_round": s.metrics_version}
            for s in self.sites.values()
            if "epsilon" in s.metrics
        }

    def end_sites(self) -> dict[str, dict[str, Any]]:
        """Each site's figures for the study-end audit entry."""
        return {
            s.name: {
                "rounds_participated": s.rounds_participated,
                "train_samples": s.train_samples,
                "test_samples": s.test_samples,
                **({"left": s.left} if s.left else {}),
                **({"epsilon": s.metrics["epsilon"]} if "epsilon" in s.metrics else {}),
            }
            for s in self.sites.values()
        }

    # ----------------------------------------------------------------- what it shows

    def summary(
        self, machine: RoundMachine, model: GlobalModel, strategy: Strategy
    ) -> dict[str, Any]:
        out = outputs.build_summary(
            study=self.name,
            completed=self.completed,
            ended_reason=self.ended_reason,
            planned_rounds=self.study.spec.rounds,
            version=machine.version,
            strategy=strategy.name,
            model=model.weights,
            model_digest=model.digest(),
            sites=list(self.sites.values()),
            history=self.history,
            refused=self.refused,
        )
        if strategy.dp is not None:
            out["server_privacy"] = strategy.dp.report(machine.version or 0)
        anchor = self.audit.anchor()
        if anchor is not None:
            out["audit"] = anchor
        return out

    def write_outputs(
        self, final: bool, machine: RoundMachine, model: GlobalModel, strategy: Strategy
    ) -> None:
        """metrics.jsonl for the rounds whose lines are complete; at the end, every output.
        Raises ``OSError`` when the disk refuses a write."""
        v = machine.version or 0
        upto = v if final else v - 1
        order = [s.name for s in self.study.spec.sites]
        outputs.write_metrics(self.out_dir, outputs.metrics_lines(self.history, order, upto))
        if not final:
            return
        if model.weights is not None:
            outputs.write_model(self.out_dir, model.weights, self.name, v)
        summary = self.summary(machine, model, strategy)
        outputs.write_summary(self.out_dir, summary)
        outputs.write_model_card(self.out_dir, self.study, summary)

    def status(self, machine: RoundMachine, strategy: Strategy) -> dict[str, Any]:
        """A JSON-able picture of the study, for ``/status``."""
        gv, weighted, _ = self.latest_global()
        spec = self.study.spec
        return {
            "study": self.name,
            "state": machine.phase,
            "round": machine.round if machine.round is not None else (machine.version or 0),
            "completed_rounds": machine.version or 0,
            "planned_rounds": spec.rounds,
            "min_sites": spec.minSites,
            "strategy": strategy.name,
            "joined": self.joined(),
            "sites": {
                n: {
                    "joined": s.joined,
                    "answered": s.name in machine.answered,
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
            "completed": self.completed if machine.phase == DONE else None,
            "ended_reason": self.ended_reason,
            **({"server_privacy": strategy.dp.report(machine.version or 0)} if strategy.dp else {}),
        }

    def watch_metrics(
        self, machine: RoundMachine, strategy: Strategy, waiting: Callable[[], float]
    ) -> None:
        """Hands the state gauges to the metrics and publishes what a resumed state knows."""
        self.metrics.watch(
            round_fn=lambda: float(
                machine.round if machine.round is not None else (machine.version or 0)
            ),
            completed_fn=lambda: float(machine.version or 0),
            joined_fn=lambda: float(len(self.joined())),
            answered_fn=lambda: float(len(machine.answered)),
            waiting_fn=waiting,
            state_fn=lambda: machine.phase,
        )
        dp = strategy.dp
        if dp is not None:
            self.metrics.server_epsilon.labels(self.name).set_function(
                lambda: dp.epsilon(machine.version or 0)
            )
        for site in self.sites.values():
            self.metrics.site_round(site.name, site.last_round)
            self.metrics.site_metrics(site.name, site.metrics)
        self.metrics.global_metrics(self.latest_global()[1])

    def count_refused_call(self, reason: str, rpc: str) -> None:
        """Counts a call refused at the door (before any protocol check)."""
        self.refused_calls[reason] += 1
        self.metrics.call_refused(reason, rpc)
