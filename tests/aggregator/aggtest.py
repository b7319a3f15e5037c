"""Helpers of the aggregator tests: a small study, a tiny model, an in-process aggregator on
loopback and a test client that speaks the wire protocol."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import numpy as np
from fedstudy_aggregator.server import AggregatorServer

from fedstudy.spec import FederatedStudy, parse_study
from fedstudy.tensors import Weights, from_chunks, signature, to_chunks, total_bytes
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

STUDY = "demo"


def study_doc(sites: int = 2, **spec: Any) -> dict[str, Any]:
    """A small study document of builtin-data sites ``s0``, ``s1``, ... (no files needed)."""
    doc: dict[str, Any] = {
        "apiVersion": "fedstudy.io/v1alpha1",
        "kind": "FederatedStudy",
        "metadata": {"name": STUDY},
        "spec": {
            "task": {"label": "malignant"},
            "model": {"name": "logistic-regression"},
            "rounds": 2,
            "minSites": 2,
            "roundTimeoutSeconds": 30,
            "sites": [
                {
                    "name": f"s{i}",
                    "data": {
                        "format": "builtin",
                        "dataset": "breast-cancer",
                        "partition": {"index": i, "count": sites},
                    },
                }
                for i in range(sites)
            ],
        },
    }
    doc["spec"].update(spec)
    return doc


def make_study(sites: int = 2, **spec: Any) -> FederatedStudy:
    return parse_study(study_doc(sites, **spec))


def model(seed: float = 0.0) -> Weights:
    """A tiny model with a float matrix, a float vector and an integer counter."""
    return {
        "w": (np.arange(6, dtype=np.float32).reshape(2, 3) + seed).astype(np.float32),
        "b": np.full(3, seed, dtype=np.float32),
        "steps": np.array([10 * int(seed), 3], dtype=np.int64),
    }


def header(**fields: Any) -> pb.UpdateChunk:
    return pb.UpdateChunk(header=pb.UpdateHeader(**fields))


def tensor_messages(weights: Weights, chunk_bytes: int = 1 << 20) -> list[pb.UpdateChunk]:
    return [pb.UpdateChunk(tensor=c) for c in to_chunks(weights, chunk_bytes)]


def update_messages(sender: Site, weights: Weights, **fields: object) -> list[pb.UpdateChunk]:
    """A round-1 update of ``weights`` from ``sender``: its header, then its tensors."""
    h = sender.header(1, **fields)
    h.setdefault("tensor_count", len(weights))
    h.setdefault("total_bytes", total_bytes(weights))
    return [header(**h), *tensor_messages(weights)]


def stalled_upload(sender: Site, weights: Weights, release: threading.Event) -> grpc.Future:
    """An upload that sends its header and first tensor chunk, then waits for ``release``
    (at most 5 s) without ending its stream: the caller cancels it to drop the stream."""
    msgs = update_messages(sender, weights)

    def stalled() -> Iterator[pb.UpdateChunk]:
        yield msgs[0]
        yield msgs[1]
        release.wait(5)

    return sender.stub.SubmitUpdate.future(stalled(), timeout=10)


class Site:
    """One trainer's calls, made by hand."""

    def __init__(self, stub: pb_grpc.AggregatorStub, name: str, study: str = STUDY) -> None:
        self.stub = stub
        self.name = name
        self.study = study

    def join(
        self, weights: Weights | None = None, train: int = 100, test: int = 40
    ) -> pb.JoinResponse:
        sig = signature(weights if weights is not None else model())
        req = pb.JoinRequest(
            study=self.study,
            site=self.name,
            train_samples=train,
            test_samples=test,
            model=[s.to_proto() for s in sig],
        )
        resp: pb.JoinResponse = self.stub.Join(req, timeout=5)
        return resp

    def task(self, wait: float = 0.0) -> pb.TaskResponse:
        req = pb.TaskRequest(study=self.study, site=self.name, wait_seconds=wait)
        resp: pb.TaskResponse = self.stub.GetTask(req, timeout=wait + 5)
        return resp

    def header(self, round_: int, **fields: Any) -> dict[str, Any]:
        h: dict[str, Any] = {
            "study": self.study,
            "site": self.name,
            "round": round_,
            "base_version": max(round_ - 1, 0),
            "num_samples": 100,
            "update_id": uuid.uuid4().hex,
            "train_loss": 0.5,
        }
        h.update(fields)
        return h

    def submit(self, weights: Weights, round_: int, **fields: Any) -> pb.UpdateReceipt:
        h = self.header(round_, **fields)
        h.setdefault("tensor_count", len(weights))
        h.setdefault("total_bytes", total_bytes(weights))
        return self.submit_raw([header(**h), *tensor_messages(weights)])

    def reserve(
        self, weights: Weights, round_: int, wait: float = 0.0, **fields: Any
    ) -> tuple[pb.UploadGrant, str]:
        """Asks for room for an update of ``weights``; returns the answer and the update id
        (to submit with: ``submit(..., update_id=...)``)."""
        h = self.header(round_, **fields)
        h.setdefault("tensor_count", len(weights))
        h.setdefault("total_bytes", total_bytes(weights))
        req = pb.UploadReservation(header=pb.UpdateHeader(**h), wait_seconds=wait)
        grant: pb.UploadGrant = self.stub.ReserveUpload(req, timeout=wait + 5)
        return grant, h["update_id"]

    def submit_raw(self, messages: Iterable[pb.UpdateChunk]) -> pb.UpdateReceipt:
        resp: pb.UpdateReceipt = self.stub.SubmitUpdate(iter(list(messages)), timeout=10)
        return resp

    def download(self, version: int) -> Weights:
        req = pb.DownloadRequest(study=self.study, site=self.name, model_version=version)
        return from_chunks(self.stub.DownloadModel(req, timeout=10))

    def report(
        self,
        version: int,
        metrics: dict[str, float],
        *,
        final: bool = False,
        local_only: dict[str, float] | None = None,
        test: int = 40,
    ) -> pb.ReportReceipt:
        req = pb.ReportRequest(
            study=self.study,
            site=self.name,
            kind=pb.ReportRequest.FINAL if final else pb.ReportRequest.EVALUATION,
            model_version=version,
            test_samples=test,
            metrics=metrics,
            local_only_metrics=local_only or {},
        )
        resp: pb.ReportReceipt = self.stub.Report(req, timeout=5)
        return resp

    def leave(self, reason: str, message: str = "") -> pb.LeaveReceipt:
        req = pb.LeaveRequest(study=self.study, site=self.name, reason=reason, message=message)
        resp: pb.LeaveReceipt = self.stub.Leave(req, timeout=5)
        return resp


class Running:
    """A started aggregator and a channel to it."""

    def __init__(self, server: AggregatorServer) -> None:
        self.server = server
        self.endpoint = server.start()
        self.channel = grpc.insecure_channel(str(self.endpoint["grpc"]))
        self.stub = pb_grpc.AggregatorStub(self.channel)

    @property
    def coord(self) -> Any:
        return self.server.coord

    def site(self, name: str) -> Site:
        return Site(self.stub, name)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.endpoint['http']}/status", timeout=5) as r:
            data: dict[str, Any] = json.load(r)
            return data

    def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.coord.status()):
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out; status: {self.coord.status()}")

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0.5)


StartFn = Callable[..., Running]


def initialise(agg: Running, *names: str, init: Weights | None = None) -> list[Site]:
    """Joins the named sites and has the first deliver the initial model (version 0)."""
    sites = [agg.site(n) for n in names]
    for s in sites:
        assert s.join().accepted
    task = sites[0].task()
    assert task.kind == pb.TaskResponse.INIT
    receipt = sites[0].submit(init if init is not None else model(0), 0)
    assert receipt.accepted, receipt
    return sites
