"""``fedstudy operator``: run the operator, or print the CRD (``fedstudy operator crd``)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    raise SystemExit("fedstudy operator: not built yet")
