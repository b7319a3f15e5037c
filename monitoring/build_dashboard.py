"""Builds the fedstudy Grafana dashboard (``monitoring/dashboards/fedstudy.json``).

Run ``python monitoring/build_dashboard.py`` after changing it; ``--check`` exits 1 when the
checked-in JSON differs from what this script builds (the tests run the same comparison).
The dashboard is built with grafana-foundation-sdk; every query selects one study in one
namespace through the ``$namespace`` and ``$study`` variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "fedstudy.json"
UID = "fedstudy-study"
SEL = 'namespace="$namespace", study="$study"'
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(expr: str, legend: str, ref: str) -> prom.Dataquery:
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range()


def _timeseries(title: str, description: str, unit: str, *queries: prom.Dataquery) -> Any:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(12)
        .line_width(2)
        .fill_opacity(10)
    )
    for q in queries:
        panel = panel.with_target(q)
    return panel


def _stat(title: str, description: str, *queries: prom.Dataquery) -> Any:
    panel = (
        stat.Panel().title(title).description(description).datasource(DATASOURCE).height(4).span(6)
    )
    for q in queries:
        panel = panel.with_target(q.instant())
    return panel


def build() -> dict[str, Any]:
    """The dashboard as a JSON-able dict."""
    datasource = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        dash.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query("label_values(fedstudy_rounds_planned, namespace)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    study = (
        dash.QueryVariable("study")
        .label("Study")
        .datasource(DATASOURCE)
        .query('label_values(fedstudy_rounds_planned{namespace="$namespace"}, study)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    rate = "$__rate_interval"
    board = (
        dash.Dashboard("fedstudy: federated study")
        .uid(UID)
        .description("One federated study's rounds, sites, metrics, privacy budget and traffic.")
        .tags(["fedstudy", "federated-learning"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .with_variable(datasource)
        .with_variable(namespace)
        .with_variable(study)
        .with_row(dash.Row("Progress"))
        .with_panel(
            _stat(
                "Rounds completed",
                "Rounds the aggregator has completed, of the rounds the study plans.",
                _query(f"fedstudy_rounds_completed{{{SEL}}}", "completed", "A"),
                _query(f"fedstudy_rounds_planned{{{SEL}}}", "planned", "B"),
            )
        )
        .with_panel(
            _stat(
                "Sites joined",
                "Sites joined now, of the sites the study lists.",
                _query(f"fedstudy_sites_joined{{{SEL}}}", "joined", "A"),
                _query(f"fedstudy_sites{{{SEL}}}", "listed", "B"),
            )
        )
        .with_panel(
            _stat(
                "Global metric",
                "The study's metric of the newest evaluated global model (weighted by test rows).",
                _query(f"fedstudy_global_metric{{{SEL}}}", "{{metric}}", "A"),
            )
        )
        .with_panel(
            _stat(
                "Refused updates",
                "Model updates the aggregator refused since it started.",
                _query(f"sum(fedstudy_updates_refused_total{{{SEL}}})", "refused", "A"),
            )
        )
        .with_panel(
            _timeseries(
                "Round progress",
                "The open round (or the last completed one) against the planned rounds.",
                "none",
                _query(f"fedstudy_round{{{SEL}}}", "round", "A"),
                _query(f"fedstudy_rounds_planned{{{SEL}}}", "planned", "B"),
            )
        )
        .with_panel(
            _timeseries(
                "Round duration",
                "Mean round duration since the aggregator started, and the 90th percentile "
                "of recent rounds.",
                "s",
                _query(
                    f"fedstudy_round_duration_seconds_sum{{{SEL}}}"
                    f" / fedstudy_round_duration_seconds_count{{{SEL}}}",
                    "mean",
                    "A",
                ),
                _query(
                    "histogram_quantile(0.9, sum by (le) "
                    f"(rate(fedstudy_round_duration_seconds_bucket{{{SEL}}}[{rate}])))",
                    "p90",
                    "B",
                ),
            )
        )
        .with_panel(
            _timeseries(
                "Sites",
                "Sites listed, joined, and with an accepted update in the open round.",
                "none",
                _query(f"fedstudy_sites{{{SEL}}}", "listed", "A"),
                _query(f"fedstudy_sites_joined{{{SEL}}}", "joined", "B"),
                _query(f"fedstudy_sites_answered{{{SEL}}}", "answered", "C"),
            )
        )
        .with_panel(
            _timeseries(
                "Rounds since each site's last update",
                "Completed rounds since the site's update was last accepted.",
                "none",
                _query(
                    f"fedstudy_rounds_completed{{{SEL}}}"
                    f" - ignoring(site) group_right fedstudy_site_last_round{{{SEL}}}",
                    "{{site}}",
                    "A",
                ),
            )
        )
        .with_row(dash.Row("Model quality"))
        .with_panel(
            _timeseries(
                "Global metric and loss",
                "The newest evaluated global model, weighted by the sites' test rows.",
                "none",
                _query(f"fedstudy_global_metric{{{SEL}}}", "{{metric}}", "A"),
                _query(f"fedstudy_global_loss{{{SEL}}}", "loss", "B"),
            )
        )
        .with_panel(
            _timeseries(
                "Metric per site",
                "The study's metric of the newest global model, on each site's test split.",
                "none",
                _query(f"fedstudy_site_metric{{{SEL}}}", "{{site}}", "A"),
            )
        )
        .with_panel(
            _timeseries(
                "Loss per site",
                "Loss of the newest global model on each site's test split.",
                "none",
                _query(f"fedstudy_site_loss{{{SEL}}}", "{{site}}", "A"),
            )
        )
        .with_panel(
            _timeseries(
                "Privacy budget per site (ε)",
                "Epsilon each site has spent, against its budget (the study's target epsilon).",
                "none",
                _query(f"fedstudy_site_epsilon{{{SEL}}}", "{{site}} spent", "A"),
                _query(f"fedstudy_site_epsilon_budget{{{SEL}}}", "{{site}} budget", "B"),
            )
        )
        .with_row(dash.Row("Updates and traffic"))
        .with_panel(
            _timeseries(
                "Refused updates by reason",
                "Updates refused per reason, and calls refused before any protocol check "
                "(a certificate for another site), over the rate interval.",
                "none",
                _query(
                    f"sum by (reason) (increase(fedstudy_updates_refused_total{{{SEL}}}[{rate}]))",
                    "{{reason}}",
                    "A",
                ),
                _query(
                    "sum by (reason, rpc) "
                    f"(increase(fedstudy_calls_refused_total{{{SEL}}}[{rate}]))",
                    "{{reason}} ({{rpc}} call)",
                    "B",
                ),
            )
        )
        .with_panel(
            _timeseries(
                "Accepted updates per site",
                "Updates accepted per site, over the rate interval.",
                "none",
                _query(
                    f"sum by (site) (increase(fedstudy_updates_accepted_total{{{SEL}}}[{rate}]))",
                    "{{site}}",
                    "A",
                ),
            )
        )
        .with_panel(
            _timeseries(
                "Traffic per site",
                "Bytes per second of updates received from, and models sent to, each site.",
                "Bps",
                _query(
                    f"sum by (site) (rate(fedstudy_received_bytes_total{{{SEL}}}[{rate}]))",
                    "{{site}} received",
                    "A",
                ),
                _query(
                    f"sum by (site) (rate(fedstudy_sent_bytes_total{{{SEL}}}[{rate}]))",
                    "{{site}} sent",
                    "B",
                ),
            )
        )
    )
    data: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return data


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    p.add_argument("--out", type=Path, default=OUTPUT, help=f"default {OUTPUT}")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python monitoring/build_dashboard.py")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
