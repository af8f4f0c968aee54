"""Talking to the model: the runtime (`models`: resolve the base, load it with the champion adapter, generate
with streaming and repetition control, hot-reload after a promotion or rollback) and the terminal REPL (`repl`)
that records every turn through capture. Stands on core, storage, registry, monitor (A/B arm) and capture."""
