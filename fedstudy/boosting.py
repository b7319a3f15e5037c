"""What the aggregator and the site trainers of an XGBoost study agree on: where the
aggregator's XGBoost federated tracker listens (docs/ehr.md)."""

from __future__ import annotations

# The tracker's port beside the aggregator's gRPC port (7700).
DEFAULT_TRACKER_PORT = 7701


def default_tracker_address(aggregator: str) -> str:
    """The tracker's address on the aggregator's host: ``HOST:7701`` for ``HOST:PORT``."""
    host, sep, port = aggregator.rpartition(":")
    if not sep or not port.isdigit():
        host = aggregator
    return f"{host}:{DEFAULT_TRACKER_PORT}"
