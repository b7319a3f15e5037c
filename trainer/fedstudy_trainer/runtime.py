"""Where a site trains: the torch device, mixed precision, and batches on their way there.

- ``choose_device`` turns a site's ``resources.device`` (``auto``, ``cpu``, ``cuda``,
  ``cuda:N``) and the number of CUDA devices into a torch device; ``auto`` takes the first
  CUDA device when there is one.
- ``amp_dtype`` decides mixed precision: only on a CUDA device and only when the study asks
  (``training.mixedPrecision``). bfloat16 where the device has it (no loss scaling needed);
  float16 with a gradient scaler otherwise, except under DP-SGD, whose per-row clipping must
  see unscaled gradients: there the site trains in full precision.
- ``Runtime.batches`` gathers each batch's rows on the CPU and moves them to the device; on a
  CUDA device through page-locked (pinned) memory, so the copy runs asynchronously.

A CPU site and a CUDA site given the same study draw the same batches (the row order comes
from numpy, not from the device), so without DP and without mixed precision they reach the
same weights up to float tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset

IndexBatch = npt.NDArray[np.int64]


class DeviceError(ValueError):
    """A device the site asked for that this machine does not have."""


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_device(requested: str, cuda_count: int) -> torch.device:
    """The torch device for ``requested`` on a machine with ``cuda_count`` CUDA devices."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto":
        return torch.device("cuda", 0) if cuda_count > 0 else torch.device("cpu")
    kind, _, number = requested.partition(":")
    if kind != "cuda" or (number and not number.isdigit()):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    index = int(number) if number else 0
    if cuda_count == 0:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
        raise DeviceError(
            f"device {requested}: this machine has no CUDA device (torch {torch.__version__}, "
            f"{built}); use device auto or cpu"
        )
    if index >= cuda_count:
        raise DeviceError(
            f"device {requested}: this machine has {cuda_count} CUDA device(s), "
            f"cuda:0 to cuda:{cuda_count - 1}"
        )
    return torch.device("cuda", index)


def amp_dtype(
    device: torch.device, mixed_precision: bool, private: bool, bf16_supported: bool
) -> torch.dtype | None:
    """The autocast dtype of a site's forward passes, or None for full precision."""
    if not mixed_precision or device.type != "cuda":
        return None
    if bf16_supported:
        return torch.bfloat16
    return None if private else torch.float16


class _Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples and labels in memory; a whole batch is gathered with one indexing call."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[row], self.y[row]

    def __getitems__(self, rows: IndexBatch) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(rows, dtype=torch.int64)
        return self.x[index], self.y[index]


def _as_is(batch: Any) -> Any:
    """The batch as ``__getitems__`` gathered it (no per-row collation)."""
    return batch


@dataclass(frozen=True)
class Runtime:
    """The device a site trains on and the precision of its forward passes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # autocast dtype; None: full precision
    notes: tuple[str, ...] = ()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def loss_scaling(self) -> bool:
        """float16 needs its loss scaled so small gradients do not underflow."""
        return self.dtype == torch.float16

    @property
    def rng_devices(self) -> list[int]:
        """The CUDA devices whose random state a training call forks (dropout masks)."""
        return [self.device.index or 0] if self.cuda else []

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active only for float16 (else its calls pass straight through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

    def batches(
        self, x: torch.Tensor, y: torch.Tensor, rows: Iterable[IndexBatch]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(examples, labels) on the device for each array of row indices in ``rows``."""
        loader = DataLoader(
            _Rows(x, y),
            batch_sampler=cast(Iterable[list[int]], rows),
            collate_fn=_as_is,
            num_workers=0,
            pin_memory=self.cuda,
        )
        for xb, yb in loader:
            yield self.to_device(xb), self.to_device(yb)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.cuda)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": str(self.device),
            "mixed_precision": str(self.dtype).removeprefix("torch.") if self.dtype else None,
            "pinned_memory": self.cuda,
        }
        if self.cuda:
            out["device_name"] = torch.cuda.get_device_name(self.device)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


CPU = Runtime()


def site_runtime(requested: str, mixed_precision: bool, private: bool) -> Runtime:
    """The runtime of a site on this machine; raises DeviceError for a device it lacks."""
    device = choose_device(requested, cuda_device_count())
    notes: list[str] = []
    bf16 = False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # Reproducible convolutions: a restarted trainer retrains a round to the same weights
        # (up to the float tolerance of atomic adds in some CUDA kernels).
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        bf16 = torch.cuda.is_bf16_supported()
    dtype = amp_dtype(device, mixed_precision, private, bf16)
    if mixed_precision and dtype is None:
        if device.type != "cuda":
            notes.append("mixed precision asked for: not used on a CPU (full precision)")
        else:
            notes.append(
                "mixed precision asked for: this GPU lacks bfloat16 and float16 needs loss "
                "scaling, which DP-SGD's per-row clipping cannot take (full precision)"
            )
    return Runtime(device, dtype, tuple(notes))
