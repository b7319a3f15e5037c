"""Fixtures of the chart tests. The operator tests' emulator (tests/operator/fedop_support.py)
is reused for the apply test, so its folder joins the import path here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from fedop_support import FedEmulator, write_kubeconfig


@pytest.fixture
def kubeconfig(kmock: FedEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG pointing at the test's emulator."""
    path = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path
