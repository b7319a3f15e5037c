"""Thin kopf handlers: each one hands the study to the one reconcile and reports the outcome.

``make_registry`` builds a fresh registry per operator instance (no module-level decorators),
so one process can run several operators (the tests restart one in the same event loop).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any, cast

import kopf

from fedstudy_operator import crd
from fedstudy_operator.kube import HttpProbe, Kube, StatusProbe, load_connection
from fedstudy_operator.metrics import timed_reconcile
from fedstudy_operator.options import OperatorConfig
from fedstudy_operator.reconcile import Reconciler
from fedstudy_operator.status import Transition

log = logging.getLogger("fedstudy.operator")

FINALIZER = "fedstudy.io/operator"


def post_event(body: Mapping[str, Any], transition: Transition) -> None:
    """A Kubernetes Event on the study (kopf posts it in the background)."""
    post = kopf.warn if transition.warning else kopf.info
    owner = body if isinstance(body, kopf.Body) else kopf.Body(cast(Any, dict(body)))
    post(owner, reason=transition.reason, message=transition.message[:1024])


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Watch timeouts (so a silently dropped watch is noticed), events, finalizer name."""
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.INFO
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER
    # All handlers are async and never block; the executor only serves stray sync calls.
    settings.execution.max_workers = 4


class OperatorApp:
    """The operator's parts: API client, status probe and reconciler."""

    def __init__(
        self,
        config: OperatorConfig,
        *,
        kube: Kube | None = None,
        probe: StatusProbe | None = None,
        today: Callable[[], dt.date] | None = None,
        connect: Callable[[], kopf.ConnectionInfo] = load_connection,
    ) -> None:
        self.config = config
        self.connect = connect
        self.kube = kube or Kube(connect)
        self._own_probe = HttpProbe(config.status_timeout_seconds) if probe is None else None
        self.probe: StatusProbe = probe or self._own_probe  # type: ignore[assignment]
        extra: dict[str, Any] = {"today": today} if today is not None else {}
        self.reconciler = Reconciler(self.kube, config, self.probe, events=post_event, **extra)

    async def handle(self, body: Mapping[str, Any], *, permanent: bool) -> str:
        with timed_reconcile() as metric:
            outcome = await self.reconciler.reconcile(body)
            if outcome.problems:
                metric["result"] = "invalid"
        if outcome.problems and permanent:
            # Recorded in the status already; retrying cannot help until the spec changes.
            raise kopf.PermanentError("invalid study:\n" + "\n".join(outcome.problems))
        return outcome.phase

    async def close(self) -> None:
        await self.kube.close()
        if self._own_probe is not None:
            await self._own_probe.close()


def make_registry(app: OperatorApp) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    resource = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return app.connect()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await app.close()

    @kopf.on.create(*resource, registry=registry, backoff=5)
    @kopf.on.update(*resource, registry=registry, backoff=5)
    @kopf.on.resume(*resource, registry=registry, backoff=5)
    async def reconcile(body: kopf.Body, **_: Any) -> None:
        await app.handle(body, permanent=True)

    @kopf.timer(
        *resource,
        registry=registry,
        interval=app.config.resync_seconds,
        initial_delay=app.config.resync_seconds,
        backoff=app.config.resync_seconds,
    )
    async def resync(body: kopf.Body, **_: Any) -> None:
        # Re-reads the children, the aggregator's /status and the IRB date.
        await app.handle(body, permanent=False)

    @kopf.on.delete(*resource, registry=registry, optional=True)
    async def deleted(body: kopf.Body, **_: Any) -> None:
        meta = body["metadata"]
        app.reconciler.forget(meta["namespace"], meta["name"])
        log.info("study deleted study=%s/%s", meta["namespace"], meta["name"])

    return registry
