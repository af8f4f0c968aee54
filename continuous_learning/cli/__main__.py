"""`python -m continuous_learning.cli`."""
from .app import main

main()
