"""The gRPC face of the aggregator: each RPC hands its message to the ``Coordinator``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from fedstudy.logs import event
from fedstudy.tensors import to_chunks
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc
from fedstudy.wire import tensors_pb2

from .rounds import Coordinator, DownloadRefused

_CODES = {
    "invalid-argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not-found": grpc.StatusCode.NOT_FOUND,
    "failed-precondition": grpc.StatusCode.FAILED_PRECONDITION,
}


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, coordinator: Coordinator, log: logging.Logger) -> None:
        self.coord = coordinator
        self.log = log

    def Join(  # noqa: N802
        self, request: pb.JoinRequest, context: grpc.ServicerContext
    ) -> pb.JoinResponse:
        return self.coord.join(request)

    def GetTask(  # noqa: N802
        self, request: pb.TaskRequest, context: grpc.ServicerContext
    ) -> pb.TaskResponse:
        return self.coord.get_task(request, context.is_active)

    def DownloadModel(  # noqa: N802
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[tensors_pb2.TensorChunk]:
        try:
            weights = self.coord.model_for_download(request)
        except DownloadRefused as e:
            context.abort(_CODES[e.code], str(e))
        yield from to_chunks(weights)

    def SubmitUpdate(  # noqa: N802
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UpdateReceipt:
        try:
            return self.coord.submit(request_iterator)
        except grpc.RpcError as e:
            # The client went away mid-stream; nothing was folded in.
            event(self.log, "update-dropped", logging.WARNING, error=repr(e))
            context.abort(grpc.StatusCode.CANCELLED, "the update stream was dropped")

    def Report(  # noqa: N802
        self, request: pb.ReportRequest, context: grpc.ServicerContext
    ) -> pb.ReportReceipt:
        return self.coord.report(request)

    def Leave(  # noqa: N802
        self, request: pb.LeaveRequest, context: grpc.ServicerContext
    ) -> pb.LeaveReceipt:
        return self.coord.leave(request)
