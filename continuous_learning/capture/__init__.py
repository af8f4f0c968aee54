"""Everything that turns a turn into a stored record, and takes it back out: the recorder (`ingest`, the ONE way
a turn is recorded: sanitize -> record -> append -> knowledge), privacy (secrets first, then Presidio, names, PII
rules, field checks), the knowledge facts, and the data-subject rights (`gdpr`: forget, retention, export, with
`rewrite` recounting what is derived from the log). Stands on core, storage, registry and monitor's A/B state."""
