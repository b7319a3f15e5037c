"""The aggregator's HTTP side: ``/healthz``, ``/status`` (JSON) and ``/metrics`` (Prometheus).

It knows nothing of rounds: it serves what the functions it is given return.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from fedstudy.logs import event

StatusFn = Callable[[], dict[str, Any]]
TextFn = Callable[[], str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    status_fn: StatusFn
    metrics_fn: TextFn
    log: logging.Logger


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fedstudy-aggregator"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/status":
                body = json.dumps(self.server.status_fn(), default=str).encode()
                self._send(200, body, "application/json")
            elif path == "/metrics":
                body = self.server.metrics_fn().encode()
                self._send(200, body, CONTENT_TYPE_PLAIN_0_0_4)
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except Exception as e:  # a broken status must not kill the server thread
            event(self.server.log, "http-error", logging.ERROR, path=path, error=repr(e))
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are not events worth a log line


class HttpServer:
    """A ThreadingHTTPServer in its own thread."""

    def __init__(
        self, host: str, port: int, status_fn: StatusFn, metrics_fn: TextFn, log: logging.Logger
    ) -> None:
        cls = _Server6 if ":" in host else _Server
        self.httpd = cls((host, port), _Handler)
        self.httpd.status_fn = status_fn
        self.httpd.metrics_fn = metrics_fn
        self.httpd.log = log
        self.port: int = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
