"""Catalog ingest into real embedded Chroma with the real MiniLM embedder: idempotent, upsert by ad_id,
the file is the catalog, and bad input changes nothing."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kernel.errors import DataFileError
from selection.services import make_store
from kernel.settings import Settings
from retrieval.ingest import ingest_catalog
from retrieval.store import AdStore

CATALOG = [
    {"ad_id": "run-1", "title": "CloudRunner road shoe", "text": "Soft landing, fast toe-off.", "category": "running shoes"},
    {"ad_id": "run-2", "title": "Trail Grip shoe", "text": "Lugs for mud and rock.", "category": "running shoes"},
    {"ad_id": "cof-1", "title": "Single-origin espresso beans", "text": "Roasted weekly.", "category": "coffee"},
    {"ad_id": "pet-1", "title": "Grain-free dog food", "text": "Salmon and sweet potato.", "category": "pets"},
    {"ad_id": "lap-1", "title": "Ultralight 14-inch laptop", "text": "18 hours of battery.", "category": "laptops"},
]


def write_catalog(path: Path, rows: list[dict], *, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(l + "\n" for l in extra_lines))
    return path


def snapshot(store: AdStore) -> tuple[int, str | None, str]:
    """(count, stored catalog hash, sha256 over every id, document, metadata and embedding in the collection)."""
    got = store.collection.get(include=["documents", "metadatas", "embeddings"])
    h = hashlib.sha256()
    for i in np.argsort(got["ids"]):
        h.update(got["ids"][i].encode())
        h.update(got["documents"][i].encode())
        h.update(json.dumps(got["metadatas"][i], sort_keys=True).encode())
        h.update(np.asarray(got["embeddings"][i], dtype=np.float32).tobytes())
    return store.count(), store.stored_hash(), h.hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> AdStore:
    return make_store(Settings(_env_file=None, data_dir=tmp_path / "var"))


def test_second_ingest_of_the_same_file_is_skipped(tmp_path: Path, store: AdStore, embedder):
    path = write_catalog(tmp_path / "ads.jsonl", CATALOG)
    first = ingest_catalog(ads_path=path, store=store, embedder=embedder)
    assert not first.skipped_unchanged and first.ads == len(CATALOG)
    before = snapshot(store)
    assert before[0] == len(CATALOG) and before[1] == first.content_hash

    second = ingest_catalog(ads_path=path, store=store, embedder=embedder)
    assert second.skipped_unchanged and second.content_hash == first.content_hash
    assert snapshot(store) == before

    forced = ingest_catalog(ads_path=path, store=store, embedder=embedder, force=True)
    assert not forced.skipped_unchanged
    assert snapshot(store)[:2] == before[:2]


def test_changed_file_upserts_by_ad_id_and_removed_ads_leave(tmp_path: Path, store: AdStore, embedder):
    ingest_catalog(ads_path=write_catalog(tmp_path / "v1.jsonl", CATALOG), store=store, embedder=embedder)
    old = store.load_index()

    changed = [dict(r) for r in CATALOG if r["ad_id"] != "pet-1"]  # pet-1 leaves
    changed[0] = {**changed[0], "title": "Cozy wool hiking socks", "text": "Warm feet on long walks.", "bid": 2.5}
    changed.append({"ad_id": "book-1", "title": "A field guide to birds", "category": "books"})
    rep = ingest_catalog(ads_path=write_catalog(tmp_path / "v2.jsonl", changed), store=store, embedder=embedder)

    assert not rep.skipped_unchanged
    new = store.load_index()
    assert sorted(new.ids) == sorted(r["ad_id"] for r in changed)
    assert store.count() == len(changed)
    edited = new.ads[new.row["run-1"]]
    assert (edited.title, edited.bid) == ("Cozy wool hiking socks", 2.5)
    # The edited ad was re-embedded; the untouched ones kept their vectors.
    assert float(new.vectors[new.row["run-1"]] @ old.vectors[old.row["run-1"]]) < 0.9
    assert np.allclose(new.vectors[new.row["cof-1"]], old.vectors[old.row["cof-1"]], atol=1e-5)
    assert new.content_hash == rep.content_hash != old.content_hash


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"ad_id": "new-9", "title": "cut off',
        json.dumps({"ad_id": "new-9", "title": "Bid is text", "bid": "lots"}),
        json.dumps({"ad_id": "run-1", "title": "Duplicate of line 1"}),
    ],
)
def test_bad_input_leaves_the_collection_exactly_as_it_was(tmp_path: Path, store: AdStore, embedder, bad_line: str):
    ingest_catalog(ads_path=write_catalog(tmp_path / "v1.jsonl", CATALOG), store=store, embedder=embedder)
    before = snapshot(store)
    # Valid new and edited ads come first: none of them may be written when a later line is bad.
    rows = [{**CATALOG[0], "title": "Edited before the bad line"}, {"ad_id": "new-1", "title": "New valid ad"}]
    bad = write_catalog(tmp_path / "v2.jsonl", rows, extra_lines=(bad_line,))
    with pytest.raises(DataFileError) as info:
        ingest_catalog(ads_path=bad, store=store, embedder=embedder, force=True)
    assert info.value.line == 3
    assert snapshot(store) == before
