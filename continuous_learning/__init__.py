"""cl: local-first continuous learning for chat models."""

__version__ = "0.1.0"
