"""ReserveUpload: a site waits for room before it sends its update, holding nothing, and the
room it was granted is its stream's; room that no stream claims is given back."""

from __future__ import annotations

import threading

from aggtest import Running, StartFn, initialise, make_study, model
from fedstudy_aggregator.rounds.admission import ByteBudget


def _waiting_gauge(agg: Running) -> float:
    (line,) = [
        ln
        for ln in agg.coord.metrics.text().splitlines()
        if ln.startswith("fedstudy_uploads_waiting{")
    ]
    return float(line.rsplit(" ", 1)[1])


def test_a_granted_reservation_holds_the_room_until_its_update_arrives(start: StartFn) -> None:
    # In memory, one update arrives at a time: a's reservation keeps b waiting.
    agg = start(make_study(sites=2, rounds=1), spool_above_bytes=None)
    a, b = initialise(agg, "s0", "s1")
    grant_a, id_a = a.reserve(model(1.0), 1)
    assert grant_a.granted, grant_a
    grant_b, _ = b.reserve(model(3.0), 1, wait=0.3)
    assert (grant_b.granted, grant_b.reason) == (False, "busy")
    assert a.submit(model(1.0), 1, update_id=id_a).accepted
    # a's stream ended and gave the room back: b is granted at once.
    grant_b, id_b = b.reserve(model(3.0), 1, wait=5)
    assert grant_b.granted, grant_b
    assert b.submit(model(3.0), 1, update_id=id_b).accepted
    assert agg.coord.status()["completed_rounds"] == 1
    assert agg.coord.admission.staging.items == 0


def test_a_waiting_reservation_is_granted_when_the_room_comes_back(start: StartFn) -> None:
    agg = start(make_study(sites=2, rounds=1), spool_above_bytes=None)
    a, b = initialise(agg, "s0", "s1")
    grant_a, id_a = a.reserve(model(1.0), 1)
    assert grant_a.granted
    answers: list[bool] = []
    waiting = threading.Thread(
        target=lambda: answers.append(b.reserve(model(3.0), 1, 10)[0].granted)
    )
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # b waits for the room a holds
    assert agg.coord.admission.waiting == 1
    assert _waiting_gauge(agg) == 1.0
    assert a.submit(model(1.0), 1, update_id=id_a).accepted
    waiting.join(10)
    assert answers == [True]
    assert _waiting_gauge(agg) == 0.0


def test_a_reservation_the_header_checks_refuse_says_why_and_counts_no_refusal(
    start: StartFn,
) -> None:
    agg = start(make_study(sites=3, rounds=1), spool_above_bytes=None)
    a, _ = initialise(agg, "s0", "s1")
    never_joined = agg.site("s2")
    cases = [
        (a.reserve(model(1.0), 2, base_version=1)[0], "future-round"),
        (a.reserve(model(1.0), 0)[0], "stale-round"),
        (never_joined.reserve(model(1.0), 1)[0], "not-joined"),
        (agg.site("elsewhere").reserve(model(1.0), 1)[0], "unknown-site"),
        (a.reserve(model(1.0), 1, study="other")[0], "wrong-study"),
        (a.reserve(model(1.0), 1, update_id="")[0], "bad-stream"),
    ]
    for grant, reason in cases:
        assert (grant.granted, grant.reason) == (False, reason), grant
        assert grant.message
    assert agg.coord.status()["refused_updates"] == {}
    assert agg.coord.admission.staging.items == 0
    # Once a site's update is in, it is told so before it sends another.
    assert a.submit(model(1.0), 1).accepted
    grant, _ = a.reserve(model(1.0), 1)
    assert (grant.granted, grant.reason) == (False, "duplicate")


def test_room_no_stream_claims_is_given_back_after_the_reservation_expires(
    start: StartFn,
) -> None:
    agg = start(make_study(sites=2, rounds=1), spool_above_bytes=None)
    agg.coord.admission.reservation_ttl = 0.5
    a, b = initialise(agg, "s0", "s1")
    assert a.reserve(model(1.0), 1)[0].granted  # and a never sends its update
    grant_b, id_b = b.reserve(model(3.0), 1, wait=10)
    assert grant_b.granted, grant_b
    assert b.submit(model(3.0), 1, update_id=id_b).accepted
    # a's update, sent late under its expired reservation, waits for room like any other.
    assert a.submit(model(1.0), 1).accepted
    assert agg.coord.status()["completed_rounds"] == 1


def test_a_sites_new_reservation_replaces_its_older_one(start: StartFn) -> None:
    agg = start(make_study(sites=2, rounds=1), spool_above_bytes=None)
    a, _ = initialise(agg, "s0", "s1")
    first, _ = a.reserve(model(1.0), 1)
    second, id_second = a.reserve(model(1.0), 1, wait=0.3)  # e.g. a retry with a new id
    assert first.granted
    assert second.granted
    assert agg.coord.admission.staging.items == 1
    assert a.submit(model(1.0), 1, update_id=id_second).accepted
    assert agg.coord.admission.staging.items == 0


def test_spooled_updates_arrive_within_the_concurrency_limit(start: StartFn) -> None:
    agg = start(make_study(sites=3, rounds=1), spool_above_bytes=0)
    agg.coord.admission.spooling.max_items = 2
    a, b, c = initialise(agg, "s0", "s1", "s2")
    assert a.reserve(model(1.0), 1)[0].granted
    assert b.reserve(model(2.0), 1)[0].granted
    grant_c, _ = c.reserve(model(3.0), 1, wait=0.3)
    assert (grant_c.granted, grant_c.reason) == (False, "busy")


def test_a_byte_budget_admits_at_most_max_items() -> None:
    budget = ByteBudget(1000, max_items=2)
    assert budget.acquire(10)
    assert budget.acquire(10)
    assert not budget.acquire(10, timeout=0.1)  # the bytes fit, a third item does not
    budget.release(10)
    assert budget.acquire(10, timeout=0.1)
    assert (budget.items, budget.in_use) == (2, 20)
    alone = ByteBudget(0, max_items=1)
    assert alone.acquire(5000)  # larger than the limit: admitted alone
    assert not alone.acquire(1, timeout=0.1)


def test_many_waiters_are_all_admitted_one_at_a_time() -> None:
    # Release wakes one waiter, not all: none may be left behind, and one holds at a time.
    budget = ByteBudget(0, max_items=1)
    holding: list[int] = []
    most = [0]
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            with budget.take(100):
                with lock:
                    holding.append(1)
                    most[0] = max(most[0], len(holding))
                with lock:
                    holding.pop()

    threads = [threading.Thread(target=work) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert most == [1]
    assert (budget.items, budget.in_use) == (0, 0)
