"""Property-based fuzzing of the two doors that take outside input.

The update decoder (``TensorAssembler``, and the aggregator's ``SubmitUpdate`` behind it) and
the study loader (``parse_study``, ``load_study``) get arbitrary and mutated input. Whatever
arrives, the answer is a result that matches what was expected, or the documented clear error
(a ``WireError`` or refusal reason that docs/protocol.md lists, a ``StudyError`` whose every
line names a field); never another exception.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "aggregator"))

from aggtest import STUDY, Running, Site, header, make_study, model, study_doc, tensor_messages
from fedstudy_aggregator.server import AggregatorServer

from fedstudy.spec import FederatedStudy, StudyError, load_study, parse_study
from fedstudy.tensors import (
    ALLOWED_DTYPES,
    TensorAssembler,
    TensorSpec,
    Weights,
    WireError,
    signature,
    to_chunks,
    total_bytes,
)
from fedstudy.wire import aggregator_pb2 as pb
from fedstudy.wire import tensors_pb2

ROOT = Path(__file__).resolve().parents[1]

DECODER = settings(max_examples=150, deadline=None, database=None)
LOADER = settings(max_examples=150, deadline=None, database=None)
AGGREGATOR = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
UINT32 = st.integers(0, 2**32 - 1)


def _documented_update_reasons() -> frozenset[str]:
    """The refusal reasons of the SubmitUpdate table in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text.split("| reason | when |", 1)[1].split("\n\n", 1)[0]
    reasons: set[str] = set()
    for row in table.splitlines()[2:]:
        reasons.update(re.findall(r"`([a-z-]+)`", row.split("|")[1]))
    return frozenset(reasons)


def _documented_join_reasons() -> frozenset[str]:
    """The Join refusal reasons of "A trainer's life" in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    paragraph = text.split("1. `Join(", 1)[1].split("\n2. ", 1)[0]
    return frozenset(re.findall(r"`([a-z-]+)`", paragraph))


def _decoder_reasons() -> frozenset[str]:
    """Every reason fedstudy/tensors.py raises a WireError with."""
    src = (ROOT / "fedstudy" / "tensors.py").read_text(encoding="utf-8")
    return frozenset(re.findall(r'WireError\(\s*"([a-z-]+)"', src))


UPDATE_REASONS = _documented_update_reasons()
JOIN_REASONS = _documented_join_reasons()
WIRE_REASONS = _decoder_reasons()


def test_reasons_are_read_from_the_protocol_docs() -> None:
    assert {"wrong-study", "unknown-site", "model-mismatch"} == JOIN_REASONS
    assert {"replay", "bad-stream", "too-large", "norm-exceeded"} <= UPDATE_REASONS


def test_every_decoder_reason_is_documented() -> None:
    assert {"bad-stream", "wrong-dtype", "wrong-shape", "non-finite"} <= WIRE_REASONS
    assert WIRE_REASONS <= UPDATE_REASONS, WIRE_REASONS - UPDATE_REASONS


# --------------------------------------------------------------------------- update decoder

MODELS: list[Weights] = [
    model(1.0),
    {
        "h": np.linspace(-1, 1, 5, dtype=np.float16),
        "mask": np.array([True, False, True]),
        "none": np.zeros((0, 3), dtype=np.float64),
        "count": np.array(7, dtype=np.int32),
        "bytes": np.arange(9, dtype=np.uint8).reshape(3, 3),
    },
    {"only": np.arange(12, dtype=np.float64).reshape(2, 3, 2)},
]

NAMES = st.one_of(
    st.sampled_from(sorted({n for m in MODELS for n in m})), st.text(max_size=12), st.just("")
)
DTYPES = st.one_of(st.sampled_from(ALLOWED_DTYPES), st.text(max_size=10), st.just("object"))
DIMS = st.one_of(st.integers(-2, 6), INT64, st.just(10**12), st.sampled_from([2**32, 2**62]))
SHAPES = st.one_of(
    st.lists(DIMS, max_size=4),
    st.lists(st.integers(0, 2), min_size=30, max_size=70),
)
SIZES = st.one_of(st.integers(0, 128), UINT64, st.just(4 * 10**12))
CHUNKS = st.builds(
    tensors_pb2.TensorChunk,
    name=NAMES,
    dtype=DTYPES,
    shape=SHAPES,
    total_bytes=SIZES,
    offset=st.one_of(st.just(0), SIZES),
    data=st.binary(max_size=96),
)


def _copy(c: tensors_pb2.TensorChunk) -> tensors_pb2.TensorChunk:
    out = tensors_pb2.TensorChunk()
    out.CopyFrom(c)
    return out


def _mutate_field(c: tensors_pb2.TensorChunk, field: str, value: Any) -> None:
    if field == "shape":
        del c.shape[:]
        c.shape.extend(value)
    else:
        setattr(c, field, value)


@st.composite
def _poisoned(draw: st.DrawFn, weights: Weights) -> Weights:
    """``weights`` with NaN or an infinity at a random place of a float tensor."""
    floats = [k for k, v in weights.items() if v.dtype.kind == "f" and v.size]
    name = draw(st.sampled_from(floats), label="poisoned tensor")
    arr = weights[name].copy()
    arr.reshape(-1)[draw(st.integers(0, arr.size - 1), label="at")] = draw(
        st.sampled_from([np.nan, np.inf, -np.inf]), label="value"
    )
    return {**weights, name: arr}


@st.composite
def _mutations(
    draw: st.DrawFn, stream: list[tensors_pb2.TensorChunk]
) -> tuple[list[tensors_pb2.TensorChunk], list[str]]:
    """A copy of ``stream`` with 0-4 random edits, and the edits' names."""
    chunks = [_copy(c) for c in stream]
    done: list[str] = []
    for _ in range(draw(st.integers(0, 4), label="edits")):
        op = draw(
            st.sampled_from(
                ["drop", "duplicate", "swap", "truncate", "cut", "grow", "field", "insert"]
            )
        )
        if not chunks and op != "insert":
            continue
        i = draw(st.integers(0, max(len(chunks) - 1, 0)))
        if op == "drop":
            del chunks[i]
        elif op == "duplicate":
            chunks.insert(draw(st.integers(0, len(chunks))), _copy(chunks[i]))
        elif op == "swap":
            j = draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "truncate":
            del chunks[i:]
        elif op == "cut":
            c = chunks[i]
            c.data = c.data[: draw(st.integers(0, max(len(c.data) - 1, 0)))]
        elif op == "grow":
            chunks[i].data += draw(st.binary(min_size=1, max_size=16))
        elif op == "field":
            field = draw(st.sampled_from(["name", "dtype", "shape", "total_bytes", "offset"]))
            value = draw(
                {
                    "name": NAMES,
                    "dtype": DTYPES,
                    "shape": SHAPES,
                    "total_bytes": SIZES,
                    "offset": SIZES,
                }[field]
            )
            _mutate_field(chunks[i], field, value)
            op = f"field:{field}"
        else:
            chunks.insert(draw(st.integers(0, len(chunks))), draw(CHUNKS))
        done.append(op)
    return chunks, done


def _held_bytes(asm: TensorAssembler) -> int:
    return sum(int(a.nbytes) for a in asm.weights.values())


def _decode(
    chunks: list[tensors_pb2.TensorChunk],
    expected: list[TensorSpec] | None,
    max_bytes: int,
) -> Weights | WireError:
    """Feeds the chunks; returns the weights or the WireError. The assembler never holds
    more than ``max_bytes``, whatever the chunks claim."""
    asm = TensorAssembler(expected, max_bytes=max_bytes)
    try:
        for c in chunks:
            try:
                asm.add(c)
            finally:
                assert _held_bytes(asm) <= max_bytes
        weights = asm.finish()
    except WireError as e:
        error = e
    else:
        assert _held_bytes(asm) == asm.received_bytes <= max_bytes
        return weights
    event(f"refused: {error.reason}")
    assert error.reason in WIRE_REASONS, error.reason
    assert str(error), error.reason
    return error


def _check_weights(weights: Weights, expected: list[TensorSpec] | None) -> None:
    if expected is not None:
        assert signature(weights) == expected
    for name, arr in weights.items():
        assert arr.dtype.name in ALLOWED_DTYPES, name
        if arr.dtype.kind == "f":
            assert np.isfinite(arr).all(), f"{name} holds NaN or infinity"


@DECODER
@given(
    index=st.integers(0, len(MODELS) - 1),
    chunk_bytes=st.integers(1, 40),
    with_expected=st.booleans(),
    margin=st.one_of(st.just(1 << 20), st.integers(-64, 64)),
    data=st.data(),
)
def test_decoder_takes_a_mutated_stream(
    index: int, chunk_bytes: int, with_expected: bool, margin: int, data: st.DataObject
) -> None:
    weights = MODELS[index]
    expected = signature(weights) if with_expected else None
    max_bytes = max(total_bytes(weights) + margin, 0)
    sent = weights
    if data.draw(st.booleans(), label="non-finite"):
        sent = data.draw(_poisoned(weights), label="poisoned")
    chunks, edits = data.draw(_mutations(list(to_chunks(sent, chunk_bytes))), label="stream")

    result = _decode(chunks, expected, max_bytes)

    if isinstance(result, WireError):
        untouched = not edits and sent is weights and max_bytes >= total_bytes(weights)
        assert not untouched, f"an intact stream was refused: {result.reason}: {result}"
        return
    _check_weights(result, expected)
    if not edits:
        assert sent is weights  # a poisoned stream must not pass
        assert list(result) == list(weights)
        for name, arr in weights.items():
            np.testing.assert_array_equal(result[name], arr)


@DECODER
@given(
    chunks=st.lists(CHUNKS, max_size=6),
    with_expected=st.booleans(),
    max_bytes=st.one_of(st.integers(0, 256), st.just(1 << 20)),
)
def test_decoder_takes_arbitrary_chunks(
    chunks: list[tensors_pb2.TensorChunk], with_expected: bool, max_bytes: int
) -> None:
    expected = signature(MODELS[1]) if with_expected else None
    result = _decode(chunks, expected, max_bytes)
    if not isinstance(result, WireError):
        _check_weights(result, expected)


# --------------------------------------------------------------------- aggregator SubmitUpdate

INIT_ID = "the-initial-model"


class Fleet:
    """A fresh aggregator per example, each with its own folder; a used one is stopped in the
    background (stopping waits for the HTTP server's poll), all of them by the module's end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stopping: list[threading.Thread] = []

    def start(self) -> Running:
        state = self.root / uuid.uuid4().hex
        return Running(
            AggregatorServer(
                make_study(sites=3, minSites=2, rounds=2),
                state / "state",
                state / "out",
                listen="127.0.0.1:0",
                http="127.0.0.1:0",
                log=logging.getLogger("aggregator-fuzz"),
                linger=0.5,
                tick_seconds=0.02,
            )
        )

    def stop(self, agg: Running) -> None:
        thread = threading.Thread(target=agg.close, name="stop-aggregator")
        thread.start()
        self.stopping.append(thread)

    def join(self) -> None:
        for thread in self.stopping:
            thread.join(timeout=10)
            assert not thread.is_alive()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("aggregators"))
    yield f
    f.join()


@st.composite
def _header_fields(draw: st.DrawFn, round_: int, weights: Weights) -> dict[str, Any]:
    """A valid header for ``s0`` in ``round_``, each field possibly replaced."""
    valid: dict[str, Any] = {
        "study": STUDY,
        "site": "s0",
        "round": round_,
        "base_version": max(round_ - 1, 0),
        "num_samples": 100,
        "update_id": uuid.uuid4().hex,
        "train_loss": 0.5,
        "tensor_count": len(weights),
        "total_bytes": total_bytes(weights),
    }
    other: dict[str, st.SearchStrategy[Any]] = {
        "study": st.one_of(st.just("other"), st.text(max_size=8)),
        "site": st.one_of(st.sampled_from(["s1", "s2", "nowhere", ""]), st.text(max_size=8)),
        "round": st.one_of(st.integers(0, 3), UINT32),
        "base_version": st.one_of(st.integers(0, 3), UINT32),
        "num_samples": st.one_of(st.just(0), UINT64),
        "update_id": st.one_of(st.sampled_from(["", INIT_ID]), st.text(max_size=8)),
        "train_loss": st.floats(),
        "tensor_count": st.one_of(st.integers(0, 5), UINT32),
        "total_bytes": st.one_of(st.integers(0, 200), UINT64),
    }
    fields = dict(valid)
    if draw(st.booleans(), label="change the header"):
        for name in draw(st.sets(st.sampled_from(sorted(other)), max_size=3), label="changed"):
            fields[name] = draw(other[name], label=name)
    return fields


@st.composite
def _update(draw: st.DrawFn, round_: int) -> list[pb.UpdateChunk]:
    """An update stream of ``model(seed)`` for ``round_``, possibly mutated."""
    weights = model(draw(st.sampled_from([0.0, 2.0])))
    if draw(st.booleans(), label="non-finite"):
        weights = draw(_poisoned(weights))
    chunks, _ = draw(_mutations(list(to_chunks(weights, draw(st.integers(4, 64))))))
    fields = draw(_header_fields(round_, weights))
    messages = [header(**fields), *(pb.UpdateChunk(tensor=c) for c in chunks)]
    edit = draw(st.sampled_from(["none", "none", "no-header", "two-headers", "empty"]))
    if edit == "no-header":
        messages = messages[1:]
    elif edit == "two-headers":
        messages.insert(draw(st.integers(1, len(messages))), header(**fields))
    elif edit == "empty":
        messages = []
    return messages


def _sender(messages: list[pb.UpdateChunk]) -> str | None:
    first = messages[0] if messages else None
    return first.header.site if first is not None and first.HasField("header") else None


def _two_sites(agg: Running, initialised: bool) -> tuple[Site, Site, int]:
    """s0 and s1 joined, s0 told to send the initial model (and, if ``initialised``, having
    sent it); returns them and the round an update is due for."""
    s0, s1 = agg.site("s0"), agg.site("s1")
    assert s0.join().accepted
    assert s1.join().accepted
    assert s0.task().kind == pb.TaskResponse.INIT
    if initialised:
        assert s0.submit(model(0), 0, update_id=INIT_ID).accepted
    return s0, s1, 1 if initialised else 0


@AGGREGATOR
@given(initialised=st.booleans(), data=st.data())
def test_aggregator_answers_any_update(
    fleet: Fleet, initialised: bool, data: st.DataObject
) -> None:
    agg = fleet.start()
    try:
        s0, _, round_ = _two_sites(agg, initialised)
        messages = data.draw(_update(round_), label="update")
        before = agg.status()["refused_updates"]

        receipt = s0.submit_raw(messages)
        event(f"refused: {receipt.reason}" if not receipt.accepted else "accepted")

        after = agg.status()["refused_updates"]
        if receipt.accepted:
            assert after == before
        else:
            assert receipt.reason in UPDATE_REASONS, receipt.reason
            assert receipt.message
            assert after == {**before, receipt.reason: before.get(receipt.reason, 0) + 1}
        # The aggregator is still up and still takes a good update.
        other = agg.site("s0" if _sender(messages) == "s1" else "s1")
        assert other.task().kind in (
            pb.TaskResponse.WAIT,
            pb.TaskResponse.INIT,
            pb.TaskResponse.TRAIN,
        )
        next_round = 1 if initialised or receipt.accepted else 0
        good = other.submit(model(3.0), next_round)
        assert good.accepted, good
        assert agg.status()["refused_updates"] == after
    finally:
        fleet.stop(agg)


@AGGREGATOR
@given(initialised=st.booleans(), data=st.data())
def test_aggregator_answers_any_reservation(
    fleet: Fleet, initialised: bool, data: st.DataObject
) -> None:
    """Any header is granted room or answered with a documented reason; no answer counts as
    a refused update, and room is held only for a granted header, until its stream ends."""
    agg = fleet.start()
    try:
        s0, s1, round_ = _two_sites(agg, initialised)
        weights = model(2.0)
        fields = data.draw(_header_fields(round_, weights), label="header")
        before = agg.status()["refused_updates"]

        grant = s0.stub.ReserveUpload(
            pb.UploadReservation(header=pb.UpdateHeader(**fields), wait_seconds=0), timeout=5
        )
        event("granted" if grant.granted else f"not granted: {grant.reason}")

        assert agg.status()["refused_updates"] == before
        sent_accepted = False
        if grant.granted:
            assert agg.coord.admission.staging.items == 1
            # The stream with that header claims the room and gives it back, whatever its fate.
            sender = agg.site(fields["site"])
            sender.study = fields["study"]
            receipt = sender.submit_raw([header(**fields), *tensor_messages(weights)])
            sent_accepted = receipt.accepted
        else:
            assert grant.reason in UPDATE_REASONS | {"busy"}, grant.reason
            assert grant.message
        assert agg.coord.admission.staging.items == 0
        # The aggregator still takes a good update, from a site that has sent none.
        other = s0 if grant.granted and fields["site"] == "s1" else s1
        good = other.submit(model(3.0), 1 if initialised or sent_accepted else 0)
        assert good.accepted, good
    finally:
        fleet.stop(agg)


SENDABLE_SPECS = st.lists(
    st.builds(
        pb.TensorSpec,
        name=st.text(min_size=1, max_size=8),
        dtype=st.sampled_from(ALLOWED_DTYPES),
        shape=st.one_of(
            st.lists(st.integers(0, 4), max_size=3),
            st.lists(st.sampled_from([0, 1, 10**6, 10**12]), max_size=2),
        ),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda s: s.name,
)
SPECS = st.lists(
    st.builds(pb.TensorSpec, name=NAMES, dtype=DTYPES, shape=SHAPES),
    max_size=4,
)


@AGGREGATOR
@given(specs=st.one_of(SENDABLE_SPECS, SPECS))
def test_aggregator_answers_any_join(fleet: Fleet, specs: list[pb.TensorSpec]) -> None:
    """The first site to join declares the model. A model it may declare can be sent: its
    initial model is taken; one the protocol cannot carry is refused at Join."""
    agg = fleet.start()
    try:
        s0 = agg.site("s0")
        request = pb.JoinRequest(
            study=STUDY, site="s0", train_samples=100, test_samples=40, model=specs
        )
        joined = agg.stub.Join(request, timeout=5)
        event(f"join refused: {joined.reason}" if not joined.accepted else "join accepted")
        if joined.accepted:
            declared = [TensorSpec.from_proto(p) for p in specs]
            assert s0.task().kind == pb.TaskResponse.INIT
            size = sum(s.nbytes for s in declared)
            event("small model" if size <= 1 << 20 else "large model")
            if size <= 1 << 20:
                zeros = {s.name: np.zeros(s.shape, dtype=s.dtype) for s in declared}
                receipt = s0.submit(zeros, 0)
                assert receipt.accepted, receipt
            else:
                # Too large to build here: the first chunk of the first tensor, then the end.
                first = declared[0]
                chunk = tensors_pb2.TensorChunk(
                    name=first.name, dtype=first.dtype, shape=first.shape, total_bytes=first.nbytes
                )
                h = s0.header(0, tensor_count=len(declared), total_bytes=size)
                receipt = s0.submit_raw([header(**h), pb.UpdateChunk(tensor=chunk)])
                assert not receipt.accepted
                assert receipt.reason in UPDATE_REASONS, receipt.reason
        else:
            assert joined.reason in JOIN_REASONS, joined.reason
            assert joined.message
        # Still up: another site's join is answered.
        other = agg.site("s1").join()
        assert other.accepted or other.reason == "model-mismatch", other
    finally:
        fleet.stop(agg)


# ------------------------------------------------------------------------------ study loader

BASES: list[dict[str, Any]] = [
    study_doc(),
    *(
        yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in sorted((ROOT / "examples").glob("*.yaml"))
    ),
]
TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = st.one_of(st.text(max_size=10), st.sampled_from(["name", "rounds", "extra", "", "a b"]))


def _kind(value: Any) -> str:
    return type(value).__name__


def _render_key(key: Any) -> str:
    """A key as a field path shows it (see ``fedstudy.spec._path``)."""
    if isinstance(key, bool | int):
        return f"[{int(key)}]"
    text = key if isinstance(key, str) else repr(key)
    if text and all(c.isprintable() and not c.isspace() for c in text):
        return text
    return f"[{text!r}]"


def _render_path(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        shown = _render_key(part)
        out += shown if shown.startswith("[") or not out else "." + shown
    return out or "(document)"


def _paths(node: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every key or index path under ``node`` (not the root itself)."""
    if isinstance(node, dict):
        items: list[tuple[str | int, Any]] = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _get(doc: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _check_study_error(err: StudyError, doc: Any) -> None:
    """Non-empty; one line per problem; each line starts with a field path (a field of the
    study, or a key of the document) or with ``(file)``, ``(document)`` for a file or document
    that is not a study at all, then a colon."""
    assert str(err)
    assert err.problems
    event("refused: " + ("(document)/(file)" if err.problems[0].startswith("(") else "field"))
    assert str(err).splitlines()[1:] == [f"  {p}" for p in err.problems]
    heads = ["(document)", "(file)", *TOP_LEVEL]
    if isinstance(doc, dict):
        heads += [_render_key(k) for k in doc]
    for problem in err.problems:
        assert problem.strip(), err.problems
        assert "\n" not in problem, problem
        assert any(
            problem.startswith(h) and problem[len(h)] in ".[:"
            for h in heads
            if len(problem) > len(h)
        ), (problem, heads)
        assert ": " in problem, problem


def _parse(doc: Any) -> FederatedStudy | StudyError:
    try:
        study = parse_study(doc)
    except StudyError as e:
        _check_study_error(e, doc)
        return e
    assert isinstance(study, FederatedStudy)
    event("valid")
    return study


def _load(path: Path) -> FederatedStudy | StudyError:
    try:
        study = load_study(path)
    except StudyError as e:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_bytes()) if d is not None]
        except Exception:
            docs = []
        doc = docs[0] if len(docs) == 1 else None
        _check_study_error(e, doc)
        return e
    assert isinstance(study, FederatedStudy)
    event("valid")
    return study


@st.composite
def _mutated_doc(draw: st.DrawFn) -> dict[str, Any]:
    """A valid document with 1-4 random edits: a key deleted, a value replaced by a JSON value
    of any type, an unknown key inserted; anywhere in the tree."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        containers = [(), *(p for p in paths if isinstance(_get(doc, p), dict | list))]
        op = draw(st.sampled_from(["delete", "replace", "insert"]))
        if op == "insert":
            parent = _get(doc, draw(st.sampled_from(containers)))
            if isinstance(parent, dict):
                parent[draw(KEYS)] = draw(JSON)
            else:
                parent.insert(draw(st.integers(0, len(parent))), draw(JSON))
            continue
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = _get(doc, path[:-1])
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return doc


@LOADER
@given(doc=_mutated_doc())
def test_mutated_document_is_parsed_or_refused_by_field(doc: dict[str, Any]) -> None:
    _parse(doc)


def _leaves(doc: Any) -> list[tuple[str | int, ...]]:
    return [p for p in _paths(doc) if not isinstance(_get(doc, p), dict | list)]


def _names(problem: str, path: tuple[str | int, ...]) -> bool:
    """Whether ``problem`` is about the field at ``path``: it starts with that path, or with
    the path of an object holding it whose own rule broke (``spec.sites[0].data: format
    builtin needs 'dataset'``), quoting the key that leads down to the field."""
    field = _render_path(path)
    if problem.startswith(field) and problem[len(field) : len(field) + 1] in (".", "[", ":"):
        return True
    for depth in range(len(path)):
        below = [k for k in path[depth:] if isinstance(k, str)]
        if problem.startswith(f"{_render_path(path[:depth])}: ") and any(
            repr(k) in problem for k in below
        ):
            return True
    return False


@LOADER
@given(base=st.sampled_from(BASES), data=st.data())
def test_replaced_leaf_is_named_in_the_error(base: dict[str, Any], data: st.DataObject) -> None:
    doc = copy.deepcopy(base)
    path = data.draw(st.sampled_from(_leaves(doc)), label="path")
    old = _get(doc, path)
    new = data.draw(JSON.filter(lambda v: _kind(v) != _kind(old)), label="value")
    _get(doc, path[:-1])[path[-1]] = new

    result = _parse(doc)

    if isinstance(result, StudyError):
        assert any(_names(p, path) for p in result.problems), (path, result.problems)


@LOADER
@given(doc=st.one_of(JSON, st.dictionaries(st.sampled_from(TOP_LEVEL), JSON, max_size=5)))
def test_arbitrary_value_is_parsed_or_refused_by_field(doc: Any) -> None:
    _parse(doc)


_VALID_YAML = [yaml.safe_dump(b, sort_keys=False) for b in BASES]
YAML_CHARS = st.sampled_from(list(":-[]{},&*!|>'\"#%@`? \n\t.0123456789aeknrstxyz\x00\x85"))


# Scalars YAML reads as typed values (some impossible ones), tags, anchors, deep nesting.
YAML_TOKENS = st.one_of(
    st.sampled_from(
        [
            "2026-02-30",
            "2026-06-30 25:00:00",
            "0000-01-01",
            "!!int x ",
            "!!float x ",
            "!!timestamp x ",
            "!!binary ?",
            "!!set {a} ",
            "!!omap [a] ",
            "!!python/name:os.system ",
            "!custom ",
            "&a ",
            "*a ",
            "*missing ",
            "<<: 1\n",
            "? [a]\n: b\n",
            "0x" + "f" * 5000,
            ".nan",
            "-.inf",
            "~",
            "---\n",
        ]
    ),
    st.integers(1, 1500).map(lambda n: "[" * n),
    st.integers(1, 1500).map(lambda n: "{a: " * n),
)


@st.composite
def _spliced_yaml(draw: st.DrawFn) -> str:
    """A valid study file with a few slices deleted or replaced by YAML-ish text or tokens."""
    text = draw(st.sampled_from(_VALID_YAML))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        text = text[:i] + draw(st.one_of(st.text(YAML_CHARS, max_size=8), YAML_TOKENS)) + text[j:]
    return text


YAML_TEXT = st.one_of(st.text(), st.text(YAML_CHARS, max_size=40), _spliced_yaml())


@LOADER
@given(text=YAML_TEXT)
def test_yaml_text_is_loaded_or_refused_by_field(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "study.yaml"
        p.write_text(text, encoding="utf-8")
        _load(p)


@st.composite
def _flipped_bytes(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(_VALID_YAML)).encode())
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@LOADER
@given(raw=st.one_of(st.binary(max_size=200), _flipped_bytes()))
def test_file_bytes_are_loaded_or_refused_by_field(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "study.yaml"
        p.write_bytes(raw)
        _load(p)
