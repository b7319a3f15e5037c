"""Fixtures of the operator tests: the emulator with its gaps filled, a kubeconfig for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedop_support import FedEmulator, write_kubeconfig


@pytest.fixture
def kubeconfig(kmock: FedEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG pointing at the test's emulator (set before any client reads it)."""
    path = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path
