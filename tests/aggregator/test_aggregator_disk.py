"""A full disk stops the aggregator loudly, and its last checkpoint survives."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from aggtest import Site, study_doc
from fedstudy_aggregator.checkpoint import CheckpointStore

from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import aggregator_pb2_grpc as pb_grpc

MODEL_FLOATS = 100_000  # 400 kB a model: one checkpoint fits the disk, two do not


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 kB tmpfs (needs root, as in CI); skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _endpoint(state: Path, proc: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"aggregator exited early: {proc.communicate()}")
        try:
            return str(json.loads((state / "endpoint.json").read_text())["grpc"])
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the aggregator did not start")


def test_full_disk_fails_the_aggregator_loudly_and_keeps_the_last_checkpoint(
    tmp_path: Path, small_disk: Path
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(study_doc(1, minSites=1, rounds=3)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstudy", "aggregator", "--study", str(study), "--listen",
         "127.0.0.1:0", "--http", "127.0.0.1:0", "--state-dir", str(small_disk),
         "--out", str(tmp_path / "out"), "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(_endpoint(small_disk, proc)) as channel:
            site = Site(pb_grpc.AggregatorStub(channel), "s0")
            weights = {"w": np.zeros(MODEL_FLOATS, np.float32)}
            assert site.join(weights).accepted
            assert site.task().kind == pb.TaskResponse.INIT
            assert site.submit(weights, 0).accepted  # version 0: 400 kB, fits
            task = site.task()
            assert (task.kind, task.round) == (pb.TaskResponse.TRAIN, 1)
            # Closing round 1 writes version 1 beside version 0: the disk is full.
            with pytest.raises(grpc.RpcError) as info:
                site.submit({"w": np.ones(MODEL_FLOATS, np.float32)}, 1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "checkpoint of model version 1 failed: No space left on device" in err
    assert "The last complete checkpoint" in err
    assert '"event": "disk-failure"' in err
    # The previous checkpoint is whole and loads; no half-written file is left behind.
    snapshot = CheckpointStore(small_disk).load()
    assert snapshot is not None
    assert snapshot.state["version"] == 0
    assert snapshot.model is not None
    np.testing.assert_array_equal(snapshot.model["w"], np.zeros(MODEL_FLOATS, np.float32))
    assert not [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")]
