"""Fixtures of the trainer's tests: the heart-disease study, the log collector, a server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from trainer_support import HEART_FILES, HEART_STUDY, EventLog, FakeAggregator, heart_dir

from fedstudy.spec import FederatedStudy, load_study, parse_study
from fedstudy.wire import aggregator_pb2_grpc


@pytest.fixture(scope="session")
def heart_study() -> FederatedStudy:
    """examples/heart-disease.yaml with its data paths made absolute (skips without data)."""
    study = load_study(HEART_STUDY)
    folder = heart_dir(study)
    if folder is None:
        pytest.skip(
            "heart-disease data absent: set FEDSTUDY_HEART_DISEASE_DIR to a folder holding "
            + ", ".join(HEART_FILES.values())
        )
    doc = study.model_dump(mode="json", exclude_none=True)
    for site in doc["spec"]["sites"]:
        site["data"]["path"] = str(folder / HEART_FILES[site["name"]])
    return parse_study(doc)


@pytest.fixture
def events() -> Iterator[EventLog]:
    """Attaches a collector to the trainer's logger (so logs.setup adds no stderr handler)."""
    logger = logging.getLogger("fedstudy.trainer")
    saved = list(logger.handlers)
    for h in saved:
        logger.removeHandler(h)
    collector = EventLog()
    logger.addHandler(collector)
    yield collector
    logger.removeHandler(collector)
    for h in saved:
        logger.addHandler(h)


@dataclass
class Served:
    fake: FakeAggregator
    address: str


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(fake) starts a gRPC server for the fake on a free loopback port."""
    servers: list[grpc.Server] = []

    def start(fake: FakeAggregator) -> Served:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        aggregator_pb2_grpc.add_AggregatorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return Served(fake, f"127.0.0.1:{port}")

    yield start
    for server in servers:
        server.stop(grace=None)
