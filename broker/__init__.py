"""A secrets broker for AI workloads."""

__version__ = "0.1.0"
