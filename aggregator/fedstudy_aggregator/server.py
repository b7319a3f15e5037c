"""The aggregator process's parts put together: the coordinator, the gRPC server, the HTTP
server and the timer that closes rounds on time."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from fedstudy.certs import Credentials
from fedstudy.fsutil import atomic_write_json
from fedstudy.logs import event
from fedstudy.spec import FederatedStudy
from fedstudy.tls import server_credentials

from .boosting import BoostingTracker, TrackerError
from .rounds import Coordinator
from .rounds.admission import SPOOL_ABOVE_BYTES, SPOOL_BUDGET_BYTES, SPOOL_CONCURRENCY
from .service import AggregatorService, add_to_server
from .web import HttpServer

ENDPOINT_FILE = "endpoint.json"


class BindError(RuntimeError):
    """An address the aggregator could not listen on."""


def split_address(addr: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) to (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{addr!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def public_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas. Each gRPC worker thread would otherwise get its own arena,
    and the megabyte-sized chunk buffers it frees stay in that arena rather than going back
    to the system: the resident size then grows with the number of sites streaming at once.
    A no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        m_arena_max = -8
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


class AggregatorServer:
    """Runs a study's aggregator until it is done or stopped."""

    def __init__(
        self,
        study: FederatedStudy,
        state_dir: Path,
        out_dir: Path | None = None,
        *,
        listen: str = "0.0.0.0:7700",
        http: str = "0.0.0.0:8080",
        log: logging.Logger | None = None,
        linger: float = 5.0,
        tick_seconds: float = 0.05,
        tls: Credentials | None = None,
        boosting: BoostingTracker | None = None,
        spool_dir: Path | None = None,
        spool_above_bytes: int | None = SPOOL_ABOVE_BYTES,
        spool_budget_bytes: int = SPOOL_BUDGET_BYTES,
        spool_concurrency: int = SPOOL_CONCURRENCY,
    ) -> None:
        self.log = log or logging.getLogger("aggregator")
        self.state_dir = state_dir
        self.listen = listen
        self.http_addr = http
        self.linger = linger
        self.tick_seconds = tick_seconds
        self.tls = tls
        self.boosting = boosting
        limit_malloc_arenas()
        self.coord = Coordinator(
            study,
            state_dir,
            out_dir or state_dir,
            self.log,
            spool_dir=spool_dir,
            spool_above_bytes=spool_above_bytes,
            spool_budget_bytes=spool_budget_bytes,
            spool_concurrency=spool_concurrency,
        )
        workers = 2 * len(study.spec.sites) + 8
        self._grpc = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        add_to_server(
            AggregatorService(self.coord, self.log, verify_identity=tls is not None), self._grpc
        )
        self._http: HttpServer | None = None
        self._halt = threading.Event()
        self._timer = threading.Thread(target=self._run_timer, name="round-timer", daemon=True)
        self.endpoint: dict[str, object] = {}

    def start(self) -> dict[str, object]:
        """Binds both ports, starts serving and writes ``endpoint.json``."""
        ghost, _ = split_address(self.listen)
        hhost, hport = split_address(self.http_addr)
        try:
            if self.tls is None:
                gport = self._grpc.add_insecure_port(self.listen)
            else:
                gport = self._grpc.add_secure_port(self.listen, server_credentials(self.tls))
        except RuntimeError as e:
            raise BindError(f"cannot listen for gRPC on {self.listen}: {e}") from None
        if gport == 0:
            raise BindError(f"cannot listen for gRPC on {self.listen}")
        try:
            self._http = HttpServer(
                hhost, hport, self.coord.status, self.coord.prometheus, self.log
            )
        except OSError as e:
            raise BindError(f"cannot listen for HTTP on {self.http_addr}: {e.strerror}") from None
        boosting_port = None
        if self.boosting is not None:
            try:
                boosting_port = self.boosting.start()
            except TrackerError as e:
                raise BindError(str(e)) from None
        self._grpc.start()
        self._http.start()
        self._timer.start()
        self.endpoint = {
            "grpc": f"{public_host(ghost)}:{gport}",
            "http": f"{public_host(hhost)}:{self._http.port}",
            "pid": os.getpid(),
        }
        if boosting_port is not None:
            # XGBoost's tracker listens on every interface (0.0.0.0).
            self.endpoint["boosting"] = f"{public_host('0.0.0.0')}:{boosting_port}"
        atomic_write_json(self.state_dir / ENDPOINT_FILE, self.endpoint)
        event(
            self.log,
            "listening",
            grpc=self.endpoint["grpc"],
            http=self.endpoint["http"],
            mutual_tls=self.tls is not None,
        )
        return self.endpoint

    def _run_timer(self) -> None:
        while not self._halt.wait(self.tick_seconds):
            try:
                self.coord.tick()
            except Exception:
                self.log.exception("timer-error")

    def wait(self, stop: threading.Event) -> bool:
        """Blocks until the study is done and may exit (True), or ``stop`` is set or a write to
        disk failed (False; ``self.coord.fatal`` then says what)."""
        while not stop.wait(0.05):
            if self.coord.fatal is not None:
                return False
            if self.coord.exit_due(self.linger):
                return True
        return False

    def stop(self, grace: float = 2.0) -> None:
        self._halt.set()
        self.coord.stop()
        self._grpc.stop(grace).wait()
        if self._http is not None:
            self._http.stop()
        if self._timer.is_alive():
            self._timer.join(timeout=5)
        if self.boosting is not None:
            self.boosting.stop()
