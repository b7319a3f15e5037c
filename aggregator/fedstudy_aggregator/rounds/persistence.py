"""Checkpoint and resume: the coordinator's state to and from the state folder
(``..checkpoint`` writes it atomically), and the halt when a write fails.

After the initial model and after every round the global model, the strategy's state and
``state.json`` (the round machine's position and the study's record) are written; ``resume``
takes a restarted aggregator back to the last complete checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedstudy.logs import event

from ..checkpoint import CheckpointError, CheckpointStore, Snapshot
from ..strategies import Strategy
from .machine import RoundMachine
from .record import StudyRecord
from .store import GlobalModel


class DiskFailure(RuntimeError):
    """A checkpoint or output could not be written (a full disk, say)."""


class Persistence:
    """The aggregator's state folder; ``fatal`` says why the aggregator halted, if it did."""

    def __init__(self, state_dir: Path, log: logging.Logger) -> None:
        self.store = CheckpointStore(state_dir)
        self.log = log
        # Set when a write to disk failed: the process must stop (see disk_failure).
        self.fatal: str | None = None

    def disk_failure(self, what: str, err: OSError) -> DiskFailure:
        """Marks the aggregator as halted by a failed write; the process then exits non-zero.

        The writes are atomic, so the last complete checkpoint is still on disk: a restart
        (once there is room) resumes from it.
        """
        self.fatal = f"{what} failed: {err.strerror or err} ({err.filename or self.store.dir})"
        event(
            self.log,
            "disk-failure",
            logging.CRITICAL,
            what=what,
            error=self.fatal,
            last_checkpoint=self.store.state_path.name,
        )
        return DiskFailure(self.fatal)

    @staticmethod
    def state_json(
        record: StudyRecord, machine: RoundMachine, strategy: Strategy
    ) -> dict[str, Any]:
        return {
            "study": record.name,
            "strategy": strategy.name,
            "planned_rounds": machine.rounds,
            "phase": machine.phase,
            "version": machine.version,
            **record.to_json(),
        }

    def save_model(
        self,
        record: StudyRecord,
        machine: RoundMachine,
        strategy: Strategy,
        model: GlobalModel,
    ) -> None:
        """A checkpoint of the global model, the strategy's state and ``state.json``."""
        assert model.weights is not None
        assert machine.version is not None
        try:
            self.store.save(
                self.state_json(record, machine, strategy),
                model.weights,
                strategy.state_dict(),
                machine.version,
                model_digest=model.digest(),
            )
        except OSError as e:
            raise self.disk_failure(f"checkpoint of model version {machine.version}", e) from e

    def save_state(self, record: StudyRecord, machine: RoundMachine, strategy: Strategy) -> None:
        """``state.json`` alone (the model file it names stays)."""
        try:
            self.store.save_state(self.state_json(record, machine, strategy))
        except OSError as e:
            raise self.disk_failure("writing state.json", e) from e

    def load(self, study: str, strategy: Strategy) -> Snapshot | None:
        """The last checkpoint (None in a fresh folder), checked to be this study's and this
        strategy's (``CheckpointError`` otherwise)."""
        snap = self.store.load()
        if snap is None:
            return None
        st = snap.state
        if st.get("study") != study:
            raise CheckpointError(
                f"{self.store.state_path}: holds study {st.get('study')!r}, not {study!r}"
            )
        if st.get("strategy") != strategy.name:
            raise CheckpointError(
                f"{self.store.state_path}: was run with strategy {st.get('strategy')!r}, the "
                f"study now names {strategy.name!r}; use a fresh state folder"
            )
        return snap

    @staticmethod
    def restore(
        snap: Snapshot,
        record: StudyRecord,
        machine: RoundMachine,
        strategy: Strategy,
        model: GlobalModel,
        now: float,
    ) -> None:
        """Takes the checkpoint's state into the parts."""
        st = snap.state
        if snap.model is not None:
            model.set(snap.model)
            strategy.load_state_dict(snap.strategy_state)
        record.load_json(st)
        version = st.get("version") if snap.model is not None else None
        machine.resume(str(st.get("phase")), version, now)
