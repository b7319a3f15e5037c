"""The wire: generated stubs match the .proto files; tensors survive chunking; bad streams fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedstudy.tensors import (
    SpooledWeights,
    SpoolingAssembler,
    TensorAssembler,
    TensorSpec,
    WireError,
    digest,
    encoded_chunks,
    from_chunks,
    signature,
    signature_problem,
    to_chunks,
)
from fedstudy.wire import tensors_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_proto_files(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(ROOT) for p in (ROOT / "fedstudy" / "wire").glob("*_pb2*"))
    assert fresh == checked_in, "the set of generated files differs: run scripts/gen-proto.sh"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), (
            f"{rel} drifted from proto/: run scripts/gen-proto.sh and commit the result"
        )


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.weight": rng.standard_normal((33, 17)).astype(np.float32),
        "layer.bias": rng.standard_normal(17).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float64),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_round_trip_at_any_chunk_size(chunk_bytes: int) -> None:
    model = _model()
    chunks = list(to_chunks(model, chunk_bytes=chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    back = from_chunks(chunks, expected=signature(model))
    assert list(back) == list(model)
    for k in model:
        assert back[k].dtype == model[k].dtype
        np.testing.assert_array_equal(back[k], model[k])
    assert digest(back) == digest(model)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 200, 1 << 20])
def test_encoded_chunks_are_the_serialized_chunks(chunk_bytes: int) -> None:
    model = {**_model(), "big-endian": np.arange(40, dtype=">f4")}
    messages = list(to_chunks(model, chunk_bytes=chunk_bytes))
    encoded = list(encoded_chunks(model, chunk_bytes=chunk_bytes))
    assert [tensors_pb2.TensorChunk.FromString(b) for b in encoded] == messages
    back = from_chunks(tensors_pb2.TensorChunk.FromString(b) for b in encoded)
    for k, arr in model.items():
        np.testing.assert_array_equal(back[k], arr)


def test_big_endian_input_arrives_as_the_same_values() -> None:
    arr = np.arange(10, dtype=">f4")
    back = from_chunks(to_chunks({"x": arr}))
    np.testing.assert_array_equal(back["x"], arr)


def _refusal(
    chunks: list[tensors_pb2.TensorChunk],
    expected: list[TensorSpec] | None = None,
    max_bytes: int | None = None,
) -> str:
    with pytest.raises(WireError) as info:
        from_chunks(chunks, expected=expected, max_bytes=max_bytes)
    return info.value.reason


def test_refusals_name_their_reason() -> None:
    model = _model()
    sig = signature(model)
    chunks = list(to_chunks(model, chunk_bytes=64))
    assert _refusal(chunks[:-1], sig) == "missing-tensor"
    assert _refusal(chunks[1:], sig) == "bad-stream"  # starts mid-tensor
    assert _refusal([*chunks[:2], chunks[1]], sig) == "bad-stream"  # overlap
    assert _refusal(chunks, sig, max_bytes=100) == "too-large"
    renamed = list(to_chunks({"other": model["layer.bias"]}))
    assert _refusal(renamed, sig) == "unknown-tensor"
    wrong_shape = list(to_chunks({"layer.bias": np.zeros(16, np.float32)}))
    assert _refusal(wrong_shape, sig) == "wrong-shape"
    wrong_dtype = list(to_chunks({"layer.bias": np.zeros(17, np.float64)}))
    assert _refusal(wrong_dtype, sig) == "wrong-dtype"
    for bad in (np.nan, np.inf, -np.inf):
        arr = model["layer.bias"].copy()
        arr[3] = bad
        assert _refusal(list(to_chunks({"layer.bias": arr}))) == "non-finite"
    lying = tensors_pb2.TensorChunk(
        name="x", dtype="float32", shape=[2], total_bytes=4, data=b"\0" * 4
    )
    assert _refusal([lying]) == "bad-stream"
    odd = tensors_pb2.TensorChunk(name="x", dtype="object", shape=[1], total_bytes=8)
    assert _refusal([odd]) == "wrong-dtype"


def _spool(
    chunks: list[tensors_pb2.TensorChunk],
    expected: list[TensorSpec],
    directory: Path,
    max_bytes: int | None = None,
) -> SpooledWeights:
    asm = SpoolingAssembler(expected, directory, max_bytes=max_bytes)
    try:
        for c in chunks:
            asm.add(c)
        return asm.finish_spooled()
    except BaseException:
        asm.spool.close()
        raise


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_a_spooled_model_reads_back_whole_and_in_blocks(chunk_bytes: int, tmp_path: Path) -> None:
    model = _model()
    shuffled = dict(reversed(list(model.items())))  # the sender's order is not the model's
    chunks = list(to_chunks(shuffled, chunk_bytes=chunk_bytes))
    with _spool(chunks, signature(model), tmp_path) as spool:
        back = spool.load()
        assert list(back) == list(model)
        for k, arr in model.items():
            assert back[k].dtype == arr.dtype
            assert back[k].shape == arr.shape
            np.testing.assert_array_equal(back[k], arr)
            parts = list(spool.blocks(k, block_values=5))
            assert [start for start, _ in parts] == list(range(0, arr.size, 5))
            joined = np.concatenate([b for _, b in parts]) if parts else np.zeros(0, arr.dtype)
            np.testing.assert_array_equal(joined, arr.reshape(-1))
        assert digest(back) == digest(model)
    # The spool file never had a name in the directory.
    assert list(tmp_path.iterdir()) == []


def test_a_spooling_assembler_refuses_what_the_in_memory_one_refuses(tmp_path: Path) -> None:
    model = _model()
    sig = signature(model)
    chunks = list(to_chunks(model, chunk_bytes=64))

    def spool_refusal(cs: list[tensors_pb2.TensorChunk], max_bytes: int | None = None) -> str:
        with pytest.raises(WireError) as info:
            _spool(cs, sig, tmp_path, max_bytes)
        return info.value.reason

    cases = {
        "missing-tensor": chunks[:-1],
        "bad-stream": chunks[1:],
        "unknown-tensor": list(to_chunks({"other": model["layer.bias"]})),
        "wrong-shape": list(to_chunks({"layer.bias": np.zeros(16, np.float32)})),
        "wrong-dtype": list(to_chunks({"layer.bias": np.zeros(17, np.float64)})),
    }
    for reason, cs in cases.items():
        assert _refusal(cs, sig) == reason
        assert spool_refusal(cs) == reason
    assert spool_refusal([*chunks[:2], chunks[1]]) == "bad-stream"
    assert spool_refusal(chunks, max_bytes=100) == "too-large"


def test_assembler_counts_bytes() -> None:
    model = _model()
    asm = TensorAssembler(signature(model))
    for c in to_chunks(model, chunk_bytes=100):
        asm.add(c)
    asm.finish()
    assert asm.received_bytes == sum(v.nbytes for v in model.values())


@pytest.mark.parametrize(
    "shape",
    [[2**32, 2**32], [2**62, 4], [0, 2**62], [2**40, 2**40, 0]],
    ids=["overflows-int64", "wraps-to-zero", "zero-and-huge", "huge-and-zero"],
)
def test_shape_larger_than_any_array_is_refused(shape: list[int]) -> None:
    # The product of these dimensions overflows 64 bits; it must not wrap to a small size.
    chunk = tensors_pb2.TensorChunk(name="x", dtype="float32", shape=shape, total_bytes=0)
    with pytest.raises(WireError) as info:
        from_chunks([chunk], max_bytes=1 << 20)
    assert info.value.reason == "too-large"
    assert str(info.value) == f"tensor x: shape {shape} of float32 is more than an array can hold"


def test_too_many_dimensions_are_refused() -> None:
    chunk = tensors_pb2.TensorChunk(
        name="x", dtype="uint8", shape=[1] * 65, total_bytes=1, data=b"\0"
    )
    with pytest.raises(WireError) as info:
        from_chunks([chunk])
    assert info.value.reason == "wrong-shape"
    assert str(info.value) == "tensor x: 65 dimensions, at most 32"


def test_tensor_that_cannot_be_allocated_is_refused_without_a_bound() -> None:
    # 4 EiB: more than any address space, so the allocation fails on every machine.
    chunk = tensors_pb2.TensorChunk(name="x", dtype="uint8", shape=[2**62], total_bytes=2**62)
    with pytest.raises(WireError) as info:
        from_chunks([chunk])
    assert info.value.reason == "too-large"
    assert str(info.value) == f"tensor x ({2**62} bytes) does not fit in memory"


def test_signature_problem_names_what_no_stream_can_carry() -> None:
    assert signature_problem(signature(_model())) is None
    assert signature_problem([TensorSpec("", "float32", (1,))]) == "a tensor without a name"
    twice = [TensorSpec("a", "float32", (1,)), TensorSpec("a", "float32", (2,))]
    assert signature_problem(twice) == "tensor a is listed twice"
    assert signature_problem([TensorSpec("a", "garbage", (1,))]) == (
        "tensor a: unsupported dtype 'garbage'"
    )
    assert signature_problem([TensorSpec("a", "int64", (3, -1))]) == (
        "tensor a: negative dimension in [3, -1]"
    )
    assert TensorSpec("a", "float32", (2**32, 2**32)).nbytes == 2**66
