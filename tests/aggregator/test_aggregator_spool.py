"""Updates of large models are received into a nameless spool file and folded from it a block
at a time: the same checks, the same global model as in memory, and nothing left behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtest import (
    Running,
    StartFn,
    initialise,
    make_study,
    model,
    stalled_upload,
)
from fedstudy_aggregator.rounds.admission import ByteBudget

from fedstudy.tensors import Weights

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedavg-clipped": {"name": "fedavg", "maxUpdateNorm": 2.0, "normPolicy": "clip"},
    "fedadam": {"name": "fedadam", "serverLearningRate": 0.1},
    "median": {"name": "median"},
}


def _round_one(agg: Running) -> Weights:
    sites = initialise(agg, "s0", "s1", "s2")
    for seed, site, n in zip((1.0, 2.5, 4.0), sites, (3, 1, 2), strict=True):
        assert site.submit(model(seed), 1, num_samples=n).accepted
    agg.wait_for(lambda s: s["completed_rounds"] == 1)
    return sites[0].download(1)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_spooled_updates_make_the_same_global_model_as_in_memory(
    start: StartFn, tmp_path: Path, strategy: str
) -> None:
    def run(spool_above_bytes: int | None, name: str) -> Weights:
        study = make_study(sites=3, minSites=3, rounds=2, strategy=STRATEGIES[strategy])
        agg = start(
            study,
            state=tmp_path / name / "state",
            out=tmp_path / name / "out",
            spool_above_bytes=spool_above_bytes,
        )
        return _round_one(agg)

    in_memory = run(None, "memory")
    spooled = run(0, "spooled")
    assert list(spooled) == list(in_memory)
    for k in in_memory:
        assert spooled[k].dtype == in_memory[k].dtype
        np.testing.assert_array_equal(spooled[k], in_memory[k])


def _spool_fds(directory: Path) -> list[str]:
    """This process's open files in ``directory`` (a nameless file shows as ``#inode``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def test_a_dropped_spooled_stream_leaves_no_file_behind(start: StartFn, tmp_path: Path) -> None:
    agg = start(make_study(sites=2, rounds=1), spool_above_bytes=0)
    spool_dir = tmp_path / "state" / "incoming"
    a, b = initialise(agg, "s0", "s1")
    release = threading.Event()
    call = stalled_upload(b, model(2.0), release)
    deadline = time.monotonic() + 5
    while not _spool_fds(spool_dir):  # b's update is being received into a spool file
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(spool_dir.iterdir()) == []  # the file has no name
    call.cancel()
    release.set()
    while _spool_fds(spool_dir):
        assert time.monotonic() < deadline, _spool_fds(spool_dir)
        time.sleep(0.01)
    # The round goes on with both sites, each update through its own spool file.
    assert a.submit(model(1.0), 1, num_samples=1).accepted
    assert b.submit(model(3.0), 1, num_samples=3).accepted
    agg.wait_for(lambda s: s["completed_rounds"] == 1)
    np.testing.assert_allclose(a.download(1)["b"], np.full(3, 2.5))
    assert _spool_fds(spool_dir) == []


def test_the_spool_budget_admits_updates_while_their_bytes_fit() -> None:
    budget = ByteBudget(1000)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def hold(name: str, nbytes: int, entered: threading.Event, release: threading.Event) -> None:
        with budget.take(nbytes):
            order.append(f"{name} in")
            entered.set()
            release.wait(5)
            order.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a", 600, first_in, release_first))
    a.start()
    assert first_in.wait(5)
    with budget.take(400):  # fits next to a's 600
        order.append("b in and out")
    b_in = threading.Event()
    go_on = threading.Event()
    go_on.set()
    b = threading.Thread(target=hold, args=("c", 600, b_in, go_on))
    b.start()
    assert not b_in.wait(0.2)  # 600 + 600 is over the budget: c waits for a
    release_first.set()
    assert b_in.wait(5)
    a.join(5)
    b.join(5)
    assert order == ["a in", "b in and out", "a out", "c in", "c out"]
    with budget.take(5000):  # larger than the whole budget: admitted alone
        assert budget.in_use == 5000
    assert budget.in_use == 0
