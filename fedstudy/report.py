"""The study report: ``report.md`` and its plots, written into a study's output folder.

Built from the two files the aggregator leaves there, ``summary.json`` (the final metrics,
local-only and federated, per site) and ``metrics.jsonl`` (one line per site per round).
``fedstudy run`` writes it at the end of a study; ``fedstudy report OUT_DIR`` writes it again.
The plots need matplotlib (``pip install 'fedstudy[report]'``); without it the report holds
the tables only and says so.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_FILE = "report.md"
PLOT_DIR = "report"
# Every plot has the same size in pixels: FIG_INCHES at FIG_DPI.
FIG_INCHES = (8.0, 4.5)
FIG_DPI = 100
PLOT_PIXELS = (int(FIG_INCHES[0] * FIG_DPI), int(FIG_INCHES[1] * FIG_DPI))
EPSILON_KEY = "epsilon"
# The metric to plot when none is given: the first one the sites reported, in this order.
METRIC_PREFERENCE = ("auc", "accuracy", "loss")


class ReportError(Exception):
    """The output folder lacks a readable summary.json or metrics.jsonl."""


@dataclass
class StudyOutputs:
    summary: dict[str, Any]
    lines: list[dict[str, Any]]

    @property
    def sites(self) -> list[str]:
        names = list((self.summary.get("sites") or {}).keys())
        for line in self.lines:
            if line.get("site") not in names:
                names.append(str(line.get("site")))
        return names

    @property
    def rounds(self) -> list[int]:
        return sorted({int(line["round"]) for line in self.lines if "round" in line})


def load_outputs(out_dir: Path) -> StudyOutputs:
    """Reads ``summary.json`` and ``metrics.jsonl`` from ``out_dir``."""
    summary_path = out_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{summary_path}: no such file (has the study finished?)") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"{summary_path}: cannot read it: {e}") from None
    if not isinstance(summary, dict):
        raise ReportError(f"{summary_path}: not a JSON object")
    lines_path = out_dir / "metrics.jsonl"
    lines: list[dict[str, Any]] = []
    try:
        text = lines_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise ReportError(f"{lines_path}: cannot read it: {e}") from None
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            raise ReportError(f"{lines_path}:{n}: not JSON: {e}") from None
        if isinstance(line, dict) and "round" in line and "site" in line:
            lines.append(line)
    return StudyOutputs(summary, lines)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def choose_metric(outputs: StudyOutputs) -> str:
    """The metric to show when the caller names none."""
    seen: set[str] = set()
    for site in (outputs.summary.get("sites") or {}).values():
        seen.update((site.get("federated") or {}).keys())
    for line in outputs.lines:
        seen.update(line.keys())
    for name in METRIC_PREFERENCE:
        if name in seen:
            return name
    return "loss"


def per_site_series(outputs: StudyOutputs, key: str) -> dict[str, list[tuple[int, float]]]:
    """site -> [(round, value)] for the rounds where the site reported ``key``."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in outputs.lines:
        v = _number(line.get(key))
        if v is not None:
            series.setdefault(str(line["site"]), []).append((int(line["round"]), v))
    return {s: sorted(points) for s, points in series.items()}


def global_series(outputs: StudyOutputs, key: str) -> list[tuple[int, float, float]]:
    """[(round, weighted by test rows, mean over sites)] of ``key``, as the aggregator
    combines the sites' evaluations."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for line in outputs.lines:
        v = _number(line.get(key))
        if v is None:
            continue
        w = _number(line.get("test_samples")) or 0.0
        by_round.setdefault(int(line["round"]), []).append((v, w))
    out = []
    for r in sorted(by_round):
        values = by_round[r]
        total = sum(w for _, w in values)
        mean = sum(v for v, _ in values) / len(values)
        weighted = sum(v * w for v, w in values) / total if total > 0 else mean
        out.append((r, weighted, mean))
    return out


def _fmt(v: Any) -> str:
    n = _number(v)
    return "-" if n is None else f"{n:.3f}"


# ---------------------------------------------------------------------------- plots


def import_plotting() -> None:
    """Imports matplotlib now (a few tenths of a second), if it can, so that ``write_report``
    later only draws: ``fedstudy run`` calls it while it waits on other work."""
    with contextlib.suppress(Exception):  # write_report says what is wrong, if anything
        _pyplot()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(
    outputs: StudyOutputs, metric: str, plot_dir: Path, epsilon_budget: float | None
) -> list[tuple[str, str]]:
    """Draws the plots into ``plot_dir``; returns [(title, file name)]."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    plot_dir.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.savefig(plot_dir / name, dpi=FIG_DPI, format="png")
        plt.close(fig)
        made.append((title, name))

    def figure(by_round: bool = True) -> tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=FIG_INCHES, dpi=FIG_DPI, layout="constrained")
        ax.grid(True, alpha=0.3)
        if by_round:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    glob = global_series(outputs, metric)
    if glob:
        fig, ax = figure()
        rounds = [r for r, _, _ in glob]
        ax.plot(rounds, [w for _, w, _ in glob], marker="o", label="weighted by test rows")
        ax.plot(rounds, [m for _, _, m in glob], marker="s", linestyle="--", label="site mean")
        ax.set(xlabel="round", ylabel=metric, title=f"Global {metric} per round")
        ax.legend()
        save(fig, "global.png", f"Global {metric} per round")

    sites = per_site_series(outputs, metric)
    if sites:
        fig, ax = figure()
        for site in [s for s in outputs.sites if s in sites]:
            pts = sites[site]
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=site)
        ax.set(xlabel="round", ylabel=metric, title=f"{metric} per site per round")
        ax.legend()
        save(fig, "sites.png", f"{metric} per site per round")

    eps = per_site_series(outputs, EPSILON_KEY)
    if eps:
        fig, ax = figure()
        for site in [s for s in outputs.sites if s in eps]:
            pts = eps[site]
            ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label=site)
        if epsilon_budget is not None:
            ax.axhline(epsilon_budget, color="red", linestyle="--", label="budget")
        ax.set(xlabel="round", ylabel="ε spent", title="Privacy budget spent per site (ε)")
        ax.legend()
        save(fig, "epsilon.png", "Privacy budget spent per site (ε)")

    rows = _comparison(outputs, metric)
    if any(loc is not None or fed is not None for _, loc, fed in rows):
        fig, ax = figure(by_round=False)
        x = list(range(len(rows)))
        width = 0.4
        loc_v = [loc if loc is not None else 0.0 for _, loc, _ in rows]
        fed_v = [fed if fed is not None else 0.0 for _, _, fed in rows]
        ax.bar([i - width / 2 for i in x], loc_v, width, label="local only")
        ax.bar([i + width / 2 for i in x], fed_v, width, label="federated")
        ax.set_xticks(x, [name for name, _, _ in rows])
        ax.set(ylabel=metric, title=f"Local only vs federated ({metric}, each site's test split)")
        ax.legend()
        save(fig, "local-vs-federated.png", f"Local only vs federated ({metric})")
    return made


def _comparison(outputs: StudyOutputs, metric: str) -> list[tuple[str, float | None, float | None]]:
    rows = []
    for name, s in (outputs.summary.get("sites") or {}).items():
        loc = _number((s.get("local_only") or {}).get(metric))
        fed = _number((s.get("federated") or {}).get(metric))
        rows.append((str(name), loc, fed))
    return rows


# ---------------------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def render_markdown(
    outputs: StudyOutputs,
    metric: str,
    plots: Sequence[tuple[str, str]],
    plot_note: str | None = None,
) -> str:
    s = outputs.summary
    name = s.get("study", "study")
    state = "completed" if s.get("completed") else f"ended early: {s.get('ended_reason')}"
    lines = [
        f"# Study report: {name}",
        "",
        f"- State: {state}",
        f"- Rounds: {s.get('rounds_completed')} of {s.get('rounds_planned')}",
        f"- Strategy: {s.get('strategy')}",
        f"- Metric: {metric}",
    ]
    g = s.get("global") or {}
    weighted = (g.get("weighted") or {}).get(metric)
    mean = (g.get("site_mean") or {}).get(metric)
    lines += [
        f"- Final global {metric}: {_fmt(weighted)} weighted by test rows, "
        f"{_fmt(mean)} mean over sites",
    ]
    refused = s.get("refused_updates") or {}
    if refused:
        lines.append(
            "- Refused updates: " + ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
        )
    lines += ["", f"## Local only vs federated ({metric} on each site's test split)", ""]
    rows = []
    sites = s.get("sites") or {}
    for site, (_, loc, fed) in zip(sites, _comparison(outputs, metric), strict=True):
        info = sites[site]
        change = f"{fed - loc:+.3f}" if loc is not None and fed is not None else "-"
        rows.append(
            [
                site,
                str(info.get("train_samples", "-")),
                str(info.get("test_samples", "-")),
                _fmt(loc),
                _fmt(fed),
                change,
            ]
        )
    lines += _table(["site", "train rows", "test rows", "local only", "federated", "change"], rows)
    eps = per_site_series(outputs, EPSILON_KEY)
    if eps:
        lines += ["", "## Privacy budget spent (ε, last report)", ""]
        lines += _table(["site", "ε"], [[site, f"{pts[-1][1]:.3f}"] for site, pts in eps.items()])
    lines += ["", "## Plots", ""]
    if plot_note:
        lines += [plot_note, ""]
    for title, file in plots:
        lines += [f"### {title}", "", f"![{title}]({PLOT_DIR}/{file})", ""]
    if not plots and not plot_note:
        lines += ["No per-round metrics to plot (metrics.jsonl is empty).", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(
    out_dir: Path,
    metric: str | None = None,
    epsilon_budget: float | None = None,
    *,
    plots: bool = True,
) -> Path:
    """Writes ``report.md`` (and ``report/*.png``) into ``out_dir``; returns its path."""
    outputs = load_outputs(out_dir)
    metric = metric or choose_metric(outputs)
    plot_dir = out_dir / PLOT_DIR
    for old in plot_dir.glob("*.png"):
        old.unlink()
    made: list[tuple[str, str]] = []
    note = None
    if plots:
        try:
            made = _plots(outputs, metric, plot_dir, epsilon_budget)
        except ImportError:
            note = (
                "Plots need matplotlib: `pip install 'fedstudy[report]'`, "
                "then run `fedstudy report`."
            )
    else:
        note = "Plots were not drawn."
    path = out_dir / REPORT_FILE
    path.write_text(render_markdown(outputs, metric, made, note), encoding="utf-8")
    return path


def epsilon_budget_of(spec: object) -> float | None:
    """The study's ``privacy.targetEpsilon``, if it has one."""
    target = getattr(getattr(spec, "privacy", None), "targetEpsilon", None)
    return _number(target)
