"""The model card: ``model-card.md``, written next to ``summary.json`` at the end of a study.

It is generated from two things only, the study document and ``summary.json``: what the
study set out to do (task, model, strategy, privacy, IRB protocol) and what happened (sites
and their sample counts, rounds, ε spent, each site's metrics of the federated and of its
local-only model). Its limitations are derived from the same figures: small test splits,
sites that left or missed rounds, no differential privacy, sites where federation did worse
than training alone. No patient data and nothing that is not in those two sources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedstudy.spec import FederatedStudy, StudySpec

MODEL_CARD_FILE = "model-card.md"
# A site whose test split has fewer rows than this gets a limitation of its own.
SMALL_TEST_ROWS = 50
METRIC_ORDER = ("auc", "accuracy", "loss")


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _metrics_of(summary: Mapping[str, Any]) -> list[str]:
    """The metric names the sites reported, in a fixed order (ε and δ are not metrics)."""
    seen: set[str] = set()
    for site in (summary.get("sites") or {}).values():
        for part in ("federated", "local_only"):
            seen.update(k for k in (site.get(part) or {}) if k not in ("epsilon", "delta"))
    return [m for m in METRIC_ORDER if m in seen] + sorted(seen - set(METRIC_ORDER))


def _better(metric: str, a: float, b: float) -> bool:
    """Whether ``a`` is better than ``b`` for ``metric`` (a loss is better lower)."""
    return a < b if metric == "loss" else a > b


def _model_line(spec: StudySpec) -> str:
    m = spec.model
    if m.name == "mlp":
        return f"mlp, hidden layers {list(m.hidden)}, dropout {m.dropout:g}"
    if m.channels:
        return f"{m.name}, channels {list(m.channels)}, normalisation {m.norm}"
    return m.name


def _strategy_line(spec: StudySpec) -> str:
    st = spec.strategy
    fields = {
        k: v
        for k, v in st.model_dump(exclude_defaults=True).items()
        if k != "name" and v is not None
    }
    return st.name + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(fields.items())) + ")" if fields else ""
    )


def _preprocessing_lines(spec: StudySpec) -> list[str]:
    pre = spec.preprocessing
    if pre.image is not None:
        img = pre.image
        return [
            f"- Images: {img.model_dump(exclude_defaults=True) or 'default settings'} "
            "(spec.preprocessing.image), the same at every site.",
            f"- Each site splits its own rows: test fraction {pre.testFraction:g}, split seed "
            f"{pre.splitSeed}.",
        ]
    lines = []
    if pre.drop:
        lines.append(f"- Columns left out: {', '.join(pre.drop)}.")
    if pre.categorical:
        cats = "; ".join(f"{c}: {list(levels)}" for c, levels in pre.categorical.items())
        lines.append(f"- One-hot columns with declared levels: {cats}.")
    lines.append(
        "- Missing values: "
        + (
            "rows with one are dropped."
            if pre.missing == "drop-rows"
            else "filled with the site's training mean."
        )
    )
    if pre.standardize:
        lines.append(
            "- Every feature is standardised at each site with the mean and standard deviation "
            "of that site's own training rows: the model expects inputs standardised the same "
            "way, so scoring new rows needs a site's preprocessing (`fedstudy predict --study "
            "... --site ...`)."
        )
    else:
        lines.append("- Features are not standardised.")
    lines.append(
        f"- Each site splits its own rows: test fraction {pre.testFraction:g}, split seed "
        f"{pre.splitSeed}, {'stratified by label' if pre.stratify else 'not stratified'}."
    )
    return lines


def _limitations(study: FederatedStudy, summary: Mapping[str, Any], metric: str) -> list[str]:
    spec = study.spec
    sites: Mapping[str, Any] = summary.get("sites") or {}
    done = int(summary.get("rounds_completed") or 0)
    out = [
        "Every figure here comes from held-out splits of the training sites' own data; the "
        "model has not been evaluated on data from any other site or period."
    ]
    if not summary.get("completed"):
        out.append(
            f"The study ended early, after {done} of {summary.get('rounds_planned')} rounds: "
            f"{summary.get('ended_reason')}."
        )
    for name, s in sites.items():
        test = s.get("test_samples")
        if isinstance(test, int) and test < SMALL_TEST_ROWS:
            out.append(
                f"Site {name} has only {test} test rows: its figures rest on few patients and "
                "could change much with other ones."
            )
        if s.get("left"):
            out.append(f"Site {name} left the study ({s['left']}).")
        took = s.get("rounds_participated")
        if isinstance(took, int) and took < done:
            out.append(f"Site {name} took part in {took} of the {done} completed rounds.")
        fed = s.get("federated") or {}
        if not fed:
            out.append(f"Site {name} did not evaluate the final model.")
        elif _number(fed.get(metric)) is None:
            out.append(f"The {metric} of the final model at site {name} is undefined.")
    if spec.privacy is None:
        out.append(
            "No differential privacy at the sites (spec.privacy is not set): the weights carry "
            "no formal bound on what they reveal about any one patient."
        )
    if not spec.localBaseline:
        out.append("No local-only models were trained (spec.localBaseline is false).")
    elif sites and not any(s.get("local_only") for s in sites.values()):
        why = " (none is trained under DP-SGD)" if spec.privacy is not None else ""
        out.append(f"No site reported a local-only model{why}: federation is not compared.")
    for name, s in sites.items():
        fed = _number((s.get("federated") or {}).get(metric))
        loc = _number((s.get("local_only") or {}).get(metric))
        if fed is not None and loc is not None and _better(metric, loc, fed):
            out.append(
                f"At site {name} the federated model's {metric} ({fed:.3f}) is worse than that "
                f"of a model trained on the site's data alone ({loc:.3f})."
            )
    refused = summary.get("refused_updates") or {}
    if refused:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
        out.append(f"Updates were refused during the study ({shown}).")
    return out


def model_card(study: FederatedStudy, summary: Mapping[str, Any]) -> str:
    """The model card's Markdown text."""
    spec = study.spec
    sites: Mapping[str, Any] = summary.get("sites") or {}
    metric = spec.task.metric
    done = summary.get("rounds_completed")
    model = summary.get("model") or {}
    audit = summary.get("audit") or {}
    irb = spec.governance.irb

    lines = [f"# Model card: {study.name}", ""]
    lines.append(
        "Generated at the end of the study from the study document and `summary.json`; every "
        "figure below comes from those two."
    )
    lines.append("")
    status = (
        f"completed {done} of {summary.get('rounds_planned')} rounds"
        if summary.get("completed")
        else f"ended early after {done} of {summary.get('rounds_planned')} rounds"
    )
    facts = [("study", study.name), ("status", status)]
    if model:
        facts.append(
            (
                "model",
                f"`{model.get('file')}`, {model.get('parameters')} parameters, "
                f"SHA-256 of the weights `{model.get('sha256')}`",
            )
        )
    if audit:
        facts.append(
            (
                "audit trail",
                f"`{audit.get('file')}`, study-end entry {audit.get('study_end_seq')}, hash "
                f"`{audit.get('study_end_hash')}` (`fedstudy audit verify`)",
            )
        )
    facts.append(
        (
            "IRB",
            f"protocol {irb.protocol}, approved until {irb.approvedUntil.isoformat()}"
            if irb is not None
            else "none recorded in the study document (spec.governance.irb)",
        )
    )
    lines += _table(["", ""], [[k, v] for k, v in facts])

    lines += ["", "## Intended use", ""]
    intended = spec.governance.intendedUse
    if intended:
        lines.append(intended.strip())
    else:
        lines.append("The study document states none (spec.governance.intendedUse).")
    lines.append("")
    lines.append(
        "The model comes from a research study; nothing in the study validates it for "
        "decisions about individual patients."
    )

    task = spec.task
    label = (
        f"`{task.label}` (positive when above {task.binarize.above:g})"
        if task.binarize is not None
        else f"`{task.label}` (0 or 1)"
    )
    lines += ["", "## Task", ""]
    lines.append(
        f"Binary classification of {label}. The model gives one logit per example; the "
        f"probability is its logistic function. The study's metric is {metric}."
    )

    lines += ["", "## Sites and data", ""]
    lines.append("Patient data stayed at each site; these are counts of rows, nothing more.")
    lines.append("")
    rows = []
    for name, s in sites.items():
        rows.append(
            [
                name,
                _fmt(s.get("train_samples")),
                _fmt(s.get("test_samples")),
                _fmt(s.get("rounds_participated")),
                str(s.get("left") or ""),
            ]
        )
    train_total = sum(s.get("train_samples") or 0 for s in sites.values())
    test_total = sum(s.get("test_samples") or 0 for s in sites.values())
    rows.append(["all sites", str(train_total), str(test_total), "", ""])
    lines += _table(["site", "train rows", "test rows", "rounds taken part in", "left"], rows)
    lines += ["", *_preprocessing_lines(spec)]

    tr = spec.training
    lines += ["", "## Training", ""]
    lines += _table(
        ["", ""],
        [
            ["model", _model_line(spec)],
            ["parameters", _fmt(model.get("parameters"))],
            ["strategy", _strategy_line(spec)],
            [
                "rounds",
                f"{summary.get('rounds_planned')} planned, {done} completed; a round needs "
                f"{spec.minSites} sites and closes after {spec.roundTimeoutSeconds:g} s",
            ],
            [
                "local training",
                f"{tr.localSteps} steps per round, batch {tr.batchSize}, {tr.optimizer}, "
                f"learning rate {tr.learningRate:g}",
            ],
            ["seed", str(spec.seed)],
        ],
    )

    lines += ["", "## Privacy", ""]
    if spec.privacy is not None:
        p = spec.privacy
        lines.append(
            f"DP-SGD at each site (Opacus): target ε {p.targetEpsilon:g} at δ {p.delta:g}, "
            f"gradients clipped to {p.maxGradNorm:g}. The ε each site reported it spent:"
        )
        lines.append("")
        lines += _table(
            ["site", "ε spent", "δ"],
            [[n, _fmt(s.get("epsilon")), f"{p.delta:g}"] for n, s in sites.items()],
        )
    else:
        lines.append("No differential privacy at the sites (spec.privacy is not set).")
    server = summary.get("server_privacy")
    if spec.serverPrivacy is not None and isinstance(server, Mapping):
        lines.append("")
        lines.append(
            f"Server-side DP (DP-FedAvg): ε {_fmt(server.get('epsilon'))} at δ "
            f"{_number(server.get('delta')) or 0:g} after {server.get('rounds')} rounds, noise "
            f"multiplier {_fmt(server.get('noise_multiplier'))}, each site's update clipped "
            f"to {_fmt(server.get('clip_norm'))}; a guarantee per site, apart from the above."
        )

    metrics = _metrics_of(summary)
    lines += ["", "## Performance", ""]
    lines.append(
        "Each site evaluated the final global model on its own test split. The local-only "
        "model of a site is trained on that site's data alone with the same budget (rounds "
        "times local steps)."
    )
    lines.append("")
    header = ["site", "test rows", *(f"federated {m}" for m in metrics)]
    header += [f"local-only {metric}", "change"]
    rows = []
    for name, s in sites.items():
        fed = s.get("federated") or {}
        loc = _number((s.get("local_only") or {}).get(metric))
        f = _number(fed.get(metric))
        change = f"{f - loc:+.3f}" if f is not None and loc is not None else "n/a"
        rows.append(
            [
                name,
                _fmt(s.get("test_samples")),
                *(_fmt(fed.get(m)) for m in metrics),
                _fmt(loc),
                change,
            ]
        )
    glob = summary.get("global") or {}
    for label_, key in (("weighted by test rows", "weighted"), ("mean over sites", "site_mean")):
        g = glob.get(key) or {}
        rows.append([label_, "", *(_fmt(g.get(m)) for m in metrics), "", ""])
    lines += _table(header, rows)

    lines += ["", "## Known limitations", ""]
    lines += [f"- {item}" for item in _limitations(study, summary, metric)]
    lines.append("")
    return "\n".join(lines)
