"""Kept for `python -m continuous_learning.demo` (`make demo`): the demo lives in `continuous_learning.loop.demo`."""
from .loop.demo import main

if __name__ == "__main__":
    main()
