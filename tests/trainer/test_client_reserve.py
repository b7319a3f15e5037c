"""The trainer asks for room before it uploads: it asks again while the aggregator is busy,
and sends at once to an aggregator that has no ReserveUpload."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from fedstudy_trainer.client import SiteTrainer

from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

HEADER = pb.UpdateHeader(study="s", site="north", round=1, update_id="u1")


class Busy(pb_grpc.AggregatorServicer):
    """Busy twice, then grants; every other call is the generated UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.asked: list[pb.UploadReservation] = []

    def ReserveUpload(  # noqa: N802
        self, request: pb.UploadReservation, context: grpc.ServicerContext
    ) -> pb.UploadGrant:
        self.asked.append(request)
        if len(self.asked) < 3:
            return pb.UploadGrant(granted=False, reason="busy")
        return pb.UploadGrant(granted=True)


def _serve(servicer: pb_grpc.AggregatorServicer) -> Iterator[SimpleNamespace]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        # What SiteTrainer._reserve reads of the trainer.
        yield SimpleNamespace(
            stub=pb_grpc.AggregatorStub(channel), wait_seconds=2.0, reserve_uploads=True
        )
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture
def busy() -> Iterator[tuple[Busy, SimpleNamespace]]:
    servicer = Busy()
    for trainer in _serve(servicer):
        yield servicer, trainer


@pytest.fixture
def old_aggregator() -> Iterator[SimpleNamespace]:
    yield from _serve(pb_grpc.AggregatorServicer())


def test_the_trainer_asks_again_while_the_aggregator_is_busy(
    busy: tuple[Busy, SimpleNamespace],
) -> None:
    servicer, trainer = busy
    SiteTrainer._reserve(trainer, HEADER)  # type: ignore[arg-type]
    assert len(servicer.asked) == 3
    assert all(r.header.update_id == "u1" and r.wait_seconds == 2.0 for r in servicer.asked)
    assert trainer.reserve_uploads


def test_an_aggregator_without_reserve_upload_gets_the_update_at_once(
    old_aggregator: SimpleNamespace,
) -> None:
    SiteTrainer._reserve(old_aggregator, HEADER)  # type: ignore[arg-type]
    assert old_aggregator.reserve_uploads is False
    # Not asked again for the next update.
    old_aggregator.stub = None
    SiteTrainer._reserve(old_aggregator, HEADER)  # type: ignore[arg-type]
