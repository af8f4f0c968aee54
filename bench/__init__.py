"""Benchmarks: each `bench_<name>.py` runs the project's path and a named baseline on the same input in the same
run and reports their ratio. `python -m bench` runs them all and rewrites RESULTS.md and results.json."""
