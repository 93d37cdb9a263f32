"""Incremental, resumable ingest of the demo catalog (300 ads) into real embedded Chroma with the real MiniLM:
only what changed is embedded, removed ads leave, and a SIGKILL mid-ingest is finished by a re-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kernel.settings import REPO_ROOT, Settings
from retrieval.ingest import ingest_catalog
from retrieval.records import read_ads
from retrieval.store import CONTENT_KEY, AdStore, ad_content_hash, catalog_hash
from selection.services import make_store

DEMO_ADS = REPO_ROOT / "data" / "demo" / "ads.jsonl"


class CountingEmbedder:
    """The real embedder, counting the documents ingest asks it to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.texts = 0

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.encode(texts, show_progress=show_progress)


class ReusingEmbedder:
    """The real embedder, remembering its vectors by document: the demo ads, embedded once for the session
    (tests/conftest.py), are not embedded again for every test's first ingest."""

    def __init__(self, inner, known: dict[str, np.ndarray]):
        self.inner, self.known = inner, dict(known)

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.known]
        if missing:
            self.known.update(zip(missing, self.inner.encode(missing)))
        return np.stack([self.known[t] for t in texts]).astype(np.float32)


@pytest.fixture(scope="module")
def demo_vectors(demo_settings: Settings) -> dict[str, np.ndarray]:
    index = make_store(demo_settings).load_index()
    return {ad.document(): index.vectors[i] for i, ad in enumerate(index.ads)}


@pytest.fixture
def embedder_counted(embedder, demo_vectors) -> CountingEmbedder:
    return CountingEmbedder(ReusingEmbedder(embedder, demo_vectors))


def demo_rows() -> list[dict]:
    return [json.loads(line) for line in DEMO_ADS.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def collection_state(store: AdStore) -> dict[str, tuple[str, np.ndarray]]:
    got = store.collection.get(include=["metadatas", "embeddings"])
    return {i: (m[CONTENT_KEY], np.asarray(e, dtype=np.float32)) for i, m, e in zip(got["ids"], got["metadatas"], got["embeddings"])}


def assert_collection_equals_file(store: AdStore, path: Path) -> None:
    """Count, ids and the content hash of every ad as the file has them, and the catalog hash set."""
    ads = read_ads(path)
    state = collection_state(store)
    assert store.count() == len(ads) == len(state)
    assert {i: h for i, (h, _) in state.items()} == {a.ad_id: ad_content_hash(a) for a in ads}
    assert store.stored_hash() == catalog_hash(ads)
    index = store.load_index()
    assert all(index.ads[index.row[a.ad_id]] == a for a in ads)


def test_reingest_embeds_only_the_ads_whose_content_changed(tmp_path: Path, embedder_counted: CountingEmbedder):
    store = make_store(Settings(_env_file=None, data_dir=tmp_path / "var"))
    rows = demo_rows()
    v1 = write(tmp_path / "v1.jsonl", rows)
    first = ingest_catalog(ads_path=v1, store=store, embedder=embedder_counted)
    assert (first.added, first.changed, first.unchanged, first.removed, first.embedded) == (300, 0, 0, 0, 300)
    assert embedder_counted.texts == 300
    before = collection_state(store)

    again = ingest_catalog(ads_path=v1, store=store, embedder=embedder_counted)
    assert again.skipped_unchanged and again.embedded == 0 and embedder_counted.texts == 300

    # 1% of the ads get new text: exactly those three are embedded, the other 297 keep their stored vectors.
    edited = {rows[i]["ad_id"] for i in (7, 150, 299)}
    v2_rows = [{**r, "text": r["text"] + " Now in a new colour."} if r["ad_id"] in edited else r for r in rows]
    rep = ingest_catalog(ads_path=write(tmp_path / "v2.jsonl", v2_rows), store=store, embedder=embedder_counted)
    assert (rep.added, rep.changed, rep.unchanged, rep.removed, rep.embedded) == (0, 3, 297, 0, 3)
    assert embedder_counted.texts == 303
    after = collection_state(store)
    for ad_id, (h, vec) in after.items():
        if ad_id in edited:
            assert h != before[ad_id][0] and not np.array_equal(vec, before[ad_id][1])
        else:
            assert h == before[ad_id][0] and np.array_equal(vec, before[ad_id][1])
    assert_collection_equals_file(store, tmp_path / "v2.jsonl")

    # Unchanged ads through the full comparison (the catalog hash says nothing): still nothing embedded.
    store.set_content_hash("unknown")
    rep = ingest_catalog(ads_path=tmp_path / "v2.jsonl", store=store, embedder=embedder_counted)
    assert not rep.skipped_unchanged and (rep.unchanged, rep.embedded) == (300, 0) and embedder_counted.texts == 303
    assert_collection_equals_file(store, tmp_path / "v2.jsonl")


def test_removed_ads_leave_added_ones_are_embedded_and_a_bid_change_keeps_the_vector(
    tmp_path: Path, embedder_counted: CountingEmbedder
):
    store = make_store(Settings(_env_file=None, data_dir=tmp_path / "var"))
    rows = demo_rows()
    ingest_catalog(ads_path=write(tmp_path / "v1.jsonl", rows), store=store, embedder=embedder_counted)
    before = collection_state(store)
    embedded = embedder_counted.texts

    gone = {rows[i]["ad_id"] for i in (0, 1, 200)}
    rebid = {rows[10]["ad_id"]: 2.5, rows[11]["ad_id"]: 3.25}
    v2 = [{**r, "bid": rebid[r["ad_id"]]} if r["ad_id"] in rebid else r for r in rows if r["ad_id"] not in gone]
    v2 += [{"ad_id": "new-1", "title": "A field guide to birds", "category": "books"},
           {"ad_id": "new-2", "title": "Ceramic pour-over kettle", "category": "coffee"}]  # fmt: skip
    path = write(tmp_path / "v2.jsonl", v2)
    rep = ingest_catalog(ads_path=path, store=store, embedder=embedder_counted)

    assert (rep.added, rep.changed, rep.unchanged, rep.removed, rep.embedded) == (2, 2, 295, 3, 2)
    assert embedder_counted.texts - embedded == 2  # the bid changes reused their stored vectors
    after = collection_state(store)
    assert not gone & after.keys()
    for ad_id in rebid:
        assert after[ad_id][0] != before[ad_id][0] and np.array_equal(after[ad_id][1], before[ad_id][1])
    index = store.load_index()
    assert {i: index.ads[index.row[i]].bid for i in rebid} == rebid
    assert_collection_equals_file(store, path)


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from kernel.settings import Settings
    from retrieval.ingest import ingest_catalog
    from selection.services import make_embedder, make_store

    s = Settings(_env_file=None, data_dir={data_dir!r})
    rep = ingest_catalog(
        ads_path={ads!r}, store=make_store(s), embedder=lambda: make_embedder(s), batch_size={batch},
        on_batch=lambda done, total: print("written", done, total, flush=True),
    )
    print("done", rep.embedded, flush=True)
    """
)


def _ingest_until_killed(data_dir: Path, ads: Path, *, after_batches: int, batch: int) -> int:
    """Run ingest in a real process and SIGKILL it once `after_batches` batches are written (it is then
    inside the next batch's embedding or write). Returns the ads it had reported written."""
    code = CHILD.format(root=str(REPO_ROOT), data_dir=str(data_dir), ads=str(ads), batch=batch)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = 0
    try:
        assert proc.stdout is not None
        for _ in range(after_batches):
            line = proc.stdout.readline()
            assert line.startswith("written"), line + proc.stderr.read()[-3000:]
            written = int(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return written


def test_sigkill_mid_ingest_then_a_rerun_leaves_the_collection_equal_to_the_file(tmp_path: Path, embedder):
    data_dir = tmp_path / "var"
    ads = DEMO_ADS
    written = _ingest_until_killed(data_dir, ads, after_batches=3, batch=25)  # 300 ads: killed with 225 to go
    assert written == 75
    _ingest_until_killed(data_dir, ads, after_batches=2, batch=25)  # the re-run resumes; killed again

    store = make_store(Settings(_env_file=None, data_dir=data_dir))
    partial = store.stored_hashes()
    catalog = read_ads(ads)
    current = {a.ad_id for a in catalog if partial.get(a.ad_id, (None,))[0] == ad_content_hash(a)}
    assert 125 <= len(current) < 300  # both killed runs' written batches were kept, whole
    assert store.stored_hash() != catalog_hash(catalog)  # never marked complete

    counted = CountingEmbedder(embedder)
    rep = ingest_catalog(ads_path=ads, store=store, embedder=counted)
    assert not rep.skipped_unchanged
    assert (rep.unchanged, rep.added + rep.changed) == (len(current), 300 - len(current))
    assert rep.embedded == counted.texts == 300 - len(current)  # only what the killed runs had not written
    assert_collection_equals_file(store, ads)
    # Every stored vector is the one a clean ingest computes, and the HNSW index answers for the ads.
    state = collection_state(store)
    docs = {a.ad_id: a.document() for a in catalog}
    ids = sorted(state)
    fresh = embedder.encode([docs[i] for i in ids])
    np.testing.assert_allclose(np.stack([state[i][1] for i in ids]), fresh, atol=1e-4)
    for i in ids[::15]:
        assert store.nearest(state[i][1], 1)[0][0] == i

    again = ingest_catalog(ads_path=ads, store=store, embedder=counted)
    assert again.skipped_unchanged and counted.texts == rep.embedded
