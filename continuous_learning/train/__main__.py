"""`python -m continuous_learning.train`, `torchrun -m continuous_learning.train`, `accelerate launch -m ...`."""
from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
