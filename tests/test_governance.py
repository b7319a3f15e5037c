"""Study governance end to end, on one small real study run by ``fedstudy run``: the audit
trail (untouched it verifies; any changed byte, removed or swapped entry is found and named),
the model card's figures, the ONNX export and ``fedstudy predict``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from studyprocs import fedstudy

from fedstudy.audit import AUDIT_FILE, read_chain, verify
from fedstudy.modelcard import MODEL_CARD_FILE
from fedstudy.spec import load_study

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

IRB = {"protocol": "IRB-2026-0417", "approvedUntil": "2099-12-31"}
INTENDED_USE = "Research into federated models of tumour malignancy; not for patient care."


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The breast-cancer example made small (3 rounds of 5 steps), run once; its out folder."""
    pytest.importorskip("onnxruntime")
    work = tmp_path_factory.mktemp("governance")
    doc = yaml.safe_load((ROOT / "examples" / "breast-cancer.yaml").read_text())
    doc["spec"].update({"rounds": 3, "roundTimeoutSeconds": 60})
    doc["spec"]["training"]["localSteps"] = 5
    doc["spec"]["governance"] = {"irb": IRB, "intendedUse": INTENDED_USE}
    study = work / "study.yaml"
    study.write_text(yaml.safe_dump(doc))
    out = work / "out"
    r = fedstudy("run", str(study), "--out", str(out), "--progress", "plain")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "model.onnx: exported, checked on" in r.stdout
    return out


def summary_of(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


# --- the audit trail ----------------------------------------------------------------------


def test_the_untouched_trail_of_a_study_verifies(run: Path) -> None:
    head = summary_of(run)["audit"]["study_end_hash"]
    r = fedstudy("audit", "verify", str(run / AUDIT_FILE), "--head", head)
    assert r.returncode == 0, r.stderr
    assert "ok: " in r.stdout
    chain = read_chain((run / AUDIT_FILE).read_bytes())
    kinds = [e["event"] for e in chain.entries]
    assert kinds[0] == "study-start"
    assert kinds.count("site-joined") == 4
    assert kinds.count("round") == 3
    assert kinds[-1] == "study-end"
    start = chain.entries[0]
    assert start["irb"] == IRB
    for joined in (e for e in chain.entries if e["event"] == "site-joined"):
        assert joined["identity"] == "mutual-tls"
        assert len(joined["certificate_sha256"]) == 64


def test_a_changed_byte_anywhere_is_found_at_its_line(run: Path, tmp_path: Path) -> None:
    data = (run / AUDIT_FILE).read_bytes()
    line_of = np.cumsum([0, *(b == ord("\n") for b in data[:-1])]) + 1
    for pos in range(len(data)):
        changed = bytearray(data)
        changed[pos] ^= 0x01
        chain = read_chain(bytes(changed))
        n = len(chain.entries)
        found = chain.problem.line if chain.problem else (n + 1 if chain.torn else None)
        assert found == line_of[pos], f"byte {pos} changed: {chain.problem}"
    # The command names the entry too, and exits 1.
    changed = bytearray(data)
    pos = data.index(b'"samples":') + len('"samples":')
    changed[pos] = ord("9") if changed[pos] != ord("9") else ord("8")
    path = tmp_path / AUDIT_FILE
    path.write_bytes(bytes(changed))
    r = fedstudy("audit", "verify", str(path))
    assert r.returncode == 1
    assert f"broken at line {line_of[pos]} (round): its hash does not match" in r.stderr


def test_a_removed_entry_is_found_where_it_was(run: Path, tmp_path: Path) -> None:
    lines = (run / AUDIT_FILE).read_bytes().splitlines(keepends=True)
    head = summary_of(run)["audit"]["study_end_hash"]
    path = tmp_path / AUDIT_FILE
    for k in range(len(lines)):
        path.write_bytes(b"".join(lines[:k] + lines[k + 1 :]))
        verdict = verify(path, head=head)
        assert verdict.problem is not None, f"entry {k + 1} removed unnoticed"
        if k + 1 < len(lines):
            assert verdict.problem.line == k + 1
            assert "its prev does not match" in verdict.problem.why
        else:  # the last entry: only the anchor in summary.json shows it is gone
            assert f"no entry has the hash {head}" in verdict.problem.why


def test_two_swapped_entries_are_found_at_the_first(run: Path, tmp_path: Path) -> None:
    lines = (run / AUDIT_FILE).read_bytes().splitlines(keepends=True)
    path = tmp_path / AUDIT_FILE
    for k in range(len(lines) - 1):
        swapped = list(lines)
        swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
        path.write_bytes(b"".join(swapped))
        verdict = verify(path)
        assert verdict.problem is not None
        assert verdict.problem.line == k + 1
    r = fedstudy("audit", "verify", str(path))
    assert r.returncode == 1
    assert f"broken at line {len(lines) - 1} " in r.stderr


# --- the model card -----------------------------------------------------------------------


def _row(card: str, first_cell: str) -> list[str]:
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in the model card")


def test_the_model_card_holds_the_studys_own_figures(run: Path) -> None:
    card = (run / MODEL_CARD_FILE).read_text()
    summary = summary_of(run)
    assert card.startswith("# Model card: breast-cancer")
    assert INTENDED_USE in card
    assert f"protocol {IRB['protocol']}, approved until {IRB['approvedUntil']}" in card
    assert f"completed {summary['rounds_completed']} of {summary['rounds_planned']} rounds" in card
    assert summary["model"]["sha256"] in card
    assert summary["audit"]["study_end_hash"] in card
    assert f"{summary['model']['parameters']} parameters" in card
    assert "| strategy | fedavg |" in card
    assert "No differential privacy at the sites" in card
    sites = summary["sites"]
    train_total = sum(s["train_samples"] for s in sites.values())
    assert _row(card, "all sites")[1] == str(train_total)
    for name, s in sites.items():
        counts = _row(card, name)  # the first table with the site: sites and data
        assert counts[1:4] == [
            str(s["train_samples"]),
            str(s["test_samples"]),
            str(s["rounds_participated"]),
        ]
    perf = card[card.index("## Performance") :]
    header = _row(perf, "site")
    for name, s in sites.items():
        row = dict(zip(header, _row(perf, name), strict=True))
        for metric in ("auc", "accuracy", "loss"):
            assert row[f"federated {metric}"] == f"{s['federated'][metric]:.3f}"
        assert row["local-only auc"] == f"{s['local_only']['auc']:.3f}"
        change = s["federated"]["auc"] - s["local_only"]["auc"]
        assert row["change"] == f"{change:+.3f}"
    weighted = dict(zip(header, _row(perf, "weighted by test rows"), strict=True))
    assert weighted["federated auc"] == f"{summary['global']['weighted']['auc']:.3f}"
    limits = card[card.index("## Known limitations") :]
    for name, s in sites.items():
        small = f"Site {name} has only {s['test_samples']} test rows"
        assert (small in limits) == (s["test_samples"] < 50)
        worse = f"At site {name} the federated model's auc"
        assert (worse in limits) == (s["federated"]["auc"] < s["local_only"]["auc"])


# --- the export and fedstudy predict ------------------------------------------------------


def test_the_exported_model_is_the_studys_final_model(run: Path) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(run / "model.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    summary = summary_of(run)
    assert meta["study"] == "breast-cancer"
    assert meta["weights_sha256"] == summary["model"]["sha256"]
    assert meta["model_version"] == str(summary["rounds_completed"])
    assert len(json.loads(meta["feature_names"])) == 30


def test_predict_gives_the_pytorch_scores_of_the_sites_test_rows(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedstudy_trainer import predict
    from fedstudy_trainer.data import builtin_share, load_site_data
    from fedstudy_trainer.export import build_loaded, load_weights, torch_scores

    study_path = run.parent / "study.yaml"
    study = load_study(study_path)
    site = study.spec.site("west")
    data = load_site_data(study, "west", study_path.parent)
    assert data.transform is not None
    assert site.data.partition is not None
    raw = builtin_share("breast-cancer", "malignant", site.data.partition)
    features = data.transform.apply(raw, "west")
    picked = [int(np.argmin(np.abs(features - row).max(axis=1))) for row in data.X_test]
    csv = tmp_path / "west-test.csv"
    raw.iloc[picked].drop(columns=["malignant"]).to_csv(csv, index=False)

    weights, _ = load_weights(run / "model.safetensors")
    model = build_loaded(study, data.input_shape, weights)
    logit, prob = torch_scores(model, data.X_test)

    by_site = fedstudy(
        "predict", str(run / "model.onnx"), str(csv), "--study", str(study_path), "--site", "west"
    )
    assert by_site.returncode == 0, by_site.stderr
    scores = pd.read_csv(io.StringIO(by_site.stdout))
    assert np.abs(scores["logit"].to_numpy() - logit).max() <= 1e-5
    assert np.abs(scores["probability"].to_numpy() - prob).max() <= 1e-5
    # The preprocessing the site's trainer saved while it trained gives the same scores.
    saved = run / "state" / "sites" / "west" / "preprocessing.json"
    code = predict.main([str(run / "model.onnx"), str(csv), "--preprocessing", str(saved)])
    assert code == 0
    assert capsys.readouterr().out == by_site.stdout
