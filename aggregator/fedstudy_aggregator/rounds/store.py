"""The global model, and the updates arriving against it: received (into memory or a spool
file), examined, then handed to the strategy, which folds them into its running mean.

An update is received whole before it counts. Then one pass (``examine``) refuses NaN and
infinity and computes the update's digest and the norm of its change, and the strategy folds
it in a block at a time. The aggregator holds the global model and the running mean, and a
spooled update never: memory stays near two models whatever the number of sites.

How an update's chunks become tensors is the assembler's job (``UpdateStore.assembler``):
the one place where an update encoded otherwise than as plain tensors would be decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedstudy.tensors import (
    Array,
    SpooledWeights,
    SpoolingAssembler,
    TensorAssembler,
    TensorSpec,
    Weights,
    WireError,
    digest,
    signature,
)
from fedstudy.wire import aggregator_pb2 as pb

from ..strategies import Update
from .checks import Refusal


class GlobalModel:
    """The study's current global model (None before the initial model) and its digest,
    computed once per model: models are never changed in place, a new version is a new
    mapping."""

    def __init__(self) -> None:
        self.weights: Weights | None = None
        self._digested: Weights | None = None
        self._digest = ""

    def set(self, weights: Weights, known_digest: str | None = None) -> None:
        self.weights = weights
        if known_digest is not None:
            self._digested, self._digest = weights, known_digest

    def digest(self) -> str | None:
        if self.weights is None:
            return None
        if self._digested is not self.weights:
            self._digest = digest(self.weights)
            self._digested = self.weights
        return self._digest

    def signature(self) -> list[TensorSpec] | None:
        return None if self.weights is None else signature(self.weights)


@dataclass(frozen=True)
class Examined:
    digest: str
    # The L2 norm of the change from the global model over the float tensors (None for an
    # initial model, which has nothing to change from).
    norm: float | None


def examine(received: Weights | SpooledWeights, base: Mapping[str, Array] | None) -> Examined:
    """One pass over an update as it arrived: refuses NaN and infinity (``WireError``
    non-finite), and computes its digest (as ``fedstudy.tensors.digest``) and the norm of its
    change from ``base``, a block at a time."""
    h = hashlib.sha256()
    total = 0.0
    update = Update(received)
    specs = received.specs.values() if isinstance(received, SpooledWeights) else signature(received)
    for spec in specs:
        h.update(f"{spec.name}\0{spec.dtype}\0{list(spec.shape)}\0".encode())
        floating = np.dtype(spec.dtype).kind == "f"
        g = base[spec.name].reshape(-1) if base is not None and floating else None
        for start, block in update.blocks(spec.name):
            if floating and not np.isfinite(block).all():
                raise WireError("non-finite", f"tensor {spec.name} holds NaN or infinity")
            h.update(np.ascontiguousarray(block).view(np.uint8).data)
            if g is not None:
                d = np.subtract(block, g[start : start + block.size], dtype=np.float64)
                # einsum, not dot: BLAS threads would spin against the gRPC threads.
                total += float(np.einsum("i,i->", d, d))
    return Examined(h.hexdigest(), float(np.sqrt(total)) if base is not None else None)


class SpoolFailure(Exception):
    """The spool could not be written (a full disk, say): the aggregator must stop."""

    def __init__(self, what: str, err: OSError) -> None:
        self.what = what
        self.err = err
        super().__init__(f"{what}: {err}")


@dataclass(frozen=True)
class Received:
    """An update as it arrived: its tensors, the bytes its stream carried, and the bytes of
    tensor data in it."""

    weights: Weights | SpooledWeights
    stream_bytes: int
    payload_bytes: int


class UpdateStore:
    """Receives update streams; ``spool_dir`` holds the spool files of large models' updates
    (None: every update is received into memory)."""

    def __init__(self, spool_dir: Path | None) -> None:
        self.spool_dir = spool_dir

    def assembler(self, expected: list[TensorSpec], bound: int, spool: bool) -> TensorAssembler:
        """What turns an update's chunks into tensors: in arrays, or (``spool``) in a file."""
        if spool:
            assert self.spool_dir is not None
            try:
                return SpoolingAssembler(expected, self.spool_dir, max_bytes=bound)
            except OSError as e:
                raise SpoolFailure(f"spooling an update in {self.spool_dir}", e) from None
        return TensorAssembler(expected, max_bytes=bound, check_finite=False)

    def receive(
        self,
        h: pb.UpdateHeader,
        header_bytes: int,
        stream: Iterator[pb.UpdateChunk],
        expected: list[TensorSpec],
        bound: int,
        spool: bool,
    ) -> Received:
        """Reads the rest of an update's stream (the header came first, ``header_bytes``
        long); refuses what breaks its bound or the header's announcements."""
        asm = self.assembler(expected, bound, spool)
        seen = header_bytes
        try:
            for msg in stream:
                seen += msg.ByteSize()
                if seen > bound:
                    raise Refusal("too-large", f"the stream passed its bound of {bound} bytes")
                if msg.WhichOneof("part") != "tensor":
                    raise Refusal("bad-stream", "a second header inside the stream")
                asm.add(msg.tensor)
            received = asm.finish_spooled() if isinstance(asm, SpoolingAssembler) else asm.finish()
        except OSError as e:
            assert isinstance(asm, SpoolingAssembler)
            asm.spool.close()
            raise SpoolFailure(f"spooling an update in {self.spool_dir}", e) from None
        except BaseException:
            if isinstance(asm, SpoolingAssembler):
                asm.spool.close()
            raise
        return Received(received, seen, asm.received_bytes)


def check_announced(h: pb.UpdateHeader, received: Received) -> None:
    """The stream held what its header announced (tensors and bytes); a spooled update that
    did not is closed."""
    weights, received_bytes = received.weights, received.payload_bytes
    tensors = len(weights.specs) if isinstance(weights, SpooledWeights) else len(weights)
    if h.tensor_count != tensors or h.total_bytes != received_bytes:
        if isinstance(weights, SpooledWeights):
            weights.close()
        raise Refusal(
            "bad-stream",
            f"the header announced {h.tensor_count} tensors and {h.total_bytes} bytes; "
            f"the stream held {tensors} tensors and {received_bytes} bytes",
        )
