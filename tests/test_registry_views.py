"""Typed views over the registry document and the one file digest."""
import hashlib

from continuous_learning import registry


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
