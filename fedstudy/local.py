"""The local engine: ``fedstudy run study.yaml`` runs a whole study on this machine.

It starts the very entry points the operator puts in pods (``fedstudy aggregator`` and one
``fedstudy trainer`` per site) as processes on loopback, shows progress from the
aggregator's ``/status``, and stops everything when one of them fails or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedstudy.certs import init_ca_dir, issue_cert, read_credentials, write_credentials
from fedstudy.launch import ChildProcess, Launcher
from fedstudy.report import ReportError, epsilon_budget_of, import_plotting, write_report
from fedstudy.spec import FederatedStudy, StudyError, check_irb, check_local_files, load_study

OUTPUT_FILES = (
    "model.safetensors",
    "metrics.jsonl",
    "summary.json",
    "model-card.md",
    "audit.jsonl",
    "model.onnx",
)
EXPORT_TIMEOUT_S = 600.0
# fedstudy export's exit codes when onnx or onnxruntime is not installed, and when the
# study's model has no ONNX export (xgboost trees, say): the run goes on without model.onnx.
EXPORT_SKIPPED = (3, 4)
STARTUP_TIMEOUT_S = 60.0
# How often the engine asks the aggregator's /status (it notices the aggregator's exit at once).
POLL_S = 0.25


class StudyFailed(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: ChildProcess
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    """Starts and watches the study's processes; ``stop`` leaves none behind."""

    log_dir: Path
    launcher: Launcher = field(default_factory=lambda: Launcher(forked=False))
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        child = Child(name, self.launcher.start(args, log_path), log_path)
        self.children.append(child)
        return child

    def failed(self) -> Child | None:
        for c in self.children:
            rc = c.proc.poll()
            if rc is not None and rc != 0:
                return c
        return None

    def stop(self, grace_s: float = 5.0) -> None:
        for c in self.children:
            c.proc.terminate()
        deadline = time.monotonic() + grace_s
        for c in self.children:
            if c.proc.wait(timeout=max(0.0, deadline - time.monotonic())) is None:
                c.proc.kill()
                c.proc.wait()
            c.proc.close()


def _get_status(http_addr: str, timeout: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{http_addr}/status", timeout=timeout) as r:
            data: dict[str, Any] = json.load(r)
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


class Progress:
    """Live table in a terminal, one plain line per completed round otherwise."""

    def __init__(self, study: FederatedStudy, mode: str, console: Console) -> None:
        self.study = study
        self.metric = study.spec.task.metric
        self.console = console
        self.live_mode = mode == "live" or (mode == "auto" and console.is_terminal)
        self.live: Live | None = None
        self._last_round = -1
        self._last_state = ""

    def __enter__(self) -> Progress:
        if self.live_mode:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, status: dict[str, Any]) -> None:
        if self.live is not None:
            self.live.update(self._table(status))
            return
        done = int(status.get("completed_rounds", 0))
        state = str(status.get("state", ""))
        if state != self._last_state and state in ("waiting", "finishing"):
            self.console.print(f"study {self.study.name}: {state}")
        self._last_state = state
        if done > self._last_round:
            if done > 0:
                g = status.get("global") or {}
                metrics = " ".join(f"{k} {_fmt(v)}" for k, v in sorted(g.items()))
                self.console.print(
                    f"round {done}/{status.get('planned_rounds')} complete"
                    + (f": global {metrics}" if metrics else "")
                )
            self._last_round = done

    def finish(self, summary: dict[str, Any]) -> None:
        """The last rounds' line from the summary, where the study ended between two polls
        of /status (plain lines only; a live table has shown its last state)."""
        if self.live_mode:
            return
        weighted = (summary.get("global") or {}).get("weighted") or {}
        self.update(
            {
                "completed_rounds": summary.get("rounds_completed", 0),
                "planned_rounds": summary.get("rounds_planned"),
                "global": weighted,
                "state": "done",
            }
        )

    def _table(self, status: dict[str, Any]) -> Table:
        spec = self.study.spec
        title = (
            f"{self.study.name}: {status.get('state')} - round "
            f"{status.get('completed_rounds')}/{status.get('planned_rounds')} done, "
            f"{len(status.get('joined', []))}/{len(spec.sites)} sites joined"
        )
        table = Table(title=title, title_justify="left")
        for col in ("site", "joined", "last round", "train rows", "loss", "auc", "accuracy"):
            table.add_column(col, justify="left" if col == "site" else "right")
        sites: dict[str, Any] = status.get("sites", {})
        for s in spec.sites:
            info = sites.get(s.name, {})
            m = info.get("metrics") or {}
            table.add_row(
                s.name,
                "yes" if info.get("joined") else "no",
                _fmt(info.get("last_round")),
                _fmt(info.get("train_samples")),
                _fmt(m.get("loss")),
                _fmt(m.get("auc")),
                _fmt(m.get("accuracy")),
            )
        g = status.get("global") or {}
        if g:
            table.add_row(
                "global",
                "",
                "",
                "",
                _fmt(g.get("loss")),
                _fmt(g.get("auc")),
                _fmt(g.get("accuracy")),
                style="bold",
            )
        return table


def summary_table(summary: dict[str, Any], metric: str) -> Table:
    """The per-site comparison: what federation bought each hospital."""
    table = Table(
        title=f"local only vs federated ({metric} on each site's test split)", title_justify="left"
    )
    for col in ("site", "train rows", "test rows", "local only", "federated", "change"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for name, s in summary.get("sites", {}).items():
        fed = (s.get("federated") or {}).get(metric)
        loc = (s.get("local_only") or {}).get(metric)
        change = "-"
        if isinstance(fed, (int, float)) and isinstance(loc, (int, float)):
            change = f"{fed - loc:+.3f}"
        table.add_row(
            name,
            _fmt(s.get("train_samples")),
            _fmt(s.get("test_samples")),
            _fmt(loc),
            _fmt(fed),
            change,
        )
    g = summary.get("global", {})
    mean = (g.get("site_mean") or {}).get(metric)
    weighted = (g.get("weighted") or {}).get(metric)
    table.add_row("mean over sites", "", "", "", _fmt(mean), "", style="bold")
    table.add_row("weighted by test rows", "", "", "", _fmt(weighted), "", style="bold")
    return table


@contextlib.contextmanager
def _signals_stop(sup: Supervisor) -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sup.stop()


def _wait_endpoint(path: Path, child: Child, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StudyFailed(
                f"the aggregator exited (code {child.proc.returncode}) "
                f"before it was ready:\n{child.tail()}"
            )
        with contextlib.suppress(OSError, ValueError):
            ep: dict[str, Any] = json.loads(path.read_text())
            if ep.get("pid") == child.proc.pid:
                return ep
        time.sleep(0.05)
    raise StudyFailed(f"the aggregator was not ready after {timeout:.0f} s:\n{child.tail()}")


def prepare_out(out: Path, keep_state: bool) -> None:
    if not keep_state:
        shutil.rmtree(out / "state", ignore_errors=True)
        shutil.rmtree(out / "logs", ignore_errors=True)
        for f in OUTPUT_FILES:
            (out / f).unlink(missing_ok=True)
        # Torn audit lines moved aside belong to the trail just removed.
        for torn in out.glob("audit.jsonl.torn-*"):
            torn.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def provision_tls(study: FederatedStudy, tls_dir: Path) -> dict[str, Path]:
    """An ephemeral CA for this run, a server certificate for the aggregator on loopback and
    one client certificate per site: the local engine speaks mutual TLS like production.

    Returns the folder each process reads (``aggregator`` and every site name).
    """
    ca_dir = tls_dir / "ca"
    init_ca_dir(study.name, ca_dir, days=30, force=True)
    ca = read_credentials(ca_dir, "ca")
    dirs: dict[str, Path] = {}
    names = [("aggregator", True), *((s.name, False) for s in study.spec.sites)]
    for name, server in names:
        hosts = ["127.0.0.1", "localhost"] if server else None
        creds = issue_cert(name, ca.cert, ca.key, server=server, hosts=hosts, days=30)
        dirs[name] = tls_dir / name
        write_credentials(creds, dirs[name], name)
    return dirs


@dataclass
class Export:
    """A running ``fedstudy export``; its stdout and stderr go to two files in ``said``."""

    proc: ChildProcess
    said: Path

    def result(self) -> tuple[int, str]:
        """Waits for the export; returns (exit code, what it printed)."""
        try:
            code = self.proc.wait(timeout=EXPORT_TIMEOUT_S)
        finally:
            self.proc.kill()
            self.proc.wait()
            self.proc.close()
        text = ""
        with contextlib.suppress(OSError):
            text = (self.said / "stdout").read_text(errors="replace")
            text += (self.said / "stderr").read_text(errors="replace")
        shutil.rmtree(self.said, ignore_errors=True)
        if code is None:
            return 1, f"the export took more than {EXPORT_TIMEOUT_S:.0f} s"
        return code, text.strip()

    def cancel(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.close()
        shutil.rmtree(self.said, ignore_errors=True)


def start_export(study: FederatedStudy, study_file: str, out: Path, launcher: Launcher) -> Export:
    """Starts ``fedstudy export`` on the study's final model, checked on every site's test
    rows."""
    args = ["export", str(out / "model.safetensors"), "--study", study_file]
    args += ["--out", str(out / "model.onnx")]
    for site in study.spec.sites:
        args += ["--site", site.name]
    said = Path(tempfile.mkdtemp(prefix="fedstudy-export-"))
    try:
        return Export(launcher.start(args, said / "stdout", said / "stderr"), said)
    except BaseException:
        shutil.rmtree(said, ignore_errors=True)
        raise


def _error(*lines: str) -> None:
    """Errors go to stderr as plain lines: never wrapped, so paths stay whole."""
    for line in lines:
        print(line, file=sys.stderr)


def run_study(
    study_path: Path,
    out: Path | None = None,
    progress: str = "auto",
    keep_state: bool = False,
    console: Console | None = None,
    isolated_processes: bool = False,
    launcher: Launcher | None = None,
) -> int:
    """Runs the study; returns the process exit code (0 when it completed).

    The trainers and the export are children of a fork server that imports them once
    (``fedstudy.launch``); with ``isolated_processes``, each is a fresh interpreter. A
    caller may pass the ``launcher`` (and close it): ``fedstudy run`` starts its fork server
    before it imports this module.
    """
    console = console or Console(soft_wrap=True)
    try:
        study = load_study(study_path)
        check_local_files(study, study_path.resolve().parent)
        check_irb(study)
    except StudyError as e:
        _error(f"{study_path}: cannot run this study", *(f"  {p}" for p in e.problems))
        return 2

    out = (out or Path("fedstudy-out") / study.name).resolve()
    own = launcher is None
    launcher = launcher or Launcher(forked=not isolated_processes)
    try:
        # The fork server's imports take seconds: they overlap the certificates and the
        # aggregator's start.
        launcher.warm()
        return _run(study, study_path, out, progress, keep_state, console, launcher)
    finally:
        if own:
            launcher.close()


def _run(
    study: FederatedStudy,
    study_path: Path,
    out: Path,
    progress: str,
    keep_state: bool,
    console: Console,
    launcher: Launcher,
) -> int:
    prepare_out(out, keep_state)
    study_file = str(study_path.resolve())
    sup = Supervisor(out / "logs", launcher)
    agg_state = out / "state" / "aggregator"
    agg_state.mkdir(parents=True, exist_ok=True)
    tls_dirs = provision_tls(study, out / "state" / "tls")
    (agg_state / "endpoint.json").unlink(missing_ok=True)
    console.print(
        f"study {study.name}: {len(study.spec.sites)} sites, {study.spec.rounds} "
        f"rounds, {study.spec.strategy.name}; output in {out}",
        markup=False,
    )
    started = time.monotonic()
    try:
        with _signals_stop(sup):
            agg = sup.start(
                "aggregator",
                [
                    "aggregator",
                    "--study",
                    study_file,
                    "--listen",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                    "--state-dir",
                    str(agg_state),
                    "--out",
                    str(out),
                    "--linger",
                    "10",
                    "--tls-dir",
                    str(tls_dirs["aggregator"]),
                    # An xgboost study's tracker: a free port (endpoint.json says which).
                    "--boosting-port",
                    "0",
                ],
            )
            ep = _wait_endpoint(agg_state / "endpoint.json", agg, STARTUP_TIMEOUT_S)
            if launcher.forked:
                # The first trainer waits for the fork server's imports, which keep one core
                # busy: the other imports the report's plotting library meanwhile.
                import_plotting()
            for site in study.spec.sites:
                sup.start(
                    f"trainer-{site.name}",
                    [
                        "trainer",
                        "--study",
                        study_file,
                        "--site",
                        site.name,
                        "--aggregator",
                        str(ep["grpc"]),
                        "--state-dir",
                        str(out / "state" / "sites" / site.name),
                        "--tls-dir",
                        str(tls_dirs[site.name]),
                        *(["--boosting-tracker", str(ep["boosting"])] if "boosting" in ep else []),
                    ],
                )
            with Progress(study, progress, console) as prog:
                while True:
                    bad = sup.failed()
                    if bad is not None:
                        raise StudyFailed(
                            f"{bad.name} exited with code {bad.proc.returncode}:\n{bad.tail()}"
                        )
                    if agg.proc.poll() == 0:
                        break
                    status = _get_status(str(ep["http"]))
                    if status is not None:
                        prog.update(status)
                    agg.proc.wait(timeout=POLL_S)  # returns as soon as the aggregator exits
            # The aggregator is done; the trainers were told and exit by themselves.
            for c in sup.children:
                c.proc.wait(timeout=15)
                if c.proc.returncode not in (0, None):
                    raise StudyFailed(f"{c.name} exited with code {c.proc.returncode}:\n{c.tail()}")
    except KeyboardInterrupt:
        _error("interrupted: stopped the aggregator and every trainer")
        return 130
    except StudyFailed as e:
        _error(f"study {study.name} failed: {e}", f"logs: {out / 'logs'}")
        return 1

    summary_path = out / "summary.json"
    try:
        summary: dict[str, Any] = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        _error(f"study {study.name}: no readable summary at {summary_path}: {e}")
        return 1
    prog.finish(summary)
    console.print(summary_table(summary, study.spec.task.metric))
    exported = True
    export = None
    if (out / "model.safetensors").exists():
        export = start_export(study, study_file, out, launcher)
    # The report is written while the export runs; each says its piece in that order.
    report: Path | Exception
    try:
        report = write_report(out, study.spec.task.metric, epsilon_budget_of(study.spec))
    except (ReportError, OSError) as e:
        report = e
    except BaseException:
        if export is not None:
            export.cancel()
        raise
    if export is not None:
        code, said = export.result()
        if code == 0:
            console.print(said.splitlines()[-1] if said else "model.onnx exported", markup=False)
        elif code in EXPORT_SKIPPED:
            console.print(f"ONNX export skipped: {said}", markup=False)
        else:
            exported = False
            _error(f"study {study.name}: the ONNX export failed:", *said.splitlines())
    if isinstance(report, Exception):
        _error(f"study {study.name}: could not write the report: {report}")
    else:
        console.print(f"report: {report}", markup=False)
    elapsed = time.monotonic() - started
    if not summary.get("completed", False):
        _error(
            f"study {study.name} ended early after {summary.get('rounds_completed')} "
            f"rounds: {summary.get('ended_reason')}",
        )
        return 1
    console.print(
        f"study {study.name} completed {summary.get('rounds_completed')} rounds in "
        f"{elapsed:.1f} s; outputs in {out}",
        markup=False,
    )
    return 0 if exported else 1
