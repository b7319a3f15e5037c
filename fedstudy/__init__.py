"""fedstudy: federated learning studies across hospitals."""

__version__ = "0.1.0"
