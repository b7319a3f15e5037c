"""The aggregator: rounds, strategies, update checks, checkpoints, /status."""
