"""Named tensors on the wire: cut into chunks, put back together with every check on the way.

A model is an ordered mapping of names to numpy arrays. ``to_chunks`` streams it as
``TensorChunk`` messages of at most ``chunk_bytes`` of data each; ``TensorAssembler`` takes
such a stream, refuses anything malformed with a ``WireError`` that says why, and fills
arrays in place, so a receiver never holds more than the tensors themselves.
``SpoolingAssembler`` makes the same checks and writes the tensors to a file instead
(``SpooledWeights``), which a receiver then reads back a block at a time: a large model then
crosses without the receiver holding it in memory at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedstudy.wire import aggregator_pb2, tensors_pb2

DEFAULT_CHUNK_BYTES = 1 << 20
# Values per block when a tensor is read back a part at a time (4 MiB of float32).
BLOCK_VALUES = 1 << 20

ALLOWED_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")
# The most dimensions a tensor may have (numpy 1.x's limit; numpy 2 allows 64).
MAX_DIMS = 32
# The most bytes one array can address.
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)

Array = npt.NDArray[np.generic]
Weights = dict[str, Array]


class WireError(ValueError):
    """A stream that breaks the protocol. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_proto(self) -> aggregator_pb2.TensorSpec:
        return aggregator_pb2.TensorSpec(name=self.name, dtype=self.dtype, shape=self.shape)

    @classmethod
    def from_proto(cls, p: aggregator_pb2.TensorSpec) -> TensorSpec:
        return cls(p.name, p.dtype, tuple(int(d) for d in p.shape))

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


def check_spec(spec: TensorSpec) -> None:
    """Raises ``WireError`` when no array can hold such a tensor: an unsupported dtype, too
    many dimensions, a negative one, or more bytes than an array can address."""
    if spec.dtype not in ALLOWED_DTYPES:
        raise WireError("wrong-dtype", f"tensor {spec.name}: unsupported dtype {spec.dtype!r}")
    shape = list(spec.shape)
    if len(shape) > MAX_DIMS:
        raise WireError(
            "wrong-shape", f"tensor {spec.name}: {len(shape)} dimensions, at most {MAX_DIMS}"
        )
    if any(d < 0 for d in shape):
        raise WireError("wrong-shape", f"tensor {spec.name}: negative dimension in {shape}")
    # numpy refuses a shape whose non-zero dimensions overflow, even when another is 0.
    if math.prod(d for d in shape if d) * np.dtype(spec.dtype).itemsize > MAX_ARRAY_BYTES:
        raise WireError(
            "too-large",
            f"tensor {spec.name}: shape {shape} of {spec.dtype} is more than an array can hold",
        )


def signature_problem(specs: Iterable[TensorSpec]) -> str | None:
    """Why no stream could carry a model of this signature, or None when one can."""
    seen: set[str] = set()
    for spec in specs:
        if not spec.name:
            return "a tensor without a name"
        if spec.name in seen:
            return f"tensor {spec.name} is listed twice"
        seen.add(spec.name)
        try:
            check_spec(spec)
        except WireError as e:
            return str(e)
    return None


def signature(weights: Mapping[str, Array]) -> list[TensorSpec]:
    return [TensorSpec(k, v.dtype.name, tuple(int(d) for d in v.shape)) for k, v in weights.items()]


def total_bytes(weights: Mapping[str, Array]) -> int:
    return sum(int(v.nbytes) for v in weights.values())


def digest(weights: Mapping[str, Array]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in order: equal digests, equal models."""
    h = hashlib.sha256()
    for name, arr in weights.items():
        h.update(f"{name}\0{arr.dtype.name}\0{list(arr.shape)}\0".encode())
        h.update(_contiguous(arr).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _contiguous(arr: Array) -> Array:
    # np.ascontiguousarray would turn a 0-d array into a 1-d one.
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _le(arr: Array) -> Array:
    a = _contiguous(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _pieces(
    weights: Mapping[str, Array], chunk_bytes: int
) -> Iterator[tuple[tensors_pb2.TensorChunk, memoryview]]:
    """Each chunk's fields but ``data``, with the bytes that are its data (a view of the
    array: no copy). The first chunk of a tensor carries dtype, shape and size."""
    for name, arr in weights.items():
        a = _le(arr)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise WireError("wrong-dtype", f"tensor {name}: dtype {a.dtype.name} cannot be sent")
        raw = a.reshape(-1).view(np.uint8).data
        size = len(raw)
        yield (
            tensors_pb2.TensorChunk(
                name=name,
                dtype=a.dtype.name,
                shape=[int(d) for d in a.shape],
                total_bytes=size,
                offset=0,
            ),
            raw[:chunk_bytes],
        )
        offset = min(chunk_bytes, size)
        while offset < size:
            end = min(offset + chunk_bytes, size)
            yield tensors_pb2.TensorChunk(name=name, offset=offset), raw[offset:end]
            offset = end


def to_chunks(
    weights: Mapping[str, Array], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tensors_pb2.TensorChunk]:
    """Streams each tensor as one or more chunks; the first carries dtype, shape and size."""
    for chunk, data in _pieces(weights, chunk_bytes):
        chunk.data = bytes(data)
        yield chunk


# The key of TensorChunk.data (field 6, length-delimited) on the wire.
_DATA_KEY = bytes([6 << 3 | 2])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encoded_chunks(
    weights: Mapping[str, Array], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """``to_chunks``, serialized: each chunk's other fields, then its data as field 6, joined
    in one copy straight from the array (protobuf reads fields in any order). A sender that
    streams the same model to many receivers saves two copies of every byte."""
    for chunk, data in _pieces(weights, chunk_bytes):
        yield b"".join((chunk.SerializeToString(), _DATA_KEY, _varint(len(data)), data))


class TensorAssembler:
    """Puts a stream of chunks back into arrays, checking it against what is expected.

    ``expected`` (optional) is the model signature the stream must match exactly: the same
    names, dtypes and shapes, nothing more, nothing missing. ``max_bytes`` bounds the whole
    stream. ``check_finite`` refuses NaN and infinity in floating tensors.
    """

    def __init__(
        self,
        expected: Iterable[TensorSpec] | None = None,
        *,
        max_bytes: int | None = None,
        check_finite: bool = True,
    ) -> None:
        self.expected = {s.name: s for s in expected} if expected is not None else None
        self.max_bytes = max_bytes
        self.check_finite = check_finite
        self.weights: Weights = {}
        self.received_bytes = 0
        self._current: str | None = None
        self._buf: memoryview | None = None
        self._size = 0
        self._filled = 0
        self._arrived: set[str] = set()

    def add(self, chunk: tensors_pb2.TensorChunk) -> None:
        if chunk.offset == 0:
            self._finish_current()
            self._start(chunk)
        elif chunk.name != self._current:
            raise WireError(
                "bad-stream",
                f"chunk of tensor {chunk.name!r} at offset {chunk.offset} arrived "
                f"while {self._current!r} was open (tensors must not interleave)",
            )
        if chunk.offset != self._filled:
            raise WireError(
                "bad-stream",
                f"tensor {chunk.name}: chunk at offset {chunk.offset}, "
                f"expected {self._filled} (gap or overlap)",
            )
        n = len(chunk.data)
        if self._filled + n > self._size:
            raise WireError("bad-stream", f"tensor {chunk.name}: more bytes than its shape holds")
        self.received_bytes += n
        if self.max_bytes is not None and self.received_bytes > self.max_bytes:
            raise WireError("too-large", f"stream passed its bound of {self.max_bytes} bytes")
        self._write(chunk.data)
        self._filled += n

    def _write(self, data: bytes) -> None:
        """Stores the next ``data`` of the open tensor at ``self._filled``."""
        assert self._buf is not None
        self._buf[self._filled : self._filled + len(data)] = data

    def _open_tensor(self, spec: TensorSpec) -> None:
        """Makes room for a tensor that passed every check."""
        try:
            arr = np.empty(spec.shape, dtype=np.dtype(spec.dtype).newbyteorder("<"))
        except MemoryError:
            raise WireError(
                "too-large", f"tensor {spec.name} ({spec.nbytes} bytes) does not fit in memory"
            ) from None
        self.weights[spec.name] = arr
        self._buf = arr.reshape(-1).view(np.uint8).data

    def _close_tensor(self, name: str) -> None:
        """A tensor arrived whole."""
        arr = self.weights[name]
        if self.check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WireError("non-finite", f"tensor {name} holds NaN or infinity")
        self._buf = None

    def _start(self, chunk: tensors_pb2.TensorChunk) -> None:
        name = chunk.name
        if not name:
            raise WireError("bad-stream", "a tensor without a name")
        if name in self._arrived:
            raise WireError("bad-stream", f"tensor {name} sent twice")
        shape = tuple(int(d) for d in chunk.shape)
        spec = TensorSpec(name, chunk.dtype, shape)
        check_spec(spec)
        if self.expected is not None:
            want = self.expected.get(name)
            if want is None:
                raise WireError("unknown-tensor", f"tensor {name} is not part of the model")
            if want.dtype != spec.dtype:
                raise WireError(
                    "wrong-dtype", f"tensor {name}: dtype {spec.dtype}, the model has {want.dtype}"
                )
            if want.shape != spec.shape:
                raise WireError(
                    "wrong-shape",
                    f"tensor {name}: shape {list(spec.shape)}, the model has {list(want.shape)}",
                )
        if chunk.total_bytes != spec.nbytes:
            raise WireError(
                "bad-stream",
                f"tensor {name}: total_bytes {chunk.total_bytes} does "
                f"not match {spec.describe()} ({spec.nbytes} bytes)",
            )
        if self.max_bytes is not None and self.received_bytes + spec.nbytes > self.max_bytes:
            raise WireError(
                "too-large",
                f"tensor {name} ({spec.nbytes} bytes) would pass the "
                f"stream's bound of {self.max_bytes} bytes",
            )
        self._open_tensor(spec)
        self._arrived.add(name)
        self._current = name
        self._size = spec.nbytes
        self._filled = 0

    def _finish_current(self) -> None:
        if self._current is None:
            return
        if self._filled != self._size:
            raise WireError(
                "bad-stream",
                f"tensor {self._current}: stream ended after {self._filled} of {self._size} bytes",
            )
        self._close_tensor(self._current)
        self._current = None

    def _check_complete(self) -> None:
        """Closes the stream; every expected tensor must have arrived."""
        self._finish_current()
        if self.expected is not None:
            missing = [n for n in self.expected if n not in self._arrived]
            if missing:
                raise WireError("missing-tensor", f"missing tensors: {', '.join(missing)}")

    def finish(self) -> Weights:
        """Closes the stream; every expected tensor must have arrived."""
        self._check_complete()
        if self.expected is not None:
            # Keep the model's order, whatever order the sender used.
            return {n: self.weights[n] for n in self.expected}
        return self.weights


class SpooledWeights:
    """A model's tensors in a file, laid out one after another in model order and read back a
    block at a time. The file has no name (it is gone when closed, or when the process dies)."""

    def __init__(self, fd: int, specs: Iterable[TensorSpec]) -> None:
        self._fd = fd
        self.specs = {s.name: s for s in specs}
        self.offsets: dict[str, int] = {}
        at = 0
        for spec in self.specs.values():
            self.offsets[spec.name] = at
            at += spec.nbytes
        self.nbytes = at

    def __enter__(self) -> SpooledWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read_into(self, buf: memoryview, at: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], at + done)
            if n <= 0:
                raise OSError(f"the spool file ended at byte {at + done}")
            done += n

    def _dtype(self, name: str) -> np.dtype[np.generic]:
        return np.dtype(self.specs[name].dtype).newbyteorder("<")

    def array(self, name: str) -> Array:
        """The whole tensor, as a new array."""
        spec = self.specs[name]
        arr: Array = np.empty(spec.shape, dtype=self._dtype(name))
        self._read_into(arr.reshape(-1).view(np.uint8).data, self.offsets[name])
        return arr

    def blocks(self, name: str, block_values: int = BLOCK_VALUES) -> Iterator[tuple[int, Array]]:
        """The tensor's values in order, ``block_values`` at a time, as (index of the first
        value in the flattened tensor, 1-d array)."""
        spec = self.specs[name]
        dtype = self._dtype(name)
        count = math.prod(spec.shape)
        at = self.offsets[name]
        for start in range(0, count, block_values):
            block: Array = np.empty(min(block_values, count - start), dtype=dtype)
            self._read_into(block.view(np.uint8).data, at + start * dtype.itemsize)
            yield start, block

    def load(self) -> Weights:
        """Every tensor as an array (the model in memory)."""
        return {name: self.array(name) for name in self.specs}


class SpoolingAssembler(TensorAssembler):
    """A ``TensorAssembler`` that writes the tensors to a nameless file in ``directory``
    rather than to arrays: the same checks, bar the finite check (it needs the values; see
    ``SpooledWeights.blocks``). ``expected`` is required: it fixes the file's layout."""

    def __init__(
        self, expected: Iterable[TensorSpec], directory: Path, *, max_bytes: int | None = None
    ) -> None:
        specs = list(expected)
        super().__init__(specs, max_bytes=max_bytes, check_finite=False)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix="update-") as f:
            self.spool = SpooledWeights(os.dup(f.fileno()), specs)
        self._at = 0

    def _open_tensor(self, spec: TensorSpec) -> None:
        self._at = self.spool.offsets[spec.name]

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.spool._fd, view[done:], self._at + self._filled + done)

    def _close_tensor(self, name: str) -> None:
        pass

    def finish_spooled(self) -> SpooledWeights:
        """Closes the stream (every expected tensor must have arrived); the caller closes
        the spool."""
        self._check_complete()
        return self.spool


def from_chunks(
    chunks: Iterable[tensors_pb2.TensorChunk],
    expected: Iterable[TensorSpec] | None = None,
    max_bytes: int | None = None,
) -> Weights:
    asm = TensorAssembler(expected, max_bytes=max_bytes)
    for c in chunks:
        asm.add(c)
    return asm.finish()
