"""The operator's own metrics and liveness, served over HTTP from the event loop.

``/metrics``: Prometheus text (reconciles by result, errors, reconcile duration).
``/healthz``: 200 while the event loop answers: a blocked loop fails the liveness probe.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

RECONCILES = Counter(
    "fedstudy_operator_reconciles_total",
    "Reconciles of FederatedStudy resources, by result (ok, invalid, error).",
    ["result"],
)
RECONCILE_ERRORS = Counter(
    "fedstudy_operator_reconcile_errors_total",
    "Reconciles that failed with an error (retried by the operator).",
)
RECONCILE_DURATION = Histogram(
    "fedstudy_operator_reconcile_duration_seconds",
    "Time one reconcile of a FederatedStudy took.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
for _result in ("ok", "invalid", "error"):
    RECONCILES.labels(result=_result)


@contextmanager
def timed_reconcile() -> Iterator[dict[str, str]]:
    """Counts one reconcile; the caller sets ``outcome["result"]`` (default ok)."""
    outcome = {"result": "ok"}
    start = time.perf_counter()
    try:
        yield outcome
    except BaseException:
        RECONCILES.labels(result="error").inc()
        RECONCILE_ERRORS.inc()
        raise
    else:
        RECONCILES.labels(result=outcome["result"]).inc()
    finally:
        RECONCILE_DURATION.observe(time.perf_counter() - start)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def start_server(host: str, port: int) -> web.AppRunner:
    """Starts ``/metrics`` and ``/healthz`` on host:port; stop with ``await runner.cleanup()``."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
