"""Runs a whole study in this process: the real aggregator and one real SiteTrainer per site
(each in a thread, on loopback without TLS), for the privacy tests."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from fedstudy_aggregator.server import AggregatorServer
from fedstudy_trainer.client import SiteTrainer
from fedstudy_trainer.data import load_site_data

from fedstudy.spec import FederatedStudy
from fedstudy.wire import aggregator_pb2_grpc


@dataclass
class StudyRun:
    out: Path
    states: dict[str, Path]
    codes: dict[str, int | BaseException] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "summary.json").read_text())
        return data

    @property
    def lines(self) -> list[dict[str, Any]]:
        text = (self.out / "metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def ledger(self, site: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.states[site] / "privacy-ledger.json").read_text())
        return data


def run_study(
    study: FederatedStudy,
    root: Path,
    *,
    base_dir: Path | None = None,
    trainer_hook: Callable[[SiteTrainer], None] | None = None,
    restart_on: type[BaseException] | None = None,
    timeout: float = 120.0,
) -> StudyRun:
    """Runs ``study`` to its end; ``trainer_hook`` may patch each trainer before it runs; a
    trainer that dies of ``restart_on`` is started again (once) on the same state dir."""
    out = root / "out"
    server = AggregatorServer(
        study,
        root / "aggregator",
        out,
        listen="127.0.0.1:0",
        http="127.0.0.1:0",
        log=logging.getLogger("privacy-test.aggregator"),
        linger=0.5,
        tick_seconds=0.02,
    )
    endpoint = server.start()
    result = StudyRun(out, {s.name: root / "sites" / s.name for s in study.spec.sites})

    channels: list[grpc.Channel] = []

    def build(name: str) -> SiteTrainer:
        channel = grpc.insecure_channel(str(endpoint["grpc"]))
        channels.append(channel)
        return SiteTrainer(
            study,
            name,
            load_site_data(study, name, base_dir or root),
            aggregator_pb2_grpc.AggregatorStub(channel),
            result.states[name],
            logging.getLogger("fedstudy.trainer"),
            connect_timeout=30,
            wait_seconds=1.0,
        )

    # Trainers are built here, one after the other: building a model seeds torch's global
    # generator, which threads would share.
    trainers = {s.name: build(s.name) for s in study.spec.sites}
    if trainer_hook is not None:
        for t in trainers.values():
            trainer_hook(t)

    def trainer(name: str) -> None:
        try:
            result.codes[name] = trainers[name].run()
        except BaseException as e:
            result.codes[name] = e
            if restart_on is None or not isinstance(e, restart_on):
                return
        else:
            return
        try:  # a new trainer on the same state dir, as after a kill
            result.codes[name] = build(name).run()
        except BaseException as e:
            result.codes[name] = e

    threads = [threading.Thread(target=trainer, args=(s.name,)) for s in study.spec.sites]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        result.status = server.coord.status()
    finally:
        server.stop(grace=0.5)
        for channel in channels:
            channel.close()
    return result
