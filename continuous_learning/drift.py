"""Kept for `continuous_learning.drift.check_drift`: drift lives in `continuous_learning.monitor.drift`."""
from .monitor.drift import check_drift

__all__ = ["check_drift"]
