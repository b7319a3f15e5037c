"""Helpers of the trainer's tests: study documents, a log collector, a fake aggregator.

(A module of its own, not conftest.py, so that test files can import it by a name no other
test folder uses.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedstudy.spec import FederatedStudy, parse_study, resolve_data_path
from fedstudy.tensors import TensorSpec, from_chunks, to_chunks
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc, tensors_pb2

REPO = Path(__file__).resolve().parents[2]
HEART_STUDY = REPO / "examples" / "heart-disease.yaml"
HEART_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}


def study_doc(sites: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A study document with small defaults; ``spec`` entries replace the defaults."""
    body: dict[str, Any] = {
        "task": {"type": "binary-classification", "label": "label"},
        "model": {"name": "logistic-regression"},
        "rounds": 2,
        "training": {"localSteps": 5, "batchSize": 8, "optimizer": "sgd", "learningRate": 0.1},
        "sites": sites,
    }
    body.update(spec)
    return {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": "test-study"},
        "spec": body,
    }


def make_study(sites: list[dict[str, Any]], **spec: Any) -> FederatedStudy:
    return parse_study(study_doc(sites, **spec))


def breast_cancer_sites(count: int = 2, skew: float = 0.0) -> list[dict[str, Any]]:
    return [
        {
            "name": f"site-{i}",
            "data": {
                "format": "builtin",
                "dataset": "breast-cancer",
                "partition": {"index": i, "count": count, "labelSkew": skew, "seed": 1},
            },
        }
        for i in range(count)
    ]


def heart_dir(study: FederatedStudy) -> Path | None:
    """The folder of the four heart-disease files: $FEDSTUDY_HEART_DISEASE_DIR, the example's
    relative path, or /work/shared/data/heart-disease."""
    candidates = []
    if os.environ.get("FEDSTUDY_HEART_DISEASE_DIR"):
        candidates.append(Path(os.environ["FEDSTUDY_HEART_DISEASE_DIR"]))
    example_path = resolve_data_path(study.spec.sites[0], HEART_STUDY.parent)
    if example_path is not None:
        candidates.append(example_path.parent)
    candidates.append(Path("/work/shared/data/heart-disease"))
    for folder in candidates:
        if all((folder / name).is_file() for name in HEART_FILES.values()):
            return folder.resolve()
    return None


# --- logs ---------------------------------------------------------------------------------


class EventLog(logging.Handler):
    """Collects the trainer's log events: (event name, fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        self.events.append((record.getMessage(), dict(fields) if isinstance(fields, dict) else {}))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [f for n, f in self.events if n == name]


# --- a fake aggregator --------------------------------------------------------------------


@dataclass
class FakeAggregator(aggregator_pb2_grpc.AggregatorServicer):
    """A one-site aggregator that follows docs/protocol.md, with faults on demand.

    The site's accepted update of round r becomes model version r. ``faults`` maps a method
    name to status codes to abort its next calls with (one per call); ``refuse_updates``
    maps a round to refusal reasons for its next updates; ``forget_after_round`` makes it forget the
    site once (as a restarted aggregator does); ``bad_model_once`` sends a model of the wrong
    shape on the next download.
    """

    study: str
    rounds: int
    proximal_mu: float = 0.0
    refuse_join: str = ""
    faults: dict[str, list[grpc.StatusCode]] = field(default_factory=dict)
    refuse_updates: dict[int, list[str]] = field(default_factory=dict)
    forget_after_round: int | None = None
    bad_model_once: bool = False
    joined: bool = False
    finished: bool = False
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    joins: list[pb.JoinRequest] = field(default_factory=list)
    headers: list[pb.UpdateHeader] = field(default_factory=list)
    reports: list[pb.ReportRequest] = field(default_factory=list)
    signature: list[TensorSpec] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _fault(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            codes = self.faults.get(method)
            code = codes.pop(0) if codes else None
        if code is not None:
            context.abort(code, f"injected fault in {method}")

    def Join(  # noqa: N802
        self, request: pb.JoinRequest, context: grpc.ServicerContext
    ) -> pb.JoinResponse:
        self._fault("Join", context)
        self.joins.append(request)
        if self.refuse_join:
            return pb.JoinResponse(accepted=False, reason=self.refuse_join, message="no")
        self.signature = [TensorSpec.from_proto(s) for s in request.model]
        self.joined = True
        done = max(self.models) if self.models else 0
        return pb.JoinResponse(accepted=True, planned_rounds=self.rounds, completed_rounds=done)

    def GetTask(  # noqa: N802
        self, request: pb.TaskRequest, context: grpc.ServicerContext
    ) -> pb.TaskResponse:
        self._fault("GetTask", context)
        kind = pb.TaskResponse
        if not self.joined:
            return kind(kind=kind.REJOIN)
        if not self.models:
            return kind(kind=kind.INIT)
        version = max(self.models)
        if version < self.rounds:
            return kind(
                kind=kind.TRAIN,
                round=version + 1,
                model_version=version,
                proximal_mu=self.proximal_mu,
            )
        if not self.finished:
            return kind(kind=kind.FINISH, round=self.rounds, model_version=version)
        return kind(kind=kind.DONE)

    def DownloadModel(  # noqa: N802
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[tensors_pb2.TensorChunk]:
        self._fault("DownloadModel", context)
        weights = self.models[request.model_version]
        if self.bad_model_once:
            self.bad_model_once = False
            weights = {k: np.zeros((*v.shape, 2), np.float32) for k, v in weights.items()}
        yield from to_chunks(weights, chunk_bytes=16)

    def SubmitUpdate(  # noqa: N802
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UpdateReceipt:
        self._fault("SubmitUpdate", context)
        first = next(request_iterator)
        header = first.header
        weights = from_chunks((c.tensor for c in request_iterator), expected=self.signature)
        self.headers.append(header)
        refusals = self.refuse_updates.get(header.round)
        if refusals:
            return pb.UpdateReceipt(accepted=False, reason=refusals.pop(0))
        if not self.joined:
            return pb.UpdateReceipt(accepted=False, reason="not-joined")
        self.models[header.round] = weights
        if self.forget_after_round is not None and header.round == self.forget_after_round:
            self.forget_after_round = None
            self.joined = False
        return pb.UpdateReceipt(accepted=True)

    def Report(  # noqa: N802
        self, request: pb.ReportRequest, context: grpc.ServicerContext
    ) -> pb.ReportReceipt:
        self._fault("Report", context)
        self.reports.append(request)
        if request.kind == pb.ReportRequest.FINAL:
            self.finished = True
        return pb.ReportReceipt(accepted=True)
