"""XGBoost's federated tracker, run by the aggregator of an xgboost study (docs/ehr.md).

The tracker is XGBoost's own gRPC server: the sites' trainers join it as federated workers
and it sums their quantile sketches and gradient histograms, so every site grows the same
trees. It listens on its own port (7701 by default) with the aggregator's certificate and
key, and accepts only workers whose certificate the study's CA signed: the same mutual TLS
as the study's gRPC service. The study's rounds, reports, checkpoints and outputs go
through the aggregator as for any other model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from fedstudy.logs import event
from fedstudy.tls import CredentialFiles


class TrackerError(RuntimeError):
    """The tracker could not start; the message says why."""


class BoostingTracker:
    """XGBoost's federated tracker for ``workers`` sites, on ``port`` (0: any free port)."""

    def __init__(
        self,
        workers: int,
        port: int,
        tls: CredentialFiles | None,
        log: logging.Logger,
        timeout_s: int = 300,
    ) -> None:
        self.workers = workers
        self.port = port
        self.tls = tls
        self.log = log
        self.timeout_s = timeout_s
        self._tracker: Any = None

    def start(self) -> int:
        """Starts listening; returns the port."""
        try:
            from xgboost.core import XGBoostError
            from xgboost.federated import FederatedTracker
        except ModuleNotFoundError as e:
            raise TrackerError(
                f"model xgboost needs the package xgboost on the aggregator (cannot import "
                f"{e.name}): install the boosting extra, pip install 'fedstudy[boosting]'"
            ) from None
        files: dict[str, str] = {}
        if self.tls is not None:
            files = {
                "server_key_path": str(self.tls.key),
                "server_cert_path": str(self.tls.cert),
                # The roots a worker's certificate must chain to: the study's CA.
                "client_cert_path": str(self.tls.ca),
            }
        try:
            tracker = FederatedTracker(
                n_workers=self.workers,
                port=self.port,
                secure=self.tls is not None,
                timeout=self.timeout_s,
                **files,
            )
            tracker.start()
            port = int(tracker.worker_args()["dmlc_tracker_port"])
        except XGBoostError as e:
            raise TrackerError(
                f"the XGBoost federated tracker cannot listen on port {self.port}: "
                f"{str(e).strip().splitlines()[-1]}"
            ) from None
        self._tracker = tracker
        event(
            self.log,
            "boosting-tracker",
            port=port,
            workers=self.workers,
            mutual_tls=self.tls is not None,
        )
        return port

    def stop(self) -> None:
        """Stops the tracker without waiting for it: XGBoost's own shutdown waits for the
        tracker's timeout, so it runs on a daemon thread the process does not wait for."""
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return

        def free() -> None:
            try:
                tracker.free()
            except Exception:  # already stopped, or its timeout passed: nothing to do
                return

        threading.Thread(target=free, name="boosting-tracker-stop", daemon=True).start()
