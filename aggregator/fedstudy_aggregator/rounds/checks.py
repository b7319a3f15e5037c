"""Every check the aggregator makes before it lets a call change the study, and every reason
it gives when it says no.

The checks are pure functions of the study's state as the coordinator passes it (under its
lock): they raise ``Refusal`` (updates, reservations) or return a ``(reason, message)`` pair
(joins, reports), and change nothing but the set of update ids seen (an id is remembered
once its header passes the earlier checks, so a retry cannot replay it).
"""

from __future__ import annotations

from collections.abc import Mapping

from fedstudy.spec import Strategy as StrategySpec
from fedstudy.tensors import TensorSpec, signature_problem
from fedstudy.wire import aggregator_pb2 as pb

from ..records import SiteRecord
from .machine import DONE, FINISHING, TRAINING, RoundMachine

# Why an update is refused (SubmitUpdate; ReserveUpload answers with the same reasons).
UPDATE_REFUSALS: Mapping[str, str] = {
    "wrong-study": "the header names another study",
    "unknown-site": "the site is not in the study",
    "not-joined": "the site has not joined since the aggregator started, or left",
    "stale-round": "the round is over",
    "future-round": "the round has not opened",
    "duplicate": "the site already has an accepted update in this round",
    "replay": "an update_id seen before",
    "wrong-base": "the base version is not the round's starting model",
    "no-samples": "num_samples is 0",
    "bad-stream": "no header first, chunks out of order, sizes that do not add up",
    "unknown-tensor": "a tensor the model does not have",
    "missing-tensor": "the stream ended before every tensor of the model arrived",
    "wrong-shape": "a tensor's shape differs from the model's",
    "wrong-dtype": "a tensor's dtype differs from the model's",
    "non-finite": "NaN or infinity in a floating tensor",
    "too-large": "the stream passes the size bound (the model's size plus a margin)",
    "norm-exceeded": "the update's change is above strategy.maxUpdateNorm (normPolicy refuse)",
}
# What ReserveUpload answers, besides the refusals above, when it grants nothing.
RESERVATION_REFUSALS: Mapping[str, str] = {"busy": "no room yet: ask again"}
# Why a Join is refused.
JOIN_REFUSALS: Mapping[str, str] = {
    "wrong-study": "the request names another study",
    "unknown-site": "the site is not in the study",
    "model-mismatch": "the model's tensors differ from the study's, or no stream could carry them",
}
# Why a Report is refused.
REPORT_REFUSALS: Mapping[str, str] = {
    "wrong-study": "the request names another study",
    "unknown-site": "the site is not in the study",
    "future-version": "a model version the aggregator has not made yet",
    "not-final": "a FINAL report before the study finishes, or of another version",
    "bad-kind": "neither EVALUATION nor FINAL",
}
# Why a call is refused at the door, before any of the checks here (see service.py).
CALL_REFUSALS: Mapping[str, str] = {
    "identity-mismatch": "with mutual TLS, the call names another site than its certificate",
}

# Refusals for what an update holds (not for when or how it came): the site's answer for the
# round is in, and refused; the round does not wait for it, nor ask it to train again. A stream
# cut short (missing-tensor, bad-stream) is not among them: the site may send it again.
CONTENT_REFUSALS = frozenset(
    {
        "non-finite",
        "norm-exceeded",
        "wrong-shape",
        "wrong-dtype",
        "unknown-tensor",
        "too-large",
    }
)
# The size bound of an update stream is the model's bytes plus this much for the framing.
STREAM_MARGIN_BYTES = 1 << 20


class Refusal(Exception):
    """An update (or a reservation for one) the aggregator will not take, and why."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def model_bytes(specs: list[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


def describe_mismatch(got: list[TensorSpec], want: list[TensorSpec]) -> str | None:
    """Says which tensor differs between two model signatures, or None when they agree."""
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"tensor {i}: the site has {g.describe()}, the study's model has {w.describe()}"
    if len(got) < len(want):
        return f"the site's model lacks {want[len(got)].describe()} ({len(got)} of {len(want)})"
    if len(got) > len(want):
        return f"the site's model has an extra tensor {got[len(want)].describe()}"
    return None


def join_problem(
    req: pb.JoinRequest,
    study: str,
    site: SiteRecord | None,
    sig: list[TensorSpec],
    reference: list[TensorSpec] | None,
) -> tuple[str, str] | None:
    """Why a Join is refused, or None to admit it. ``reference``: the model signature the
    study's sites have (None until the first join)."""
    if req.study != study:
        return "wrong-study", f"this aggregator runs study {study!r}"
    if site is None:
        return "unknown-site", f"site {req.site!r} is not listed in study {study!r}"
    if not sig:
        return "model-mismatch", "the join names no model tensors"
    if (problem := signature_problem(sig)) is not None:
        return "model-mismatch", f"the model cannot be sent: {problem}"
    if reference is not None:
        diff = describe_mismatch(sig, reference)
        if diff is not None:
            return "model-mismatch", diff
    return None


def report_problem(
    req: pb.ReportRequest, study: str, site: SiteRecord | None, machine: RoundMachine
) -> tuple[str, str] | None:
    """Why a Report is refused, or None to record it."""
    if req.study != study:
        return "wrong-study", f"this aggregator runs study {study!r}"
    if site is None:
        return "unknown-site", f"site {req.site!r} is not in the study"
    version = machine.version
    if version is None or req.model_version > version:
        return "future-version", f"model version {req.model_version} does not exist yet"
    if req.kind == pb.ReportRequest.FINAL and (
        machine.phase not in (FINISHING, DONE) or req.model_version != version
    ):
        return "not-final", f"model version {req.model_version} is not the study's final model"
    if req.kind not in (pb.ReportRequest.EVALUATION, pb.ReportRequest.FINAL):
        return "bad-kind", "a report is EVALUATION or FINAL"
    return None


def check_sender(
    h: pb.UpdateHeader, study: str, sites: Mapping[str, SiteRecord]
) -> list[TensorSpec]:
    """The study and the site the header names: one of ours, and joined; returns the site's
    model signature (from its Join)."""
    if h.study != study:
        raise Refusal("wrong-study", f"this aggregator runs study {study!r}, not {h.study!r}")
    site = sites.get(h.site)
    if site is None:
        raise Refusal("unknown-site", f"site {h.site!r} is not in study {study!r}")
    if not site.joined or site.signature is None:
        raise Refusal(
            "not-joined",
            f"site {h.site} has not joined since the aggregator started: Join first",
        )
    return site.signature


def check_round(r: int, machine: RoundMachine) -> None:
    """Round ``r`` is the open one."""
    v = machine.version or 0
    if machine.phase == TRAINING and machine.round is not None:
        if r < machine.round:
            raise Refusal("stale-round", f"round {r} is over; round {machine.round} is open")
        if r > machine.round:
            raise Refusal(
                "future-round", f"round {r} has not opened; round {machine.round} is open"
            )
        return
    if r <= v:
        raise Refusal("stale-round", f"round {r} is over ({v} rounds completed)")
    raise Refusal("future-round", f"round {r} is not open (state {machine.phase})")


def _check_not_answered(h: pb.UpdateHeader, machine: RoundMachine) -> None:
    if h.site in machine.answered:
        raise Refusal(
            "duplicate", f"site {h.site} already has an accepted update in round {h.round}"
        )


def check_header(
    h: pb.UpdateHeader,
    *,
    study: str,
    sites: Mapping[str, SiteRecord],
    machine: RoundMachine,
    model_signature: list[TensorSpec] | None,
    seen_ids: set[str],
) -> tuple[list[TensorSpec], int]:
    """The header checks, in the protocol's order; returns (the signature the update must
    have, its stream's byte bound). ``model_signature``: the global model's (None before the
    initial model). Remembers the update's id in ``seen_ids``."""
    joined_with = check_sender(h, study, sites)
    init = model_signature is None
    if init:
        if machine.phase == DONE:
            raise Refusal("stale-round", "the study has ended")
        if h.round != 0:
            raise Refusal(
                "future-round", f"round {h.round} has not opened: there is no initial model yet"
            )
    else:
        check_round(h.round, machine)
        _check_not_answered(h, machine)
    if not h.update_id:
        raise Refusal("bad-stream", "the header has no update_id")
    if h.update_id in seen_ids:
        raise Refusal("replay", f"update_id {h.update_id} was seen before")
    seen_ids.add(h.update_id)
    base = 0 if init else h.round - 1
    if h.base_version != base:
        raise Refusal(
            "wrong-base",
            f"round {h.round} trains from model version {base}, the update says {h.base_version}",
        )
    if not init and h.num_samples == 0:
        raise Refusal("no-samples", "num_samples is 0: an update needs training samples")
    expected = joined_with if model_signature is None else model_signature
    bound = model_bytes(expected) + STREAM_MARGIN_BYTES
    if h.total_bytes > bound:
        raise Refusal(
            "too-large", f"the header announces {h.total_bytes} bytes; the bound is {bound}"
        )
    return list(expected), bound


def clip_scale(norm: float, strategy: StrategySpec, dp_clip: float | None) -> float:
    """How far an update whose change has L2 norm ``norm`` is scaled down:
    ``strategy.maxUpdateNorm`` clips it (or, with ``normPolicy`` refuse, refuses it), then
    server-side DP clips it to ``dp_clip``."""
    scale = 1.0
    bound = strategy.maxUpdateNorm
    if bound is not None and norm > bound:
        if strategy.normPolicy == "refuse":
            raise Refusal(
                "norm-exceeded", f"the update's norm {norm:.6g} is above the bound {bound:.6g}"
            )
        scale = bound / norm
    if dp_clip is not None and norm * scale > dp_clip:
        scale = dp_clip / norm
    return scale


def check_still_open(
    h: pb.UpdateHeader,
    sites: Mapping[str, SiteRecord],
    machine: RoundMachine,
    has_model: bool,
) -> None:
    """Re-checks what may have changed while the update waited or streamed."""
    site = sites[h.site]
    if not site.joined:
        raise Refusal("not-joined", f"site {h.site} left the study")
    if h.round == 0:
        if has_model:
            raise Refusal("stale-round", "another site's initial model arrived first")
        return
    check_round(h.round, machine)
    _check_not_answered(h, machine)
