"""Kept for `python -m continuous_learning.pipeline` (cron): the stages live in `continuous_learning.loop.pipeline`."""
import sys

from .loop.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
