"""The aggregator's Prometheus metrics, in a registry of its own.

Every series carries the ``study`` label; the per-site ones add ``site``, whose values are the
sites the study lists (refusals from unlisted sites are counted by ``reason`` only), so the
number of series stays bounded by the study. Counters and the round histogram are updated
where things happen (``Coordinator`` calls the methods below); the gauges that mirror the
round state machine read it when scraped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Round durations run from seconds (a demo on a laptop) to hours (real hospitals).
ROUND_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)

# The refusal reasons of docs/protocol.md, shown at 0 from the start so that a first refusal
# is an increase Prometheus can see. A reason not listed here still counts when it happens.
KNOWN_REFUSALS = (
    "wrong-study",
    "unknown-site",
    "not-joined",
    "stale-round",
    "future-round",
    "duplicate",
    "replay",
    "wrong-base",
    "no-samples",
    "too-large",
    "bad-stream",
    "wrong-dtype",
    "wrong-shape",
    "unknown-tensor",
    "missing-tensor",
    "non-finite",
    "norm-exceeded",
)

# Calls refused before the round logic sees them (mutual TLS: a certificate for another site).
KNOWN_CALL_REFUSALS = ("identity-mismatch",)
RPCS = ("Join", "GetTask", "DownloadModel", "ReserveUpload", "SubmitUpdate", "Report", "Leave")
STATES = ("waiting", "training", "finishing", "done")
REPORT_KINDS = ("evaluation", "final")
EPSILON_KEY = "epsilon"

ValueFn = Callable[[], float]


def _value(v: float | None) -> float:
    return float(v) if v is not None and math.isfinite(v) else math.nan


class AggregatorMetrics:
    """The metrics of one study's aggregator."""

    def __init__(
        self,
        study: str,
        sites: Sequence[str],
        metric: str,
        planned_rounds: int,
        epsilon_budget: float | None = None,
    ) -> None:
        self.study = study
        self.sites = tuple(sites)
        self.metric = metric
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        s = ("study",)
        ss = ("study", "site")

        self.round = Gauge(
            "fedstudy_round",
            "The open round, or the last completed one when none is open.",
            s,
            registry=r,
        )
        self.rounds_completed = Gauge(
            "fedstudy_rounds_completed", "Rounds the aggregator has completed.", s, registry=r
        )
        self.rounds_planned = Gauge(
            "fedstudy_rounds_planned", "Rounds the study plans.", s, registry=r
        )
        self.state = Gauge(
            "fedstudy_study_state",
            "1 for the aggregator's current state, 0 for the others.",
            ("study", "state"),
            registry=r,
        )
        self.round_duration = Histogram(
            "fedstudy_round_duration_seconds",
            "Time from a round's opening to its close.",
            s,
            buckets=ROUND_BUCKETS_S,
            registry=r,
        )
        self.last_round_time = Gauge(
            "fedstudy_round_last_completed_timestamp_seconds",
            "Unix time of the last round's close (of the aggregator's start before the first).",
            s,
            registry=r,
        )
        self.sites_planned = Gauge("fedstudy_sites", "Sites the study lists.", s, registry=r)
        self.sites_joined = Gauge("fedstudy_sites_joined", "Sites joined now.", s, registry=r)
        self.uploads_waiting = Gauge(
            "fedstudy_uploads_waiting",
            "Sites waiting for room to send their update (in ReserveUpload).",
            s,
            registry=r,
        )
        self.sites_answered = Gauge(
            "fedstudy_sites_answered",
            "Sites with an accepted update in the open round.",
            s,
            registry=r,
        )
        self.site_last_round = Gauge(
            "fedstudy_site_last_round",
            "The last round in which the site's update was accepted (0: none yet).",
            ss,
            registry=r,
        )
        self.accepted = Counter(
            "fedstudy_updates_accepted",
            "Model updates accepted into a round (the initial model included).",
            ss,
            registry=r,
        )
        self.refused = Counter(
            "fedstudy_updates_refused",
            "Model updates refused, by reason.",
            ("study", "reason"),
            registry=r,
        )
        self.calls_refused = Counter(
            "fedstudy_calls_refused",
            "Calls refused before any protocol check (e.g. a certificate for another site).",
            ("study", "reason", "rpc"),
            registry=r,
        )
        self.received = Counter(
            "fedstudy_received_bytes",
            "Bytes of update streams received from the site.",
            ss,
            registry=r,
        )
        self.sent = Counter(
            "fedstudy_sent_bytes",
            "Bytes of model tensors served to the site.",
            ss,
            registry=r,
        )
        self.reports = Counter(
            "fedstudy_reports",
            "Evaluation and final reports accepted from the site.",
            ("study", "site", "kind"),
            registry=r,
        )
        self.global_loss = Gauge(
            "fedstudy_global_loss",
            "Loss of the newest evaluated global model, weighted by the sites' test rows.",
            s,
            registry=r,
        )
        self.global_metric = Gauge(
            "fedstudy_global_metric",
            "The study's metric of the newest evaluated global model, weighted by test rows.",
            ("study", "metric"),
            registry=r,
        )
        self.site_loss = Gauge(
            "fedstudy_site_loss",
            "Loss of the newest global model the site evaluated, on its test split.",
            ss,
            registry=r,
        )
        self.site_metric = Gauge(
            "fedstudy_site_metric",
            "The study's metric of the newest global model the site evaluated.",
            ("study", "site", "metric"),
            registry=r,
        )
        self.epsilon = Gauge(
            "fedstudy_site_epsilon",
            "Differential privacy budget the site has spent (epsilon), as it last reported.",
            ss,
            registry=r,
        )
        self.epsilon_budget = Gauge(
            "fedstudy_site_epsilon_budget",
            "The site's differential privacy budget (the study's target epsilon).",
            ss,
            registry=r,
        )
        self.server_epsilon = Gauge(
            "fedstudy_server_epsilon",
            "Epsilon spent by the aggregator's own differential privacy (DP-FedAvg), "
            "after the completed rounds.",
            s,
            registry=r,
        )

        self.rounds_planned.labels(study).set(planned_rounds)
        self.sites_planned.labels(study).set(len(self.sites))
        self.last_round_time.labels(study).set_to_current_time()
        self.round_duration.labels(study)  # buckets at 0 from the start, not from round 1
        for reason in KNOWN_REFUSALS:
            self.refused.labels(study, reason)
        for reason in KNOWN_CALL_REFUSALS:
            for rpc in RPCS:
                self.calls_refused.labels(study, reason, rpc)
        for site in self.sites:
            self.site_last_round.labels(study, site).set(0)
            self.accepted.labels(study, site)
            self.received.labels(study, site)
            self.sent.labels(study, site)
            for kind in REPORT_KINDS:
                self.reports.labels(study, site, kind)
            if epsilon_budget is not None:
                self.epsilon_budget.labels(study, site).set(epsilon_budget)

    def watch(
        self,
        *,
        round_fn: ValueFn,
        completed_fn: ValueFn,
        joined_fn: ValueFn,
        answered_fn: ValueFn,
        waiting_fn: ValueFn,
        state_fn: Callable[[], str],
    ) -> None:
        """Gauges read from the coordinator at each scrape."""
        st = self.study
        self.uploads_waiting.labels(st).set_function(waiting_fn)
        self.round.labels(st).set_function(round_fn)
        self.rounds_completed.labels(st).set_function(completed_fn)
        self.sites_joined.labels(st).set_function(joined_fn)
        self.sites_answered.labels(st).set_function(answered_fn)
        for name in STATES:
            self.state.labels(st, name).set_function(
                lambda name=name: 1.0 if state_fn() == name else 0.0  # type: ignore[misc]
            )

    # ------------------------------------------------------------------ events

    def round_closed(self, duration_s: float) -> None:
        self.round_duration.labels(self.study).observe(duration_s)
        self.last_round_time.labels(self.study).set_to_current_time()

    def update_accepted(self, site: str, round_: int) -> None:
        if site not in self.sites:
            return
        self.accepted.labels(self.study, site).inc()
        if round_ > 0:
            self.site_last_round.labels(self.study, site).set(round_)

    def site_round(self, site: str, round_: int | None) -> None:
        """The site's last round as a restarted aggregator remembers it."""
        if site in self.sites and round_:
            self.site_last_round.labels(self.study, site).set(round_)

    def update_refused(self, reason: str) -> None:
        self.refused.labels(self.study, reason or "unknown").inc()

    def call_refused(self, reason: str, rpc: str) -> None:
        self.calls_refused.labels(
            self.study, reason or "unknown", rpc if rpc in RPCS else "other"
        ).inc()

    def bytes_received(self, site: str, n: int) -> None:
        if site in self.sites and n > 0:
            self.received.labels(self.study, site).inc(n)

    def bytes_sent(self, site: str, n: int) -> None:
        if site in self.sites and n > 0:
            self.sent.labels(self.study, site).inc(n)

    def report(self, site: str, kind: str) -> None:
        if site in self.sites:
            self.reports.labels(self.study, site, kind).inc()

    def site_metrics(self, site: str, metrics: Mapping[str, float | None]) -> None:
        """A site's newest evaluation: its loss, the study's metric and epsilon if present."""
        if site not in self.sites:
            return
        if "loss" in metrics:
            self.site_loss.labels(self.study, site).set(_value(metrics["loss"]))
        if self.metric in metrics:
            self.site_metric.labels(self.study, site, self.metric).set(_value(metrics[self.metric]))
        eps = metrics.get(EPSILON_KEY)
        if eps is not None:
            self.epsilon.labels(self.study, site).set(_value(eps))

    def global_metrics(self, weighted: Mapping[str, float | None]) -> None:
        if "loss" in weighted:
            self.global_loss.labels(self.study).set(_value(weighted["loss"]))
        if self.metric in weighted:
            self.global_metric.labels(self.study, self.metric).set(_value(weighted[self.metric]))

    # ------------------------------------------------------------------ exposition

    def text(self) -> str:
        """The registry in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry).decode()


def epsilon_budget_of(spec: object) -> float | None:
    """``spec.privacy.targetEpsilon`` when the study has one (read defensively: the privacy
    section is optional and may not exist in older study schemas)."""
    privacy = getattr(spec, "privacy", None)
    if privacy is None or not getattr(privacy, "enabled", True):
        return None
    target = getattr(privacy, "targetEpsilon", None)
    if isinstance(target, (int, float)) and math.isfinite(target) and target > 0:
        return float(target)
    return None
