"""``fedstudy aggregator``: run a study's aggregator until the study is done.

Exit codes: 0 when the study is done (completed or ended early, see ``summary.json``) or on
SIGTERM; 2 for a bad study file or command line, or a study whose IRB approval has lapsed;
1 when the state folder or the audit trail cannot be used, a port cannot be bound or a
checkpoint cannot be written (a full disk); 130 on SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedstudy import tls
from fedstudy.audit import AuditError
from fedstudy.boosting import DEFAULT_TRACKER_PORT
from fedstudy.logs import event, setup
from fedstudy.spec import TREE_MODELS, StudyError, check_irb, load_study

from .boosting import BoostingTracker
from .checkpoint import CheckpointError
from .rounds.admission import SPOOL_ABOVE_BYTES, SPOOL_BUDGET_BYTES, SPOOL_CONCURRENCY
from .server import AggregatorServer, BindError, split_address


def _address(value: str) -> str:
    try:
        split_address(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if s < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return s


def _bytes(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of bytes (0 or more)")
    return int(value)


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a count (1 or more)")
    return int(value)


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 to 65535)")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstudy aggregator",
        description="Run a study's aggregator: rounds, update checks, checkpoints, /status.",
    )
    p.add_argument("--study", required=True, help="the study file (YAML)")
    p.add_argument(
        "--listen",
        type=_address,
        default="0.0.0.0:7700",
        help="gRPC address, HOST:PORT; port 0 picks a free one (default 0.0.0.0:7700)",
    )
    p.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        help="checkpoints and endpoint.json; an existing one is resumed",
    )
    p.add_argument(
        "--http",
        type=_address,
        default="0.0.0.0:8080",
        help="/healthz, /status and /metrics, HOST:PORT (default 0.0.0.0:8080)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="model.safetensors, metrics.jsonl, summary.json (default: the state dir)",
    )
    p.add_argument(
        "--linger",
        type=_seconds,
        default=5.0,
        help="once done, how long to wait for every site to hear it (default 5)",
    )
    tls.add_arguments(p, "aggregator")
    p.add_argument(
        "--spool-dir",
        type=Path,
        help="where updates of large models are received, each in a nameless file, so that "
        "the aggregator never holds one in memory (default: STATE_DIR/incoming)",
    )
    p.add_argument(
        "--spool-above-bytes",
        type=_bytes,
        default=SPOOL_ABOVE_BYTES,
        help="updates of models above this size are received into --spool-dir, smaller "
        f"ones into memory (default {SPOOL_ABOVE_BYTES}, 64 MiB)",
    )
    p.add_argument(
        "--spool-budget-bytes",
        type=_bytes,
        default=SPOOL_BUDGET_BYTES,
        help="how many bytes of spooled updates may arrive at once; other sites wait their "
        "turn, one always goes; raise it for sites on slow links and a disk that keeps up "
        f"(default {SPOOL_BUDGET_BYTES}, 1 GiB)",
    )
    p.add_argument(
        "--spool-concurrency",
        type=_count,
        default=SPOOL_CONCURRENCY,
        help="how many spooled updates may arrive at once, within --spool-budget-bytes; each "
        "holds gRPC buffers of its own while it arrives "
        f"(default {SPOOL_CONCURRENCY})",
    )
    p.add_argument(
        "--boosting-port",
        type=_port,
        default=DEFAULT_TRACKER_PORT,
        help="an xgboost study's XGBoost federated tracker listens on this port, on every "
        f"interface; 0 picks a free one (default {DEFAULT_TRACKER_PORT})",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    log = setup("aggregator", args.log_level)
    try:
        study = load_study(args.study)
    except StudyError as e:
        print(f"fedstudy aggregator: {args.study}: invalid study", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        check_irb(study)
    except StudyError as e:
        print(f"fedstudy aggregator: {args.study}: cannot run this study", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        event(log, "irb-expired", logging.ERROR, error="; ".join(e.problems))
        return 2
    try:
        creds = tls.credentials_from_args(args, "aggregator")
    except tls.TlsError as e:
        print(f"fedstudy aggregator: {e}", file=sys.stderr)
        return 2
    boosting = None
    if study.spec.model.name in TREE_MODELS:
        files = None if creds is None else tls.credential_files(args.tls_dir, "aggregator")
        boosting = BoostingTracker(
            len(study.spec.sites),
            args.boosting_port,
            files,
            log,
            timeout_s=max(1, math.ceil(study.spec.roundTimeoutSeconds)),
        )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = AggregatorServer(
            study,
            args.state_dir,
            args.out,
            listen=args.listen,
            http=args.http,
            log=log,
            linger=args.linger,
            tls=creds,
            boosting=boosting,
            spool_dir=args.spool_dir,
            spool_above_bytes=args.spool_above_bytes,
            spool_budget_bytes=args.spool_budget_bytes,
            spool_concurrency=args.spool_concurrency,
        )
        server.start()
    except (CheckpointError, AuditError, BindError, OSError) as e:
        print(f"fedstudy aggregator: {e}", file=sys.stderr)
        for s, h in old.items():
            signal.signal(s, h)
        return 1

    try:
        finished = server.wait(stop)
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if finished:
        event(log, "exit", reason="study done")
        return 0
    if server.coord.fatal is not None:
        print(
            f"fedstudy aggregator: {server.coord.fatal}; stopped. The last complete checkpoint "
            f"in {args.state_dir} is intact: free some space and start again to resume.",
            file=sys.stderr,
        )
        return 1
    name = signal.Signals(received[0]).name if received else "stop"
    event(log, "exit", reason=f"{name}: stopped; the last checkpoint is on disk")
    return 130 if received and received[0] == signal.SIGINT else 0
