"""fedstudy.launch: ``fedstudy`` commands as fresh interpreters or as children of a fork
server, behind one interface."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedstudy import __version__
from fedstudy.launch import ForkedChild, ForkServer, Launcher, PopenChild, forking_supported

pytestmark = pytest.mark.skipif(not forking_supported(), reason="the fork server needs Linux")


@pytest.fixture
def server() -> Iterator[ForkServer]:
    s = ForkServer(preload=("fedstudy.cli",))
    yield s
    s.close()


def test_a_forked_child_runs_the_command_line(tmp_path: Path, server: ForkServer) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    out.write_text("earlier lines stay\n")
    pid = server.fork(["--version"], out, err, dict(os.environ))
    assert pid != server.proc.pid
    assert server.exit_code(pid, timeout=60) == 0
    assert out.read_text() == f"earlier lines stay\nfedstudy {__version__}\n"
    assert err.read_text() == ""


def test_exit_codes_and_messages_are_the_commands(tmp_path: Path, server: ForkServer) -> None:
    log = tmp_path / "log"
    missing = tmp_path / "missing.yaml"
    pid = server.fork(["validate", str(missing)], log, None, dict(os.environ))
    assert server.exit_code(pid, timeout=60) == 1
    assert f"{missing}: invalid" in log.read_text()
    # argparse's usage error: exit code 2, the message on stderr
    pid = server.fork(["audit"], tmp_path / "o", tmp_path / "e", dict(os.environ))
    assert server.exit_code(pid, timeout=60) == 2
    assert "usage: fedstudy audit" in (tmp_path / "e").read_text()
    assert (tmp_path / "o").read_text() == ""


def test_a_forked_child_works_in_the_engines_folder(
    tmp_path: Path, server: ForkServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = Path(__file__).resolve().parents[1] / "examples" / "breast-cancer.yaml"
    (tmp_path / "study.yaml").write_text(study.read_text())
    monkeypatch.chdir(tmp_path)
    pid = server.fork(["validate", "study.yaml"], tmp_path / "log", None, dict(os.environ))
    assert server.exit_code(pid, timeout=60) == 0
    assert "study.yaml: valid: study breast-cancer" in (tmp_path / "log").read_text()


def test_exit_code_is_none_while_the_child_runs(tmp_path: Path, server: ForkServer) -> None:
    pid = server.fork(["--version"], tmp_path / "log", None, dict(os.environ))
    code = server.exit_code(pid, timeout=0)
    assert code in (None, 0)
    assert server.exit_code(pid, timeout=None) == 0


def test_only_the_trainer_and_the_export_are_forked(tmp_path: Path) -> None:
    launcher = Launcher(forked=True)
    launcher.server = ForkServer(preload=("fedstudy.cli",))
    try:
        child = launcher.start(["export", "--help"], tmp_path / "export.log")
        assert isinstance(child, ForkedChild)
        assert child.wait(timeout=120) == 0
        assert "usage: fedstudy export" in (tmp_path / "export.log").read_text()
        child = launcher.start(["--version"], tmp_path / "version.log")
        assert isinstance(child, PopenChild)
        assert child.wait(timeout=60) == 0
        child.close()
    finally:
        launcher.close()
    assert launcher.server is None


def test_isolated_launcher_starts_fresh_interpreters(tmp_path: Path) -> None:
    launcher = Launcher(forked=False)
    child = launcher.start(["export", "--help"], tmp_path / "log")
    assert isinstance(child, PopenChild)
    assert child.wait(timeout=120) == 0
    child.close()
    assert launcher.server is None


def test_without_a_fork_server_the_launcher_starts_fresh_interpreters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A fork server that dies while it imports: the command still runs, as a process of its own.
    (tmp_path / "dies_on_import.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    launcher = Launcher(forked=True)
    launcher.server = ForkServer(preload=("dies_on_import",))
    try:
        child = launcher.start(["trainer", "--help"], tmp_path / "log")
        assert isinstance(child, PopenChild)
        assert child.wait(timeout=120) == 0
        child.close()
    finally:
        launcher.close()
    assert "usage: fedstudy trainer" in (tmp_path / "log").read_text()
    assert "cannot fork trainer from the fork server" in capsys.readouterr().err
