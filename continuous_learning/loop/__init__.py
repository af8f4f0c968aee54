"""Running the learning loop: the curate -> train -> eval -> gate stages (`pipeline`), one `cl cycle` pass of
everything due (`cycle`), background jobs for the service (`jobs`), crontab / systemd timers (`schedule`) and
`make demo` (`demo`). Stands on every stage below it; only serve and cli stand on it."""
