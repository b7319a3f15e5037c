"""Named tensors on the wire: cut into chunks, put back together with every check on the way.

A model is an ordered mapping of names to numpy arrays. ``to_chunks`` streams it as
``TensorChunk`` messages of at most ``chunk_bytes`` of data each; ``TensorAssembler`` takes
such a stream, refuses anything malformed with a ``WireError`` that says why, and fills
arrays in place, so a receiver never holds more than the tensors themselves.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedstudy.wire import aggregator_pb2, tensors_pb2

DEFAULT_CHUNK_BYTES = 1 << 20

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


def to_chunks(
    weights: Mapping[str, Array], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tensors_pb2.TensorChunk]:
    """Streams each tensor as one or more chunks; the first carries dtype, shape and size."""
    for name, arr in weights.items():
        a = _le(arr)
        if a.dtype.name not in ALLOWED_DTYPES:
            raise WireError("wrong-dtype", f"tensor {name}: dtype {a.dtype.name} cannot be sent")
        raw = a.reshape(-1).view(np.uint8).data
        size = len(raw)
        first = tensors_pb2.TensorChunk(
            name=name,
            dtype=a.dtype.name,
            shape=[int(d) for d in a.shape],
            total_bytes=size,
            offset=0,
            data=bytes(raw[:chunk_bytes]),
        )
        yield first
        offset = min(chunk_bytes, size)
        while offset < size:
            end = min(offset + chunk_bytes, size)
            yield tensors_pb2.TensorChunk(name=name, offset=offset, data=bytes(raw[offset:end]))
            offset = end


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
        self._filled = 0

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
        assert self._buf is not None
        n = len(chunk.data)
        if self._filled + n > len(self._buf):
            raise WireError("bad-stream", f"tensor {chunk.name}: more bytes than its shape holds")
        self.received_bytes += n
        if self.max_bytes is not None and self.received_bytes > self.max_bytes:
            raise WireError("too-large", f"stream passed its bound of {self.max_bytes} bytes")
        self._buf[self._filled : self._filled + n] = chunk.data
        self._filled += n

    def _start(self, chunk: tensors_pb2.TensorChunk) -> None:
        name = chunk.name
        if not name:
            raise WireError("bad-stream", "a tensor without a name")
        if name in self.weights:
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
        try:
            arr = np.empty(shape, dtype=np.dtype(spec.dtype).newbyteorder("<"))
        except MemoryError:
            raise WireError(
                "too-large", f"tensor {name} ({spec.nbytes} bytes) does not fit in memory"
            ) from None
        self.weights[name] = arr
        self._current = name
        self._buf = arr.reshape(-1).view(np.uint8).data
        self._filled = 0

    def _finish_current(self) -> None:
        if self._current is None:
            return
        assert self._buf is not None
        if self._filled != len(self._buf):
            raise WireError(
                "bad-stream",
                f"tensor {self._current}: stream ended after "
                f"{self._filled} of {len(self._buf)} bytes",
            )
        arr = self.weights[self._current]
        if self.check_finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise WireError("non-finite", f"tensor {self._current} holds NaN or infinity")
        self._current = None
        self._buf = None

    def finish(self) -> Weights:
        """Closes the stream; every expected tensor must have arrived."""
        self._finish_current()
        if self.expected is not None:
            missing = [n for n in self.expected if n not in self.weights]
            if missing:
                raise WireError("missing-tensor", f"missing tensors: {', '.join(missing)}")
            # Keep the model's order, whatever order the sender used.
            return {n: self.weights[n] for n in self.expected}
        return self.weights


def from_chunks(
    chunks: Iterable[tensors_pb2.TensorChunk],
    expected: Iterable[TensorSpec] | None = None,
    max_bytes: int | None = None,
) -> Weights:
    asm = TensorAssembler(expected, max_bytes=max_bytes)
    for c in chunks:
        asm.add(c)
    return asm.finish()
