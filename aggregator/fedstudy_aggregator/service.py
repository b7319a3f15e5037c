"""The gRPC face of the aggregator: each RPC hands its message to the ``Coordinator``.

With mutual TLS the caller's identity is the common name of its verified certificate, and a
call that names another site is refused (``identity-mismatch``) before the coordinator sees
it; the refusal is logged and counted like any other.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any, cast

import grpc

from fedstudy.logs import event
from fedstudy.tensors import encoded_chunks
from fedstudy.tls import peer_certificate_sha256, peer_name
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

from .rounds import Coordinator, DiskFailure, DownloadRefused

_CODES = {
    "invalid-argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not-found": grpc.StatusCode.NOT_FOUND,
    "failed-precondition": grpc.StatusCode.FAILED_PRECONDITION,
}


class _Handlers:
    """Stands in for a server to collect the method handlers the generated code registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, handlers


def _passthrough(message: bytes) -> bytes:
    return message


def add_to_server(service: AggregatorService, server: grpc.Server) -> None:
    """Registers the service as the generated code does, except that ``DownloadModel``
    sends chunks it has serialized itself (``encoded_chunks``: one copy of the model's bytes
    per download instead of three)."""
    collected = _Handlers()
    pb_grpc.add_AggregatorServicer_to_server(service, cast(grpc.Server, collected))
    handlers = dict(collected.handlers)
    handlers["DownloadModel"] = grpc.unary_stream_rpc_method_handler(
        service.DownloadModel,
        request_deserializer=pb.DownloadRequest.FromString,
        response_serializer=_passthrough,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(collected.service, handlers),)
    )
    server.add_registered_method_handlers(collected.service, handlers)


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(
        self, coordinator: Coordinator, log: logging.Logger, *, verify_identity: bool = False
    ) -> None:
        self.coord = coordinator
        self.log = log
        self.verify_identity = verify_identity

    def _impostor(self, context: grpc.ServicerContext, claimed: str, rpc: str) -> str | None:
        """Why the caller may not speak for site ``claimed``, or None when it may."""
        if not self.verify_identity:
            return None
        peer = peer_name(context)
        if peer == claimed:
            return None
        message = (
            f"the client certificate names {peer!r}, the call claims site {claimed!r}"
            if peer
            else "the call carries no verified client certificate"
        )
        self.coord.record_refused_call("identity-mismatch", rpc, claimed, peer, message)
        return message

    def Join(  # noqa: N802
        self, request: pb.JoinRequest, context: grpc.ServicerContext
    ) -> pb.JoinResponse:
        if (why := self._impostor(context, request.site, "Join")) is not None:
            return pb.JoinResponse(accepted=False, reason="identity-mismatch", message=why)
        fingerprint = peer_certificate_sha256(context) if self.verify_identity else None
        try:
            return self.coord.join(
                request, certificate_sha256=fingerprint, mutual_tls=self.verify_identity
            )
        except DiskFailure as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the aggregator is stopping: {e}")

    def GetTask(  # noqa: N802
        self, request: pb.TaskRequest, context: grpc.ServicerContext
    ) -> pb.TaskResponse:
        if (why := self._impostor(context, request.site, "GetTask")) is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return self.coord.get_task(request, context.is_active)

    def DownloadModel(  # type: ignore[override]  # noqa: N802 - serialized chunks: add_to_server
        self, request: pb.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """The global model as serialized ``TensorChunk``s (see ``add_to_server``)."""
        if (why := self._impostor(context, request.site, "DownloadModel")) is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        try:
            weights = self.coord.model_for_download(request)
        except DownloadRefused as e:
            context.abort(_CODES[e.code], str(e))
        yield from encoded_chunks(weights)

    def ReserveUpload(  # noqa: N802
        self, request: pb.UploadReservation, context: grpc.ServicerContext
    ) -> pb.UploadGrant:
        why = self._impostor(context, request.header.site, "ReserveUpload")
        if why is not None:
            return pb.UploadGrant(granted=False, reason="identity-mismatch", message=why)
        return self.coord.reserve(request, context.is_active)

    def SubmitUpdate(  # noqa: N802
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.UpdateReceipt:
        first = next(request_iterator, None)
        if first is not None and first.WhichOneof("part") == "header":
            why = self._impostor(context, first.header.site, "SubmitUpdate")
            if why is not None:
                return pb.UpdateReceipt(accepted=False, reason="identity-mismatch", message=why)
        stream = itertools.chain([first] if first is not None else [], request_iterator)
        try:
            return self.coord.submit(stream)
        except grpc.RpcError as e:
            # The client went away mid-stream; nothing was folded in.
            event(self.log, "update-dropped", logging.WARNING, error=repr(e))
            context.abort(grpc.StatusCode.CANCELLED, "the update stream was dropped")
        except DiskFailure as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the aggregator is stopping: {e}")

    def Report(  # noqa: N802
        self, request: pb.ReportRequest, context: grpc.ServicerContext
    ) -> pb.ReportReceipt:
        if (why := self._impostor(context, request.site, "Report")) is not None:
            return pb.ReportReceipt(accepted=False, reason="identity-mismatch", message=why)
        try:
            return self.coord.report(request)
        except DiskFailure as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the aggregator is stopping: {e}")

    def Leave(  # noqa: N802
        self, request: pb.LeaveRequest, context: grpc.ServicerContext
    ) -> pb.LeaveReceipt:
        if self._impostor(context, request.site, "Leave") is not None:
            return pb.LeaveReceipt(accepted=False)
        try:
            return self.coord.leave(request)
        except DiskFailure as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the aggregator is stopping: {e}")
