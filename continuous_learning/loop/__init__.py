"""Running the learning loop: `workflow.run_loop(settings, options, events)` is the one curate -> train -> eval ->
gate path (with `LoopOptions`, the one declaration of its options, and `Events`, the one progress protocol);
`pipeline` is its command line, `cycle` one `cl cycle` pass of everything due, `jobs` background jobs for the
service, `schedule` crontab / systemd timers and `demo` `make demo`. Stands on every stage below it; only serve
and cli stand on it."""
