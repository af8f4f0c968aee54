"""The registry: `adapters/registry.json`, the only shared mutable state (snapshots, adapter versions, the
champion pointer and its history), with its schema checks and ordered migrations (`document`), typed read-only
views (`views`) and the one file digest (`integrity`). Stands on core and storage. Promotion and rollback rules live in
`continuous_learning.decisions` for now."""
from .document import (
                       ADAPTER_MARKERS,
                       ADAPTER_STATUSES,
                       FIX,
                       MIGRATIONS,
                       REGISTRY_SCHEMA_VERSION,
                       SNAPSHOT_FILE,
                       VERSION_DIR,
                       add_snapshot,
                       champion_entry,
                       confined,
                       empty_registry,
                       find_snapshot,
                       latest_snapshot,
                       load,
                       locked,
                       log_event,
                       migrate,
                       next_version,
                       refuse_if_lost,
                       register_adapter,
                       unregistered_evidence,
                       update,
                       validate,
)
from .integrity import file_sha256
from .views import Adapter, Snapshot, adapter_view, adapters, champion, snapshots

__all__ = ["ADAPTER_MARKERS", "ADAPTER_STATUSES", "FIX", "MIGRATIONS", "REGISTRY_SCHEMA_VERSION", "SNAPSHOT_FILE",
           "VERSION_DIR", "add_snapshot", "champion_entry", "confined", "empty_registry", "find_snapshot",
           "latest_snapshot", "load", "locked", "log_event", "migrate", "next_version", "refuse_if_lost",
           "register_adapter", "unregistered_evidence", "update", "validate",
           "Adapter", "Snapshot", "adapter_view", "adapters", "champion", "file_sha256", "snapshots"]
