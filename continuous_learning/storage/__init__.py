"""Files on disk: JSONL (locked append, the ONE tolerant streaming reader that joins late feedback onto its
turn, atomic rewrite), file and workspace locks, encryption at rest and the workspace keys. Stands on core only."""
