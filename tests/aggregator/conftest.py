"""Fixtures of the aggregator tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from aggtest import Running, StartFn, make_study
from fedstudy_aggregator.rounds.admission import SPOOL_ABOVE_BYTES
from fedstudy_aggregator.server import AggregatorServer

from fedstudy.certs import Credentials
from fedstudy.spec import FederatedStudy


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartFn]:
    """Starts aggregators on 127.0.0.1:0 with state in ``tmp_path``; stops them afterwards."""
    running: list[Running] = []

    def _start(
        study: FederatedStudy | None = None,
        state: Path | None = None,
        out: Path | None = None,
        linger: float = 0.5,
        tls: Credentials | None = None,
        spool_above_bytes: int | None = SPOOL_ABOVE_BYTES,
    ) -> Running:
        srv = AggregatorServer(
            study or make_study(),
            state or tmp_path / "state",
            out or tmp_path / "out",
            listen="127.0.0.1:0",
            http="127.0.0.1:0",
            log=logging.getLogger("aggregator-test"),
            linger=linger,
            tick_seconds=0.02,
            tls=tls,
            spool_above_bytes=spool_above_bytes,
        )
        r = Running(srv)
        running.append(r)
        return r

    yield _start
    for r in running:
        r.close()
