"""The study's audit trail: ``audit.jsonl``, an append-only, hash-chained log.

Each line is one entry, a JSON object written in one canonical form (keys sorted, no spaces,
UTF-8). Besides its own fields, every entry carries:

- ``seq``: its position, 1 for the first line;
- ``time``: when it was written (UTC, ISO 8601);
- ``event``: what it records (``study-start``, ``site-joined``, ``round``, ...);
- ``prev``: the ``hash`` of the entry before it (64 zeros for the first);
- ``hash``: the SHA-256 of the entry's canonical form without ``hash``.

So the hash of an entry covers everything in it, the previous entry's hash included: a byte
changed anywhere, an entry removed, inserted or moved, and the first line that no longer
matches says so (``verify``). A chain alone cannot show that entries were cut off its end;
the hash of the study's last entry is also written into ``summary.json`` and the model card,
and ``verify(..., head=...)`` checks the chain still reaches it.

Entries are appended with one ``write`` and then ``fsync``: once ``append`` returns, the
entry is on disk. A crash during a write can leave a last line without its newline (a torn
line); ``AuditLog.open`` moves such a line aside into ``audit.jsonl.torn-<time>``, and the
writer records that in a ``recovered`` entry. Anything else that does not verify is never
repaired: ``open`` raises ``AuditError``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstudy.fsutil import atomic_write_bytes, fsync_dir

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
RESERVED = ("seq", "time", "event", "prev", "hash")


class AuditError(RuntimeError):
    """An audit trail that cannot be continued: the message names the line and why."""


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte form an entry is written in."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 of the entry's canonical form, its ``hash`` field left out."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def spec_digest(spec: Mapping[str, Any]) -> str:
    """SHA-256 of a study spec's canonical JSON form: formatting and key order do not count."""
    return hashlib.sha256(canonical(spec)).hexdigest()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Problem:
    """The first entry that does not verify."""

    line: int
    event: str | None
    why: str

    def __str__(self) -> str:
        what = f" ({self.event})" if self.event else ""
        return f"line {self.line}{what}: {self.why}"


@dataclass
class Chain:
    """What a read of an audit file found: the entries that verify, in order, and the first
    problem (None when every line verifies)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    problem: Problem | None = None
    # Bytes after the last newline: a line cut short (set only when everything before it
    # verified).
    torn: bytes = b""

    @property
    def head(self) -> str:
        return str(self.entries[-1]["hash"]) if self.entries else GENESIS

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.torn


def _check_line(raw: bytes, n: int, prev: str) -> tuple[dict[str, Any] | None, Problem | None]:
    """Checks line ``n`` (1-based) against the hash of the line before it."""
    if not raw.strip():
        return None, Problem(n, None, "an empty line where an entry should be")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return None, Problem(n, None, f"not a JSON entry ({e})")
    if not isinstance(obj, dict):
        return None, Problem(n, None, f"not a JSON object but {type(obj).__name__}")
    event = obj.get("event") if isinstance(obj.get("event"), str) else None
    missing = [k for k in RESERVED if k not in obj]
    if missing:
        return None, Problem(n, event, f"no {missing[0]!r} field")
    try:
        form = canonical(obj)
    except ValueError as e:
        return None, Problem(n, event, f"holds a value JSON cannot carry ({e})")
    if form != raw:
        return None, Problem(
            n, event, "not in the form the log writes (a changed byte, space or key order)"
        )
    if obj["hash"] != entry_hash(obj):
        return None, Problem(n, event, "its hash does not match its content: the entry changed")
    if obj["prev"] != prev:
        before = "the genesis value (64 zeros)" if n == 1 else f"the hash of line {n - 1}"
        return None, Problem(
            n,
            event,
            f"its prev does not match {before}: an entry before it was removed, inserted, "
            "moved or changed",
        )
    if obj["seq"] != n:
        return None, Problem(
            n, event, f"its seq is {obj['seq']!r}, expected {n}: entries were removed or moved"
        )
    return obj, None


def read_chain(data: bytes) -> Chain:
    """Verifies the bytes of an audit file entry by entry, up to the first problem."""
    chain = Chain()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline (or is empty)
    prev = GENESIS
    for i, raw in enumerate(lines, start=1):
        entry, problem = _check_line(raw, i, prev)
        if problem is not None:
            chain.problem = problem
            return chain
        assert entry is not None
        chain.entries.append(entry)
        prev = str(entry["hash"])
    chain.torn = tail
    return chain


@dataclass(frozen=True)
class Verdict:
    """The result of ``verify``: ``problem`` is None when the whole file verifies."""

    entries: int
    head: str
    last_event: str | None
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: Path, head: str | None = None) -> Verdict:
    """Checks the chain of an audit file; with ``head``, also that an entry has that hash."""
    chain = read_chain(path.read_bytes())
    problem = chain.problem
    n = len(chain.entries)
    if problem is None and chain.torn:
        problem = Problem(
            n + 1,
            None,
            f"the last line is incomplete ({len(chain.torn)} bytes, no newline): a write cut "
            "short; the aggregator moves it aside when it resumes",
        )
    if problem is None and head is not None and all(e["hash"] != head for e in chain.entries):
        problem = Problem(
            n,
            chain.entries[-1]["event"] if chain.entries else None,
            f"no entry has the hash {head}: the chain was cut short or is another study's",
        )
    last = str(chain.entries[-1]["event"]) if chain.entries else None
    return Verdict(n, chain.head, last, problem)


@dataclass(frozen=True)
class Opened:
    """What ``AuditLog.open`` found: the verified entries already in the file, and where a
    torn last line was moved (None when there was none)."""

    entries: list[dict[str, Any]]
    torn_file: Path | None = None
    torn_bytes: bytes = b""


class AuditLog:
    """Appends entries to one audit file. Not thread-safe: the caller serialises appends."""

    def __init__(self, path: Path, now: Callable[[], str] = utc_now) -> None:
        self.path = path
        self.now = now
        self.head = GENESIS
        self.seq = 0
        self._broken: str | None = None

    def open(self) -> Opened:
        """Reads and verifies the file, if there is one, so that appends continue its chain.

        A torn last line is moved aside (see the module's notes); any other problem raises
        ``AuditError`` and leaves the file as it is.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Opened([])
        except OSError as e:
            raise AuditError(f"{self.path}: cannot read the audit trail: {e.strerror}") from None
        chain = read_chain(data)
        if chain.problem is not None:
            raise AuditError(
                f"{self.path}: the audit trail does not verify at {chain.problem}. It is left "
                "as it is for inspection; to go on, move it aside (a new trail then starts) "
                "or restore an intact copy"
            )
        torn_file = None
        if chain.torn:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            torn_file = self.path.with_name(f"{self.path.name}.torn-{stamp}")
            atomic_write_bytes(torn_file, chain.torn)
            os.truncate(self.path, len(data) - len(chain.torn))
            self._fsync_file()
        if chain.entries:
            self.head = str(chain.entries[-1]["hash"])
            self.seq = int(chain.entries[-1]["seq"])
        return Opened(chain.entries, torn_file, chain.torn)

    def _fsync_file(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Writes one entry and syncs it to disk; returns the entry as written.

        An ``OSError`` (a full disk) is raised after the file is cut back to its previous
        length, so it never keeps half an entry; if even that fails, the log refuses further
        appends and the next ``open`` moves the torn line aside.
        """
        if self._broken is not None:
            raise OSError(f"the audit trail cannot be appended to: {self._broken}")
        clash = [k for k in fields if k in RESERVED]
        if clash:
            raise ValueError(f"audit entry field {clash[0]!r} is reserved")
        entry: dict[str, Any] = {
            "seq": self.seq + 1,
            "time": self.now(),
            "event": event,
            **json_safe(fields),
            "prev": self.head,
        }
        entry["hash"] = entry_hash(entry)
        line = canonical(entry) + b"\n"
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    self._broken = f"a failed write left a partial entry ({e.strerror or e})"
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self.seq += 1
        self.head = str(entry["hash"])
        return entry
