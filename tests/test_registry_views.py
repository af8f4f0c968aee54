"""Typed views over the registry document and the one file digest."""
import hashlib

import pytest

from continuous_learning import registry
from continuous_learning.core.errors import RegistryError


def _doc() -> dict:
    doc = registry.empty_registry()
    doc = registry.add_snapshot(doc, {"id": "curated_20260101_000000", "file": "data/curated/a.jsonl",
                                      "sha256": "ab" * 32})
    for version, status in (("1.0.0", "archived"), ("1.1.0", "champion"), ("1.2.0", "tainted")):
        doc = registry.register_adapter(doc, {"version": version, "path": f"adapters/{version}", "status": status,
                                              "snapshot": {"id": "curated_20260101_000000"}})
    doc["champion"] = "1.1.0"
    return doc


def test_views_read_the_document_without_changing_it():
    doc = _doc()
    before = repr(doc)
    views = registry.adapters(doc)
    assert [(a.version, a.can_serve) for a in views] == [("1.0.0", True), ("1.1.0", True), ("1.2.0", False)]
    assert registry.champion(doc).version == "1.1.0" and registry.champion(doc).snapshot_id == "curated_20260101_000000"
    assert registry.adapter_view(doc, "9.9.9") is None
    assert [s.id for s in registry.snapshots(doc)] == ["curated_20260101_000000"]
    assert repr(doc) == before


def test_no_champion_means_the_base_answers():
    assert registry.champion(registry.empty_registry()) is None


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert registry.file_sha256(path, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_views_order_by_version_and_say_who_may_serve():
    doc = _doc()
    doc = registry.register_adapter(doc, {"version": "1.10.0", "path": "adapters/1.10.0", "status": "candidate"})
    assert [a.version for a in registry.adapters_by_version(doc)] == ["1.0.0", "1.1.0", "1.2.0", "1.10.0"]
    assert [a.version for a in registry.serving_adapters(doc)] == ["1.0.0", "1.1.0", "1.10.0"]
    assert registry.adapter_status(doc, "1.2.0") == "tainted"
    assert registry.adapter_status(doc, "9.9.9") is None and registry.adapter_status(doc, None) is None
    assert registry.adapter_view(doc, None) is None


def test_adapter_view_carries_what_consumers_read():
    doc = registry.register_adapter(registry.empty_registry(), {
        "version": "1.0.0", "path": "adapters/1.0.0", "status": "candidate", "note": "first",
        "metrics": {"final_loss": 0.5}, "base_model": {"name": "tiny", "sha256": "cd" * 32},
        "warm_start": {"from": None}, "user_hashes": ["alice"], "evals": [{"accuracy": 0.1}, {"accuracy": 0.2}]})
    view = registry.registered_adapter(doc, "1.0.0")
    assert view.metrics == {"final_loss": 0.5} and view.base_model["name"] == "tiny" and view.note == "first"
    assert view.latest_eval == {"accuracy": 0.2} and view.user_hashes == ("alice",) and view.warm_start_from is None
    assert view.record["created_at"] == doc["adapters"]["1.0.0"]["created_at"]
    with pytest.raises(RegistryError, match="no adapter version '2.0.0'"):
        registry.registered_adapter(doc, "2.0.0")


def test_taint_and_retire_move_the_champion_to_a_sound_ancestor():
    doc = _doc()
    doc["adapters"]["1.2.0"]["status"] = "candidate"
    doc["champion"] = None
    doc = registry.promote(doc, "1.0.0", "first")
    doc = registry.promote(doc, "1.2.0", "second")
    doc["adapters"]["1.2.0"]["user_hashes"] = ["alice", "bob"]
    assert registry.taint_adapters(doc, "alice", set()) == ["1.2.0"]
    assert doc["adapters"]["1.2.0"]["user_hashes"] == ["bob"]
    move = registry.retire_tainted_champion(doc)
    assert move is not None and (move["from"], move["to"]) == ("1.2.0", "1.0.0")
    assert doc["champion"] == "1.0.0" and registry.champion(doc).status == "champion"
    assert registry.retire_tainted_champion(doc) is None
