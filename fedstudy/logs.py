"""Structured logs: one JSON object per line on stderr, one event per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(component: str, level: str = "info") -> logging.Logger:
    """The component's logger, writing JSON lines to stderr."""
    logger = logging.getLogger(component)
    logger.setLevel(level.upper())
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        logger.addHandler(handler)
    return logger


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Logs one event with key=value fields."""
    logger.log(level, name, extra={"fields": fields})


def now() -> float:
    return time.time()
