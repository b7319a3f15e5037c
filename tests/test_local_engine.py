"""Whole studies through ``fedstudy run`` and the real entry points, as processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.numpy import load_file
from studyprocs import fedstudy, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
HEART_DATA = ROOT.parent / "shared" / "data" / "heart-disease"

pytestmark = pytest.mark.slow


def small_study(tmp_path: Path, **spec_changes: Any) -> Path:
    """The breast-cancer example, made quick: fewer rounds and steps."""
    doc = yaml.safe_load((EXAMPLES / "breast-cancer.yaml").read_text())
    doc["spec"].update({"rounds": 4, "roundTimeoutSeconds": 60})
    doc["spec"]["training"]["localSteps"] = 5
    doc["spec"].update(spec_changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def check_outputs(out: Path, rounds: int, sites: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["rounds_completed"] == rounds
    assert set(summary["sites"]) == set(sites)
    lines = read_jsonl(out / "metrics.jsonl")
    counts = Counter((line["round"], line["site"]) for line in lines)
    assert counts == Counter({(r, s): 1 for r in range(1, rounds + 1) for s in sites})
    model = load_file(str(out / "model.safetensors"))
    assert model, "the final model is empty"
    return summary


def test_breast_cancer_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = fedstudy(
        "run", str(EXAMPLES / "breast-cancer.yaml"), "--out", str(out), "--progress", "plain"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 10, ["north", "south", "east", "west"])
    assert summary["global"]["weighted"]["auc"] >= 0.98
    for site in summary["sites"].values():
        assert site["train_samples"] > 0
        assert site["test_samples"] > 0
        assert "auc" in site["federated"]
        assert "auc" in site["local_only"]
    assert "local only vs federated" in r.stdout
    assert "round 10/10 complete" in r.stdout


@pytest.mark.skipif(
    not HEART_DATA.is_dir(),
    reason=f"the heart-disease data is not at "
    f"{HEART_DATA} (it ships in the shared folder beside the checkout)",
)
def test_heart_disease_four_real_hospitals(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = fedstudy(
        "run", str(EXAMPLES / "heart-disease.yaml"), "--out", str(out), "--progress", "plain"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 15, ["cleveland", "hungarian", "switzerland", "va"])
    sizes = {n: (s["train_samples"], s["test_samples"]) for n, s in summary["sites"].items()}
    assert sizes == {
        "cleveland": (199, 104),
        "hungarian": (172, 89),
        "switzerland": (30, 16),
        "va": (85, 45),
    }
    # FLamby's published FedAvg figure is 0.685 (mean over hospitals and 5 seeds).
    assert abs(summary["global"]["site_mean"]["accuracy"] - 0.685) <= 0.03


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedprox", "mu": 0.01},
        {"name": "fedadam", "serverLearningRate": 0.05},
        {"name": "fedyogi", "serverLearningRate": 0.05},
    ],
)
def test_each_strategy_runs_a_study(tmp_path: Path, strategy: dict[str, Any]) -> None:
    study = small_study(tmp_path, strategy=strategy)
    out = tmp_path / "out"
    r = fedstudy("run", str(study), "--out", str(out), "--progress", "plain")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = check_outputs(out, 4, ["north", "south", "east", "west"])
    assert summary["strategy"] == strategy["name"]
    assert summary["global"]["weighted"]["auc"] > 0.9


def test_bad_study_fails_before_starting_anything(tmp_path: Path) -> None:
    path = small_study(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["sites"][2]["data"] = {"format": "csv", "path": str(tmp_path / "missing.csv")}
    path.write_text(yaml.safe_dump(doc))
    r = fedstudy("run", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert f"spec.sites[2].data.path: no such file: {tmp_path}/missing.csv" in r.stderr
    assert not (tmp_path / "out").exists()


def test_expired_irb_stops_the_run(tmp_path: Path) -> None:
    study = small_study(
        tmp_path, governance={"irb": {"protocol": "IRB-2020-7", "approvedUntil": "2021-01-01"}}
    )
    r = fedstudy("run", str(study), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "IRB approval of protocol IRB-2020-7 expired on 2021-01-01" in r.stderr


RUN_MARK = "FEDSTUDY_TEST_RUN"


def _run_env(tag: Path) -> dict[str, str]:
    """The environment of a ``fedstudy run`` whose processes ``_processes_of(tag)`` finds."""
    return dict(os.environ, **{RUN_MARK: str(tag)})


@dataclass
class Proc:
    pid: int
    ppid: int
    cmdline: str
    stdout: str  # where its fd 1 points


def _processes_of(tag: Path) -> dict[int, Proc]:
    """The processes of the run started with ``_run_env(tag)``, however far down: each
    inherits the environment it was started with (forked children, their server's)."""
    needle = f"{RUN_MARK}={tag}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stdout = os.readlink(entry / "fd" / "1")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found[int(entry.name)] = Proc(int(entry.name), ppid, cmd, stdout)
    return found


def _wait_gone(tag: Path, timeout: float = 15) -> list[Proc]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _processes_of(tag)
        if not left:
            return []
        time.sleep(0.1)
    return list(_processes_of(tag).values())


def _trainers(tag: Path, out: Path) -> list[Proc]:
    return [p for p in _processes_of(tag).values() if p.stdout.startswith(f"{out}/logs/trainer-")]


def _start_run(tag: Path, study: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    """``fedstudy run`` in a session of its own (a Ctrl-C goes to its whole group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedstudy", "run", str(study), "--out", str(out), "--progress",
         "plain", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_run_env(tag),
        start_new_session=True,
    )  # fmt: skip


def _wait_trainers(tag: Path, out: Path, count: int) -> list[Proc]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_trainers(tag, out)) < count:
        time.sleep(0.1)
    found = _trainers(tag, out)
    assert len(found) == count, f"the trainers did not start: {_processes_of(tag)}"
    return found


MODES = pytest.mark.parametrize("mode", [[], ["--isolated-processes"]], ids=["forked", "isolated"])


@MODES
def test_a_failing_trainer_stops_everything(tmp_path: Path, mode: list[str]) -> None:
    table = tmp_path / "site.csv"
    table.write_text("a,b\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    doc = yaml.safe_load((EXAMPLES / "breast-cancer.yaml").read_text())
    # One site's table lacks the label column: its trainer fails with a clear error.
    doc["spec"]["sites"][1]["data"] = {"format": "csv", "path": str(table)}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    r = fedstudy(
        "run", str(path), "--out", str(out), "--progress", "plain", *mode, env=_run_env(tmp_path)
    )
    assert r.returncode == 1
    # The trainer's exit code (2: the data was refused) and the tail of its log.
    assert "trainer-south exited with code 2:" in r.stderr
    assert "malignant" in r.stderr  # the missing label column is named
    assert "Traceback" not in r.stderr
    assert _wait_gone(tmp_path) == []


def test_trainers_are_forked_from_one_preloaded_process(tmp_path: Path) -> None:
    study = small_study(tmp_path, rounds=500)
    out = tmp_path / "out"
    proc = _start_run(tmp_path, study, out)
    try:
        trainers = _wait_trainers(tmp_path, out, 4)
        # No fresh interpreter per site: one parent, the fork server, a child of the engine.
        assert {p.ppid for p in trainers} != {proc.pid}
        assert len({p.ppid for p in trainers}) == 1
        server = _processes_of(tmp_path)[trainers[0].ppid]
        assert server.ppid == proc.pid
        assert "from fedstudy.launch import serve" in server.cmdline
        assert "fedstudy_trainer.main" in server.cmdline  # what it imported before forking
        # It forks with one thread: no PyTorch thread pool, no gRPC runtime (pyarrow's
        # jemalloc keeps a background thread, which its fork handlers allow for).
        tasks = Path(f"/proc/{server.pid}/task")
        threads = sorted((t / "comm").read_text().strip() for t in tasks.iterdir())
        assert threads.count("python") == 1, threads
        assert set(threads) <= {"python", "jemalloc_bg_thd"}, threads
        for t in trainers:
            assert "fedstudy trainer" not in t.cmdline
        sites = sorted(Path(t.stdout).name for t in trainers)
        assert sites == [f"trainer-{s}.log" for s in ("east", "north", "south", "west")]
        # The aggregator is a process of its own.
        (agg,) = [p for p in _processes_of(tmp_path).values() if "fedstudy aggregator" in p.cmdline]
        assert agg.ppid == proc.pid
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert _wait_gone(tmp_path) == []


def test_isolated_processes_start_a_fresh_interpreter_per_trainer(tmp_path: Path) -> None:
    study = small_study(tmp_path, rounds=500)
    out = tmp_path / "out"
    proc = _start_run(tmp_path, study, out, "--isolated-processes")
    try:
        trainers = _wait_trainers(tmp_path, out, 4)
        assert {p.ppid for p in trainers} == {proc.pid}
        for t in trainers:
            assert "-m fedstudy trainer --study" in t.cmdline
        assert not any("fedstudy.launch" in p.cmdline for p in _processes_of(tmp_path).values())
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert _wait_gone(tmp_path) == []


@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ([], "ctrl-c"),
        ([], "sigint"),
        ([], "sigterm"),
        ([], "sigkill"),
        (["--isolated-processes"], "ctrl-c"),
        (["--isolated-processes"], "sigterm"),
    ],
)
def test_stopping_the_run_leaves_no_process_behind(
    tmp_path: Path, mode: list[str], how: str
) -> None:
    study = small_study(tmp_path, rounds=500)
    out = tmp_path / "out"
    proc = _start_run(tmp_path, study, out, *mode)
    _wait_trainers(tmp_path, out, 4)
    time.sleep(1)
    if how == "ctrl-c":  # a terminal's Ctrl-C: SIGINT to every process of the group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        signals = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
        proc.send_signal(signals[how])  # to the engine alone
    _, err = proc.communicate(timeout=30)
    if how == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "interrupted: stopped the aggregator and every trainer" in err
    assert _wait_gone(tmp_path) == []


def test_isolated_processes_give_the_same_study(tmp_path: Path) -> None:
    study = small_study(tmp_path)
    results = {}
    for name, mode in (("forked", []), ("isolated", ["--isolated-processes"])):
        out = tmp_path / name
        r = fedstudy("run", str(study), "--out", str(out), "--progress", "plain", *mode)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{out}/model.onnx: exported, checked on 173 test rows of 4 sites" in r.stdout
        assert f"report: {out}/report.md" in r.stdout
        results[name] = check_outputs(out, 4, ["north", "south", "east", "west"])
    # The same training; the aggregator sums the updates in the order they arrive, so the
    # last bits may differ.
    forked, isolated = (results[n]["global"]["site_mean"] for n in ("forked", "isolated"))
    assert forked.keys() == isolated.keys()
    for k in forked:
        assert forked[k] == pytest.approx(isolated[k], rel=1e-6), k
