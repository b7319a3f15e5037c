"""A study as real processes on loopback: one aggregator and one trainer per site, with mutual
TLS, each logging to its own file, each one killable and restartable on its own."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedstudy.local import provision_tls
from fedstudy.spec import load_study


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fedstudy(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the ``fedstudy`` command line with this Python; output captured, never raises."""
    return subprocess.run(
        [sys.executable, "-m", "fedstudy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StudyProcesses:
    """Starts, kills and restarts the processes of one study; ``close`` kills what is left."""

    def __init__(self, study: Path, work: Path, linger: float = 10.0) -> None:
        self.study = study
        self.sites = [s.name for s in load_study(study).spec.sites]
        self.grpc = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.state = work / "state"
        self.out = work / "out"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.tls = provision_tls(load_study(study), work / "tls")
        self.linger = linger
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.trainers: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def _spawn(self, who: str, args: list[str]) -> subprocess.Popen[bytes]:
        n = self.starts.get(who, 0)
        self.starts[who] = n + 1
        log = open(self.logs / f"{who}-{n}.log", "wb")  # noqa: SIM115
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "fedstudy", *args], stdout=log, stderr=subprocess.STDOUT
            )

    def start_aggregator(self) -> subprocess.Popen[bytes]:
        self.aggregator = self._spawn(
            "aggregator",
            [
                "aggregator",
                "--study",
                str(self.study),
                "--listen",
                self.grpc,
                "--http",
                self.http,
                "--state-dir",
                str(self.state / "aggregator"),
                "--out",
                str(self.out),
                "--linger",
                str(self.linger),
                "--tls-dir",
                str(self.tls["aggregator"]),
            ],
        )
        return self.aggregator

    def start_trainer(self, site: str) -> subprocess.Popen[bytes]:
        self.trainers[site] = self._spawn(
            site,
            [
                "trainer",
                "--study",
                str(self.study),
                "--site",
                site,
                "--aggregator",
                self.grpc,
                "--state-dir",
                str(self.state / site),
                "--tls-dir",
                str(self.tls[site]),
                "--wait-seconds",
                "2",
            ],
        )
        return self.trainers[site]

    def start_all(self) -> None:
        self.start_aggregator()
        for site in self.sites:
            self.start_trainer(site)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://{self.http}/status", timeout=2) as r:
                data: dict[str, Any] = json.load(r)
                return data
        except OSError:
            return None

    def wait_for_rounds(self, n: int, deadline: float) -> dict[str, Any]:
        """Polls /status until ``n`` rounds are complete; fails at ``deadline`` (monotonic)."""
        while time.monotonic() < deadline:
            s = self.status()
            if s is not None and s["completed_rounds"] >= n:
                return s
            assert self.aggregator is not None
            code = self.aggregator.poll()
            assert code is None, f"the aggregator exited with {code} before round {n}"
            time.sleep(0.05)
        raise AssertionError(f"round {n} did not complete in time; last status {self.status()}")

    def lives(self, who: str) -> list[list[dict[str, Any]]]:
        """The events of each start of ``who``, one list per start, in order."""
        found = []
        for n in range(self.starts.get(who, 0)):
            text = (self.logs / f"{who}-{n}.log").read_text()
            found.append([json.loads(line) for line in text.splitlines() if line.startswith("{")])
        return found

    def events(self, who: str, name: str) -> list[dict[str, Any]]:
        """``name`` events from every start of ``who``, in order."""
        return [e for life in self.lives(who) for e in life if e.get("event") == name]

    def close(self) -> None:
        for p in [*self.trainers.values(), self.aggregator]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
