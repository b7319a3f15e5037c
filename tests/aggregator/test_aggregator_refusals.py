"""Every refusal reason of docs/protocol.md: the receipt says why, and the round goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from aggtest import (
    Running,
    Site,
    StartFn,
    header,
    initialise,
    make_study,
    model,
    stalled_upload,
    tensor_messages,
)
from aggtest import update_messages as stream
from fedstudy_aggregator.rounds.checks import CONTENT_REFUSALS

from fedstudy.tensors import Weights, total_bytes
from fedstudy.wire import aggregator_pb2 as pb

A_ID = "update-of-s0-round-1"


@dataclass
class Ctx:
    a: Site
    b: Site
    c: Site  # listed in the study, never joined


Messages = list[pb.UpdateChunk]


def changed(**tensors: np.ndarray) -> Weights:
    w = model(2.0)
    w.update(tensors)
    return w


def _without_b() -> Weights:
    w = model(2.0)
    del w["b"]
    return w


def _gap(ctx: Ctx) -> Messages:
    w = model(2.0)
    msgs = [header(**ctx.b.header(1, tensor_count=3, total_bytes=total_bytes(w)))]
    chunks = tensor_messages(w, chunk_bytes=8)
    return msgs + chunks[:1] + chunks[2:]  # w's second chunk is missing


def _oversized_chunk(ctx: Ctx) -> Messages:
    msgs = stream(ctx.b, model(2.0))
    msgs[1].tensor.data = bytes(2 << 20)  # 2 MiB in one chunk of a 24-byte tensor
    return msgs


def _second_header(ctx: Ctx) -> Messages:
    msgs = stream(ctx.b, model(2.0))
    return [*msgs[:2], header(**ctx.b.header(1)), *msgs[2:]]


CASES: dict[str, tuple[str, Callable[[Ctx], tuple[Site, Messages]]]] = {
    "wrong-study": ("wrong-study", lambda c: (c.b, stream(c.b, model(2.0), study="other"))),
    "unknown-site": ("unknown-site", lambda c: (c.b, stream(c.b, model(2.0), site="nowhere"))),
    "not-joined": ("not-joined", lambda c: (c.c, stream(c.c, model(2.0)))),
    "stale-round": ("stale-round", lambda c: (c.b, stream(c.b, model(2.0), round=0))),
    "future-round": (
        "future-round",
        lambda c: (c.b, stream(c.b, model(2.0), round=2, base_version=1)),
    ),
    "duplicate": ("duplicate", lambda c: (c.a, stream(c.a, model(2.0)))),
    "replay": ("replay", lambda c: (c.b, stream(c.b, model(2.0), update_id=A_ID))),
    "wrong-base": ("wrong-base", lambda c: (c.b, stream(c.b, model(2.0), base_version=1))),
    "no-samples": ("no-samples", lambda c: (c.b, stream(c.b, model(2.0), num_samples=0))),
    "bad-stream-no-header": ("bad-stream", lambda c: (c.b, stream(c.b, model(2.0))[1:])),
    "bad-stream-empty": ("bad-stream", lambda c: (c.b, [])),
    "bad-stream-gap": ("bad-stream", lambda c: (c.b, _gap(c))),
    "bad-stream-second-header": ("bad-stream", lambda c: (c.b, _second_header(c))),
    "bad-stream-counts": ("bad-stream", lambda c: (c.b, stream(c.b, model(2.0), tensor_count=2))),
    "bad-stream-no-id": ("bad-stream", lambda c: (c.b, stream(c.b, model(2.0), update_id=""))),
    "unknown-tensor": (
        "unknown-tensor",
        lambda c: (c.b, stream(c.b, changed(extra=np.zeros(2, np.float32)))),
    ),
    "missing-tensor": ("missing-tensor", lambda c: (c.b, stream(c.b, _without_b()))),
    "wrong-shape": (
        "wrong-shape",
        lambda c: (c.b, stream(c.b, changed(w=np.zeros((3, 2), np.float32)))),
    ),
    "wrong-dtype": (
        "wrong-dtype",
        lambda c: (c.b, stream(c.b, changed(w=np.zeros((2, 3), np.float64)))),
    ),
    "non-finite-nan": (
        "non-finite",
        lambda c: (c.b, stream(c.b, changed(w=np.array([[0, 1, np.nan], [0, 0, 0]], np.float32)))),
    ),
    "non-finite-inf": (
        "non-finite",
        lambda c: (c.b, stream(c.b, changed(b=np.array([0, -np.inf, 0], np.float32)))),
    ),
    "too-large-header": (
        "too-large",
        lambda c: (c.b, stream(c.b, model(2.0), total_bytes=10**9)),
    ),
    "too-large-stream": ("too-large", lambda c: (c.b, _oversized_chunk(c))),
}


# Updates received into memory, and into a spool file (every model above 0 bytes).
RECEIVE = {"in-memory": None, "spooled": 0}


@pytest.mark.parametrize("receive", sorted(RECEIVE))
@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_keeps_the_round_going(
    start: StartFn, case: str, receive: str, caplog: pytest.LogCaptureFixture
) -> None:
    reason, build = CASES[case]
    agg: Running = start(
        make_study(sites=3, minSites=2, rounds=1), spool_above_bytes=RECEIVE[receive]
    )
    a, b = initialise(agg, "s0", "s1")
    ctx = Ctx(a, b, agg.site("s2"))
    assert a.submit(model(1.0), 1, num_samples=1, update_id=A_ID).accepted

    sender, messages = build(ctx)
    receipt = sender.submit_raw(messages)
    assert (receipt.accepted, receipt.reason) == (False, reason), receipt.message
    assert receipt.message
    refusals = [r for r in caplog.records if r.getMessage() == "update-refused"]
    assert [r.__dict__["fields"]["reason"] for r in refusals] == [reason]

    if reason in CONTENT_REFUSALS and sender is ctx.b:
        # b's answer for the round was refused for what it holds: the round does not wait for
        # b, and closes at once with a's update alone.
        agg.wait_for(lambda s: s["completed_rounds"] == 1)
        assert agg.coord.status()["refused_updates"] == {reason: 1}
        g1 = a.download(1)
        np.testing.assert_allclose(g1["w"], np.arange(6).reshape(2, 3) + 1.0)
        np.testing.assert_array_equal(g1["steps"], [10, 3])
        return
    # the round goes on and closes with the good updates only
    assert agg.coord.status()["completed_rounds"] == 0
    assert b.submit(model(3.0), 1, num_samples=3).accepted
    st = agg.coord.status()
    assert st["completed_rounds"] == 1
    assert st["refused_updates"] == {reason: 1}
    g1 = a.download(1)
    np.testing.assert_allclose(g1["w"], np.arange(6).reshape(2, 3) + 2.5)
    np.testing.assert_array_equal(g1["steps"], [25, 3])


@pytest.mark.parametrize("receive", sorted(RECEIVE))
def test_concurrent_updates_all_count(start: StartFn, receive: str) -> None:
    agg = start(make_study(sites=6, minSites=6, rounds=1), spool_above_bytes=RECEIVE[receive])
    sites = initialise(agg, *[f"s{i}" for i in range(6)])
    receipts: list[pb.UpdateReceipt] = []
    lock = threading.Lock()

    def send(i: int, s: Site) -> None:
        r = s.submit(model(float(i)), 1, num_samples=i + 1)
        with lock:
            receipts.append(r)

    threads = [threading.Thread(target=send, args=(i, s)) for i, s in enumerate(sites)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert all(r.accepted for r in receipts)
    assert len(receipts) == 6
    # weights 1..6 on seeds 0..5: mean seed = sum(i*(i+1)) / 21 = 70/21
    g1 = sites[0].download(1)
    np.testing.assert_allclose(g1["b"], np.full(3, 70 / 21), rtol=1e-6)


def test_a_dropped_stream_frees_the_staging_buffer(
    start: StartFn, caplog: pytest.LogCaptureFixture
) -> None:
    agg = start(make_study(sites=2, rounds=1))
    a, b = initialise(agg, "s0", "s1")
    release = threading.Event()
    call = stalled_upload(b, model(2.0), release)
    deadline = time.monotonic() + 5
    while not agg.coord.admission.staging.items:  # b's stream now holds the staging buffer
        assert time.monotonic() < deadline
        time.sleep(0.01)
    call.cancel()
    release.set()
    assert a.submit(model(1.0), 1, num_samples=1).accepted
    assert b.submit(model(3.0), 1, num_samples=3).accepted
    assert agg.coord.status()["completed_rounds"] == 1
    deadline = time.monotonic() + 10  # the cancelled stream is noticed on the server's time
    while "update-dropped" not in [r.getMessage() for r in caplog.records]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert agg.coord.status()["refused_updates"] == {}
