"""Admission: room for the updates arriving, so that the aggregator's memory stays flat
whatever the number of sites.

A small model's update is received into memory, one at a time (``staging``); a large model's
(above ``spool_above_bytes``) into a nameless spool file, several side by side within a byte
budget (``spooling``). A site asks for that room first (``reserve``, the ReserveUpload call)
and waits for it holding nothing; an update sent without asking waits for room with its
stream open, and the data gRPC has already taken in for it waits in memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Long polls (GetTask, ReserveUpload) wait at most this long before they answer.
MAX_WAIT_SECONDS = 30.0
# Updates of models larger than this are received into a file (see ``store.examine`` and
# ``strategies.Update``), so the aggregator holds the global model and the round's running
# mean, and not the update too; smaller ones are received into memory.
SPOOL_ABOVE_BYTES = 64 << 20
# How many bytes of spooled updates may be arriving at once (always at least one update):
# beyond the kernel's dirty-page threshold the spool files would be written out to disk
# rather than read back from the page cache.
SPOOL_BUDGET_BYTES = 1 << 30
# And how many at once: each stream being received holds gRPC buffers of its own (about
# 25 MiB at full speed on loopback), and two keep two cores busy.
SPOOL_CONCURRENCY = 2
# Room held for a granted reservation whose update stream has not started is given back
# after this many seconds (the site died between the two calls, say).
RESERVATION_TTL_SECONDS = 30.0


def capped_wait(seconds: float) -> float:
    """A long poll's wait: what the caller asked for, within 0 and ``MAX_WAIT_SECONDS``."""
    return min(max(float(seconds), 0.0), MAX_WAIT_SECONDS)


class ByteBudget:
    """Admits work of a given size while the total in flight stays within ``limit`` bytes and
    ``max_items`` items (a single item larger than the limit is admitted alone)."""

    def __init__(self, limit: int, max_items: int | None = None) -> None:
        self.limit = limit
        self.max_items = max_items
        self.in_use = 0
        self.items = 0
        self._cond = threading.Condition()

    def _fits(self, nbytes: int) -> bool:
        if self.items == 0:
            return True
        room = self.max_items is None or self.items < self.max_items
        return room and self.in_use + nbytes <= self.limit

    def acquire(self, nbytes: int, timeout: float | None = None) -> bool:
        """Takes ``nbytes`` once they fit; False if they did not within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._fits(nbytes):
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                # Woken one at a time by release (hundreds of sites may wait here); the
                # timeout also re-checks now and then, should a wake-up go to a waiter that
                # has just given up.
                self._cond.wait(min(left, 1.0))
            self.in_use += nbytes
            self.items += 1
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.in_use -= nbytes
            self.items -= 1
            self._cond.notify()

    @contextlib.contextmanager
    def take(self, nbytes: int) -> Iterator[None]:
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


@dataclass
class Reservation:
    """Room in a ``ByteBudget`` held for one update, from its grant until its stream ends."""

    update_id: str
    budget: ByteBudget
    nbytes: int
    expires: float
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget.release(self.nbytes)


@dataclass(frozen=True)
class Grant:
    """ReserveUpload's answer: granted, or why not (``busy``: ask again)."""

    granted: bool
    message: str
    reason: str = ""


class Admission:
    """The rooms updates are received in, and the reservations held in them, by site."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        spool_above_bytes: int | None = SPOOL_ABOVE_BYTES,
        spool_budget_bytes: int = SPOOL_BUDGET_BYTES,
        spool_concurrency: int = SPOOL_CONCURRENCY,
    ) -> None:
        """``spool_above_bytes``: updates of models above this size are spooled (None: every
        update is received into memory), as many at once as ``spool_budget_bytes`` holds, at
        most ``spool_concurrency``."""
        self.clock = clock
        self.spool_above_bytes = spool_above_bytes
        self.staging = ByteBudget(0, max_items=1)  # one update at a time
        self.spooling = ByteBudget(spool_budget_bytes, max_items=spool_concurrency)
        self.reservation_ttl = RESERVATION_TTL_SECONDS
        self.waiting = 0  # sites in ReserveUpload, waiting for room
        self._reservations: dict[str, Reservation] = {}  # by site
        self._lock = threading.Lock()

    def spooled(self, size: int) -> bool:
        """Whether an update of ``size`` bytes is received into a spool file."""
        return self.spool_above_bytes is not None and size > self.spool_above_bytes

    def room(self, size: int) -> ByteBudget:
        """Where an update of ``size`` bytes waits for room to arrive."""
        return self.spooling if self.spooled(size) else self.staging

    def reserve(
        self,
        site: str,
        update_id: str,
        size: int,
        wait_seconds: float,
        is_active: Callable[[], bool],
    ) -> Grant:
        """Holds room for ``site``'s update ``update_id`` of ``size`` bytes, waiting for it up
        to ``wait_seconds`` (capped); "busy" if none came. The room is the update's until its
        stream ends (``claim``), or for ``reservation_ttl`` seconds if no stream claims it."""
        room = self.room(size)
        self.drop(site)  # the site's newer attempt replaces an older one
        deadline = time.monotonic() + capped_wait(wait_seconds)
        with self._lock:
            self.waiting += 1
        try:
            while not room.acquire(size, timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline or not is_active():
                    return Grant(False, f"no room yet for {size} bytes", reason="busy")
                self.drop(None)  # give back what expired, then look again
        finally:
            with self._lock:
                self.waiting -= 1
        if not is_active():  # the site gave up while it waited: the room goes on at once
            room.release(size)
            return Grant(False, "the call ended", reason="busy")
        held = Reservation(update_id, room, size, self.clock() + self.reservation_ttl)
        with self._lock:
            older = self._reservations.pop(site, None)
            self._reservations[site] = held
        if older is not None:
            older.release()
        return Grant(True, f"room for {size} bytes")

    def claim(self, site: str, update_id: str) -> Reservation | None:
        """The room reserved for this update, now the stream's; a reservation the site made
        for another update is given back."""
        with self._lock:
            held = self._reservations.pop(site, None)
        if held is not None and held.update_id != update_id:
            held.release()
            return None
        return held

    def drop(self, site: str | None) -> None:
        """Gives back the reservations that expired, and ``site``'s."""
        now = self.clock()
        with self._lock:
            gone = [k for k, r in self._reservations.items() if k == site or r.expires <= now]
            dropped = [self._reservations.pop(k) for k in gone]
        for r in dropped:
            r.release()
