"""The aggregator's state on disk, written so that a crash at any moment leaves a usable one.

Layout of the state folder:

- ``model-NNNNNN.safetensors``: the global model of version N (``model/<tensor>``) and the
  strategy's optimizer state (``strategy/<key>``).
- ``state.json``: everything else (round, sites, metrics history, seen update ids, refusal
  counts) and the name of the model file it goes with.

A round's checkpoint writes the model file first and ``state.json`` last, each atomically,
then deletes older model files: whichever moment a crash hits, ``state.json`` names a
complete model file.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedstudy.fsutil import atomic_write_json, atomic_write_parts, read_json
from fedstudy.tensors import Array, TensorSpec, Weights, digest, signature

STATE_FILE = "state.json"
FORMAT = 1
_MODEL = "model/"
_STRATEGY = "strategy/"


class CheckpointError(RuntimeError):
    """A state folder that cannot be resumed from."""


@dataclass
class Snapshot:
    state: dict[str, Any]
    model: Weights | None
    strategy_state: dict[str, Array]


def _contiguous(arr: Array) -> Array:
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def model_file_name(version: int) -> str:
    return f"model-{version:06d}.safetensors"


def encode_model(
    model: Mapping[str, Array],
    strategy_state: Mapping[str, Array] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """safetensors bytes of a model (and optional strategy state, under prefixes)."""
    tensors = {_MODEL + k: _contiguous(v) for k, v in model.items()}
    for k, v in (strategy_state or {}).items():
        tensors[_STRATEGY + k] = _contiguous(v)
    out: bytes = st_save(tensors, metadata=dict(metadata or {}))
    return out


_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "uint8": "U8",
    "bool": "BOOL",
}


def safetensors_parts(
    tensors: Mapping[str, Array], metadata: Mapping[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """The safetensors file of ``tensors`` as pieces: the header, then each tensor's own
    bytes (no copy), so a model of any size is written without a second copy in memory."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays = []
    offset = 0
    for name, arr in tensors.items():
        a = _contiguous(arr)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        end = offset + a.nbytes
        header[name] = {
            "dtype": _ST_DTYPES[a.dtype.name],
            "shape": [int(d) for d in a.shape],
            "data_offsets": [offset, end],
        }
        arrays.append(a)
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    for a in arrays:
        if a.nbytes:
            yield a.reshape(-1).view(np.uint8).data


def write_model_file(
    path: Path,
    model: Mapping[str, Array],
    strategy_state: Mapping[str, Array] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``encode_model``'s file atomically, tensor by tensor."""
    tensors = {_MODEL + k: v for k, v in model.items()}
    for k, v in (strategy_state or {}).items():
        tensors[_STRATEGY + k] = v
    atomic_write_parts(path, safetensors_parts(tensors, metadata))


class CheckpointStore:
    """Reads and writes one aggregator's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.model_file: str | None = None
        self._model_meta: dict[str, Any] = {}

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def save(
        self,
        state: Mapping[str, Any],
        model: Weights,
        strategy_state: Mapping[str, Array],
        version: int,
        model_digest: str | None = None,
    ) -> None:
        """Writes a new model version and the state that names it (``model_digest``: the
        model's ``digest``, where the caller has it already)."""
        name = model_file_name(version)
        meta = {"version": str(version), "study": str(state.get("study", ""))}
        write_model_file(self.dir / name, model, strategy_state, meta)
        self.model_file = name
        self._model_meta = {
            "model_file": name,
            "model_version": version,
            "model_tensors": [[s.name, s.dtype, list(s.shape)] for s in signature(model)],
            "model_digest": model_digest or digest(model),
        }
        self.save_state(state)
        for old in self.dir.glob("model-*.safetensors"):
            if old.name != name:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def save_state(self, state: Mapping[str, Any]) -> None:
        """Rewrites ``state.json`` alone, keeping the current model file."""
        atomic_write_json(self.state_path, {"format": FORMAT, **state, **self._model_meta})

    def load(self) -> Snapshot | None:
        """The saved state, or None for a fresh folder."""
        if not self.state_path.exists():
            return None
        try:
            state = read_json(self.state_path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.state_path}: unreadable: {e}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.state_path}: not a checkpoint of format {FORMAT}")
        name = state.get("model_file")
        if name is None:
            return Snapshot(state, None, {})
        path = self.dir / str(name)
        try:
            tensors = st_load(path.read_bytes())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the checkpointed model: {e}") from None
        specs = [TensorSpec(n, d, tuple(s)) for n, d, s in state.get("model_tensors", [])]
        model: Weights = {}
        for spec in specs:
            arr = tensors.get(_MODEL + spec.name)
            if arr is None:
                raise CheckpointError(f"{path}: tensor {spec.name} is missing")
            model[spec.name] = np.asarray(arr)
        if signature(model) != specs or len(specs) != sum(k.startswith(_MODEL) for k in tensors):
            raise CheckpointError(f"{path}: the tensors differ from those {STATE_FILE} lists")
        if digest(model) != state.get("model_digest"):
            raise CheckpointError(f"{path}: the model's digest differs from {STATE_FILE}'s")
        strategy_state = {
            k.removeprefix(_STRATEGY): v for k, v in tensors.items() if k.startswith(_STRATEGY)
        }
        self.model_file = str(name)
        self._model_meta = {
            k: state[k] for k in ("model_file", "model_version", "model_tensors", "model_digest")
        }
        return Snapshot(state, model, strategy_state)
