"""``fedstudy operator``: run the operator, or print the CRD (``fedstudy operator crd``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence

import kopf

from fedstudy_operator import crd, metrics
from fedstudy_operator.handlers import OperatorApp, configure_settings, make_registry
from fedstudy_operator.options import (
    DEFAULT_AGGREGATOR_IMAGE,
    DEFAULT_STATUS_URL,
    DEFAULT_TRAINER_IMAGE,
    ROLES,
    OperatorConfig,
)

log = logging.getLogger("fedstudy.operator")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str | None:
    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        with open(_SA_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstudy operator",
        description=(
            "Run the Kubernetes operator: FederatedStudy resources become an aggregator "
            "Deployment and trainer Jobs. 'fedstudy operator crd' prints the CRD instead."
        ),
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        default="standalone",
        help="coordinator: the aggregator only; site: this site's trainer only; "
        "standalone: everything in one cluster (default)",
    )
    p.add_argument("--site-name", help="the site this cluster runs (site role)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    where.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=8090,
        help="port of /metrics and /healthz (0: off; default 8090)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="address to serve metrics on")
    p.add_argument("--aggregator-image", default=DEFAULT_AGGREGATOR_IMAGE)
    p.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE)
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=15.0,
        help="how often each study is reconciled and the aggregator's /status read (15)",
    )
    p.add_argument(
        "--aggregator-status-url",
        default=DEFAULT_STATUS_URL,
        help="where the aggregator's /status is read; {name} is the aggregator Service, "
        "{namespace} the study's namespace, {study} its name (default: %(default)s)",
    )
    p.add_argument(
        "--operator-namespace",
        default=_own_namespace(),
        help="the namespace the operator runs in, allowed to read the aggregator's status "
        "port (default: $POD_NAMESPACE or the service account's)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument(
        "--log-format",
        choices=["plain", "full", "json"],
        default="full",
        help="log line format (default: full)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        role=args.role,
        site_name=args.site_name,
        aggregator_image=args.aggregator_image,
        trainer_image=args.trainer_image,
        status_url=args.aggregator_status_url,
        operator_namespace=args.operator_namespace,
        resync_seconds=args.resync_seconds,
    )


async def run(
    config: OperatorConfig,
    *,
    app: OperatorApp | None = None,
    namespaces: Sequence[str] = (),
    metrics_host: str = "0.0.0.0",
    metrics_port: int = 8090,
    stop_flag: asyncio.Event | None = None,
) -> None:
    """Runs the operator in the current event loop until stopped (signal or ``stop_flag``)."""
    app = app or OperatorApp(config)
    registry = make_registry(app)
    settings = kopf.OperatorSettings()
    configure_settings(settings, config)
    runner = await metrics.start_server(metrics_host, metrics_port) if metrics_port else None
    log.info(
        "starting role=%s site=%s namespaces=%s metrics_port=%s",
        config.role,
        config.site_name or "-",
        ",".join(namespaces) or "*",
        metrics_port or "off",
    )
    try:
        await kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            standalone=True,
            stop_flag=stop_flag,
        )
    finally:
        await app.close()
        if runner is not None:
            await runner.cleanup()


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv[:1] == ["crd"]:
        if len(argv) > 1:
            print("usage: fedstudy operator crd  (prints the CRD as YAML)", file=sys.stderr)
            return 2
        sys.stdout.write(crd.crd_yaml())
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.role == "site":
        if not args.site_name:
            parser.error("--role site needs --site-name NAME")
        if not _DNS_LABEL.match(args.site_name) or len(args.site_name) > 63:
            parser.error(f"--site-name must be a DNS label, got {args.site_name!r}")
    elif args.site_name:
        parser.error(f"--site-name is for --role site, not {args.role}")
    if args.resync_seconds <= 0:
        parser.error("--resync-seconds must be positive")
    fmt = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}
    kopf.configure(verbose=args.verbose, log_format=fmt[args.log_format])
    try:
        asyncio.run(
            run(
                config_from_args(args),
                namespaces=args.namespace or (),
                metrics_host=args.metrics_host,
                metrics_port=args.metrics_port,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0
