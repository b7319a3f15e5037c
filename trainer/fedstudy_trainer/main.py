"""``fedstudy trainer``: one site's trainer process. It dials out to the aggregator.

Exit codes: 0 the study is done; 1 XGBoost's federated training failed (an xgboost study);
2 the study, the data or the join was refused (the message says why); 3 the aggregator could
not be reached for ``--connect-timeout`` seconds; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch

from fedstudy import logs, tls
from fedstudy.boosting import default_tracker_address
from fedstudy.spec import TREE_MODELS, FederatedStudy, StudyError, load_study
from fedstudy.wire import aggregator_pb2_grpc
from fedstudy_trainer.boosting import BoostingError, BoostingSiteTrainer, TrackerLink
from fedstudy_trainer.client import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    GaveUp,
    JoinRefused,
    SiteTrainer,
)
from fedstudy_trainer.data import DataError, SiteDataset, load_site_data
from fedstudy_trainer.features import PREPROCESSING_FILE, write_preprocessing
from fedstudy_trainer.privacy import PrivacyError
from fedstudy_trainer.runtime import DeviceError

COMPONENT = "fedstudy.trainer"
EXIT_BOOSTING_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstudy trainer",
        description="Run one site's trainer: read the site's data, join the aggregator and "
        "train the rounds it hands out.",
    )
    parser.add_argument("--study", required=True, help="study file (YAML)")
    parser.add_argument("--site", required=True, help="this site's name, as the study lists it")
    parser.add_argument(
        "--aggregator",
        required=True,
        metavar="ADDR",
        help="the aggregator's gRPC address, host:port",
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        metavar="DIR",
        help="folder for this site's state (trainer.json)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up (exit 3) after this long without a successful call (default: 600)",
    )
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long a task request may wait at the aggregator (default: 10)",
    )
    tls.add_arguments(parser, "site")
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="check the aggregator's certificate for this name instead of ADDR's host",
    )
    parser.add_argument(
        "--boosting-tracker",
        metavar="ADDR",
        help="an xgboost study's XGBoost federated tracker, host:port (default: ADDR's host, "
        "port 7701)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    return parser


def _fail(log: logging.Logger, event: str, message: str, code: int, **fields: object) -> int:
    logs.event(log, event, logging.ERROR, error=message, exit_code=code, **fields)
    print(f"fedstudy trainer: {message}", file=sys.stderr)
    return code


def _trainer(
    args: argparse.Namespace,
    study: FederatedStudy,
    site: str,
    data: SiteDataset,
    channel: grpc.Channel,
    log: logging.Logger,
) -> SiteTrainer:
    """The site's trainer: an XGBoost worker for an xgboost study, else the SGD trainer."""
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    state_dir = Path(args.state_dir)
    options = {"connect_timeout": args.connect_timeout, "wait_seconds": args.wait_seconds}
    if study.spec.model.name not in TREE_MODELS:
        return SiteTrainer(study, site, data, stub, state_dir, log, **options)
    names = [s.name for s in study.spec.sites]
    link = TrackerLink(
        address=args.boosting_tracker or default_tracker_address(args.aggregator),
        world=len(names),
        rank=names.index(site),
        tls=None if args.insecure else tls.credential_files(args.tls_dir, site),
        timeout_s=max(1, math.ceil(study.spec.roundTimeoutSeconds)),
    )
    return BoostingSiteTrainer(study, site, data, stub, state_dir, log, tracker=link, **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    log = logs.setup(COMPONENT, args.log_level)

    torch.set_num_threads(1)  # many trainers may share a few cores
    study_path = Path(args.study).resolve()
    try:
        study = load_study(study_path)
        site = study.spec.site(args.site)
    except StudyError as e:
        return _fail(log, "study-invalid", str(e), EXIT_REFUSED)
    except KeyError:
        names = ", ".join(s.name for s in study.spec.sites)
        return _fail(
            log,
            "unknown-site",
            f"site {args.site!r} is not in study {study.name} (sites: {names})",
            EXIT_REFUSED,
        )
    try:
        data = load_site_data(study, site.name, study_path.parent)
    except DataError as e:
        return _fail(log, "data-invalid", str(e), EXIT_REFUSED)
    logs.event(
        log,
        "data-loaded",
        source=data.source,
        rows_read=data.rows_read,
        rows_used=data.rows_used,
        train_samples=data.n_train,
        test_samples=data.n_test,
        features=data.n_features,
        input_shape=list(data.input_shape),
    )
    if data.transform is not None:
        # The preprocessing as fitted here, for scoring new rows later (fedstudy predict).
        path = Path(args.state_dir) / PREPROCESSING_FILE
        try:
            write_preprocessing(path, data.transform, study.name, site.name)
        except OSError as e:
            return _fail(log, "state-unwritable", f"{path}: {e.strerror}", EXIT_REFUSED)

    # The first optimizer built in a process imports torch._dynamo (about a second): pay it
    # now, before joining, rather than inside the first round.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    try:
        creds = tls.credentials_from_args(args, site.name)
    except tls.TlsError as e:
        return _fail(log, "tls-invalid", str(e), EXIT_REFUSED)
    channel = tls.open_channel(args.aggregator, creds, args.server_name)
    try:
        trainer = _trainer(args, study, site.name, data, channel, log)
        return trainer.run()
    except JoinRefused as e:
        return _fail(log, "join-refused", str(e), EXIT_REFUSED, reason=e.reason)
    except PrivacyError as e:
        return _fail(log, "privacy-invalid", str(e), EXIT_REFUSED)
    except DeviceError as e:
        return _fail(log, "device-invalid", str(e), EXIT_REFUSED)
    except BoostingError as e:
        return _fail(log, "boosting-failed", str(e), EXIT_BOOSTING_FAILED)
    except GaveUp as e:
        return _fail(log, "gave-up", str(e), EXIT_UNREACHABLE, aggregator=args.aggregator)
    except KeyboardInterrupt:
        logs.event(log, "interrupted", logging.WARNING)
        return 130
    finally:
        channel.close()


if __name__ == "__main__":
    raise SystemExit(main())
