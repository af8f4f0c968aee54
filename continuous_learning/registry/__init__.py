"""The registry: `adapters/registry.json`, the only shared mutable state (snapshots, adapter versions, the
champion pointer and its history), with its schema checks and ordered migrations (`document`), typed read-only
views (`views`), the one file digest (`integrity`), the pure champion transitions (`transitions`: promote, roll
back, record an eval, taint after a forget) and their application under the lock after the adapter's files are
checked (`champion`). Stands on core and storage. The statistical promotion gate lives in
`continuous_learning.evaluate.gate`."""
from .champion import promote_version, record_eval_result, rollback_champion, verify_adapter_files
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
from .transitions import (
                       BASE,
                       UNUSABLE,
                       adapter,
                       champion_lineage,
                       label,
                       latest_eval,
                       move_champion,
                       newest_candidate,
                       promote,
                       record_eval,
                       registered_adapter,
                       retire_tainted_champion,
                       rollback,
                       rollback_target,
                       sorted_versions,
                       taint_adapters,
)
from .views import (
                       Adapter,
                       Snapshot,
                       adapter_status,
                       adapter_view,
                       adapters,
                       adapters_by_version,
                       champion,
                       serving_adapters,
                       snapshots,
                       version_key,
)

__all__ = ["ADAPTER_MARKERS", "ADAPTER_STATUSES", "FIX", "MIGRATIONS", "REGISTRY_SCHEMA_VERSION", "SNAPSHOT_FILE",
           "VERSION_DIR", "add_snapshot", "champion_entry", "confined", "empty_registry", "find_snapshot",
           "latest_snapshot", "load", "locked", "log_event", "migrate", "next_version", "refuse_if_lost",
           "register_adapter", "unregistered_evidence", "update", "validate",
           "Adapter", "Snapshot", "adapter_status", "adapter_view", "adapters", "adapters_by_version", "champion",
           "file_sha256", "serving_adapters", "snapshots", "version_key",
           "BASE", "UNUSABLE", "adapter", "champion_lineage", "label", "latest_eval", "move_champion",
           "newest_candidate", "promote", "record_eval", "registered_adapter",
           "retire_tainted_champion", "rollback", "rollback_target",
           "sorted_versions", "taint_adapters",
           "promote_version", "record_eval_result", "rollback_champion", "verify_adapter_files"]
