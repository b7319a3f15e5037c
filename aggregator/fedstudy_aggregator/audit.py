"""What the aggregator writes into the study's audit trail (``audit.jsonl``, see
``fedstudy.audit`` for the chain itself).

Entries, in the order a study makes them:

- ``study-start``: a fresh start: the digest of the spec, the IRB protocol, the sites;
- ``recovered``: on a restart, a torn last line was moved aside (where to, its size, digest);
- ``resumed``: on a restart, the checkpoint resumed from (model version and digest), and the
  rounds logged after that checkpoint, which the study runs again (``superseded_rounds``);
- ``site-joined`` (with the SHA-256 fingerprint of the site's certificate under mutual TLS)
  and ``site-left``;
- ``initial-model`` and one ``round`` per closed round: participants, their sample counts and
  the digests of their updates as received, the updates refused since the previous entry and
  why, the new global model's digest, ε per site under DP-SGD, server-side DP's ε;
- ``study-end``.

Entries are written ahead of the checkpoint that makes their facts durable: a round's entry is
on disk before the round's checkpoint is written. A crash between the two leaves an entry for
a round the restarted aggregator runs again, and the ``resumed`` entry names it; it never
leaves a checkpointed round without its entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedstudy import __version__
from fedstudy.audit import AUDIT_FILE, AuditLog, Opened, spec_digest
from fedstudy.spec import FederatedStudy

# At most this many refusals are listed in one entry; the rest are counted.
MAX_LISTED_REFUSALS = 100
MAX_DETAIL_CHARS = 300


class StudyAudit:
    """The aggregator's side of the audit trail. Every method is called under the
    coordinator's lock; each write raises ``OSError`` when the disk refuses it."""

    def __init__(self, out_dir: Path, study: FederatedStudy) -> None:
        self.study = study
        self.log = AuditLog(out_dir / AUDIT_FILE)
        self.spec_sha256 = spec_digest(study.spec.model_dump(mode="json"))
        self.refusals: list[dict[str, Any]] = []
        self.refusals_unlisted = 0
        # Each accepted update of the open round: site -> (samples, digest as received).
        self.updates: dict[str, tuple[int, str]] = {}
        # The study's last study-end entry: (seq, hash); the anchor in summary.json.
        self.end: tuple[int, str] | None = None
        self._opened: Opened | None = None

    @property
    def path(self) -> Path:
        return self.log.path

    def open(self) -> Opened:
        """Verifies the trail on disk (``AuditError`` when it does not verify) and moves a
        torn last line aside; call ``started`` or ``resumed`` next."""
        self._opened = self.log.open()
        for e in self._opened.entries:
            if e["event"] == "study-end":
                self.end = (int(e["seq"]), str(e["hash"]))
        return self._opened

    def _recovered(self) -> None:
        opened = self._opened
        if opened is not None and opened.torn_file is not None:
            self.log.append(
                "recovered",
                torn_file=opened.torn_file.name,
                torn_bytes=len(opened.torn_bytes),
                torn_sha256=hashlib.sha256(opened.torn_bytes).hexdigest(),
                why="the last line had no newline (a write cut short by a crash); "
                "it was moved aside and the chain goes on from the entry before it",
            )

    def started(self) -> None:
        """A fresh start (no checkpoint)."""
        self._recovered()
        spec = self.study.spec
        irb = spec.governance.irb
        self.log.append(
            "study-start",
            study=self.study.name,
            spec_sha256=self.spec_sha256,
            irb=None
            if irb is None
            else {"protocol": irb.protocol, "approvedUntil": irb.approvedUntil.isoformat()},
            sites=[s.name for s in spec.sites],
            rounds=spec.rounds,
            min_sites=spec.minSites,
            strategy=spec.strategy.name,
            model=spec.model.name,
            privacy=None
            if spec.privacy is None
            else {"targetEpsilon": spec.privacy.targetEpsilon, "delta": spec.privacy.delta},
            server_privacy=spec.serverPrivacy is not None,
            earlier_entries=len(self._opened.entries) if self._opened else 0,
            fedstudy_version=__version__,
        )

    def resumed(self, phase: str, version: int | None, model_digest: str | None) -> None:
        """A restart from a checkpoint of model ``version`` (None: before the initial model)."""
        self._recovered()
        entries = self._opened.entries if self._opened else []
        since = 0
        for i, e in enumerate(entries):
            if e["event"] in ("study-start", "resumed"):
                since = i
        superseded = sorted(
            {
                int(e["model_version"])
                for e in entries[since:]
                if e["event"] in ("round", "initial-model")
                and (version is None or int(e["model_version"]) > version)
            }
        )
        logged = [
            e.get("model_digest")
            for e in entries
            if e["event"] in ("round", "initial-model") and e.get("model_version") == version
        ]
        self.log.append(
            "resumed",
            study=self.study.name,
            spec_sha256=self.spec_sha256,
            phase=phase,
            model_version=version,
            model_digest=model_digest,
            # Whether the trail's newest entry for this model version names the same model.
            checkpoint_in_trail=(logged[-1] == model_digest) if logged else None,
            superseded_rounds=superseded,
            earlier_entries=len(entries),
            fedstudy_version=__version__,
        )

    def site_joined(
        self,
        site: str,
        *,
        again: bool,
        train_samples: int,
        test_samples: int,
        trainer_version: str,
        certificate_sha256: str | None,
        mutual_tls: bool,
    ) -> None:
        self.log.append(
            "site-joined",
            site=site,
            again=again,
            train_samples=train_samples,
            test_samples=test_samples,
            trainer_version=trainer_version,
            identity="mutual-tls" if mutual_tls else "none",
            certificate_sha256=certificate_sha256,
        )

    def site_left(self, site: str, reason: str, detail: str) -> None:
        self.log.append("site-left", site=site, reason=reason, detail=detail[:MAX_DETAIL_CHARS])

    def refused(self, site: str | None, round_: int | None, reason: str, detail: str) -> None:
        """Notes a refused update; it is listed in the next initial-model, round or study-end
        entry."""
        if len(self.refusals) >= MAX_LISTED_REFUSALS:
            self.refusals_unlisted += 1
            return
        self.refusals.append(
            {"site": site, "round": round_, "reason": reason, "detail": detail[:MAX_DETAIL_CHARS]}
        )

    def _take_refusals(self) -> dict[str, Any]:
        out: dict[str, Any] = {"refused": self.refusals}
        if self.refusals_unlisted:
            out["refused_unlisted"] = self.refusals_unlisted
        self.refusals, self.refusals_unlisted = [], 0
        return out

    def initial_model(self, site: str, digest: str, tensors: int, parameters: int) -> None:
        self.log.append(
            "initial-model",
            site=site,
            model_version=0,
            model_digest=digest,
            tensors=tensors,
            parameters=parameters,
            **self._take_refusals(),
        )

    def accepted(self, site: str, samples: int, digest: str) -> None:
        self.updates[site] = (samples, digest)

    def round_closed(
        self,
        round_: int,
        *,
        participants: Iterable[str],
        excluded: Iterable[str],
        model_digest: str,
        duration_s: float,
        site_epsilon: Mapping[str, Mapping[str, Any]] | None,
        server_privacy: Mapping[str, Any] | None,
    ) -> None:
        updates = []
        for site in sorted(participants):
            samples, digest = self.updates.get(site, (0, ""))
            updates.append({"site": site, "samples": samples, "update_digest": digest})
        fields: dict[str, Any] = {
            "round": round_,
            "model_version": round_,
            "model_digest": model_digest,
            "participants": updates,
            "samples": sum(u["samples"] for u in updates),
            "excluded": sorted(excluded),
            **self._take_refusals(),
            "duration_s": round(duration_s, 3),
        }
        if site_epsilon is not None:
            fields["site_epsilon"] = dict(site_epsilon)
        if server_privacy is not None:
            fields["server_privacy"] = dict(server_privacy)
        self.log.append("round", **fields)
        self.updates = {}

    def study_end(
        self,
        *,
        completed: bool,
        ended_reason: str | None,
        rounds_completed: int,
        model_digest: str | None,
        refused_updates: Mapping[str, int],
        sites: Mapping[str, Mapping[str, Any]],
        server_privacy: Mapping[str, Any] | None,
    ) -> None:
        entry = self.log.append(
            "study-end",
            study=self.study.name,
            completed=completed,
            ended_reason=ended_reason,
            rounds_completed=rounds_completed,
            model_version=rounds_completed,
            model_digest=model_digest,
            refused_updates=dict(sorted(refused_updates.items())),
            sites=dict(sites),
            **({"server_privacy": dict(server_privacy)} if server_privacy is not None else {}),
            **self._take_refusals(),
        )
        self.end = (int(entry["seq"]), str(entry["hash"]))

    def anchor(self) -> dict[str, Any] | None:
        """Where summary.json points into the trail: the study-end entry."""
        if self.end is None:
            return None
        return {"file": AUDIT_FILE, "study_end_seq": self.end[0], "study_end_hash": self.end[1]}
