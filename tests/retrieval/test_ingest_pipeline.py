"""The pipelined ingest (retrieval.ingest.pipelined): the next batch is embedded while the last one is written,
nothing is lost or reordered, the producer stays a bounded number of batches ahead, and an error on either side
(the Chroma writer, the embedder) is raised by ingest_catalog with the collection left resumable. Real embedded
Chroma and the real MiniLM; a Fake only for the faults (a store that fails or waits, an embedder that fails)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kernel.settings import REPO_ROOT, Settings
from retrieval.ingest import PIPELINE_DEPTH, ingest_catalog, pipelined
from retrieval.records import read_ads
from retrieval.store import AdStore, ad_content_hash, catalog_hash
from selection.services import make_store

DEMO_ADS = REPO_ROOT / "data" / "demo" / "ads.jsonl"
N_ADS, BATCH = 60, 7  # 9 batches, the last one short
HANDOFF_WAIT_S = 60.0  # a bound on waiting for the other thread (a failure, never a figure)


class FakeStoreFault(RuntimeError):
    """The fault FakeFailingStore raises (its own type: the test checks which error came out)."""


class FakeEmbedFault(RuntimeError):
    pass


class FakeFailingStore:
    """The real store, except that the `fail_on`-th upsert raises before writing anything."""

    def __init__(self, inner: AdStore, *, fail_on: int):
        self.inner, self.fail_on, self.upserts = inner, fail_on, 0

    def upsert(self, ads, vectors, **kw) -> None:
        self.upserts += 1
        if self.upserts == self.fail_on:
            raise FakeStoreFault(f"upsert {self.upserts}")
        self.inner.upsert(ads, vectors, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakeWaitingStore(FakeFailingStore):
    """The real store whose first upsert waits until the embedder has been asked for the second batch:
    it returns only if embedding runs while a write is in progress (else it gives up after HANDOFF_WAIT_S)."""

    def __init__(self, inner: AdStore, second_batch_asked: threading.Event):
        super().__init__(inner, fail_on=0)
        self.second_batch_asked = second_batch_asked
        self.overlapped: bool | None = None

    def upsert(self, ads, vectors, **kw) -> None:
        if self.overlapped is None:
            self.overlapped = self.second_batch_asked.wait(timeout=HANDOFF_WAIT_S)
        super().upsert(ads, vectors, **kw)


class RecordingEmbedder:
    """The real embedder, recording each batch it is asked for; `fail_on`: that call raises FakeEmbedFault."""

    def __init__(self, inner, *, fail_on: int = 0):
        self.inner, self.fail_on = inner, fail_on
        self.calls: list[list[str]] = []
        self.second_batch_asked = threading.Event()

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 2:
            self.second_batch_asked.set()
        if len(self.calls) == self.fail_on:
            raise FakeEmbedFault(f"encode {len(self.calls)}")
        return self.inner.encode(texts)


@pytest.fixture
def ads_path(tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in DEMO_ADS.read_text(encoding="utf-8").splitlines() if line.strip()][:N_ADS]
    path = tmp_path / "ads.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path: Path) -> AdStore:
    return make_store(Settings(_env_file=None, data_dir=tmp_path / "var"))


def stored(store: AdStore) -> dict[str, tuple[str, np.ndarray]]:
    got = store.collection.get(include=["metadatas", "embeddings"])
    return {i: (m["content_sha256"], np.asarray(e, dtype=np.float32)) for i, m, e in zip(got["ids"], got["metadatas"], got["embeddings"])}


def no_embed_thread_left() -> bool:
    return not any(t.name == "ingest-embed" and t.is_alive() for t in threading.enumerate())


def test_pipelined_yields_every_item_in_order_and_stays_a_bounded_number_ahead():
    produced: list[int] = []
    got = []
    for item, result in pipelined(range(50), lambda i: produced.append(i) or i * i, depth=PIPELINE_DEPTH):
        # consumed len(got) + 1 so far; at most PIPELINE_DEPTH waiting in the queue and one more finished, waiting to be put
        assert len(produced) <= len(got) + 1 + PIPELINE_DEPTH + 1
        got.append((item, result))
    assert got == [(i, i * i) for i in range(50)]
    assert no_embed_thread_left()


def test_pipelined_stops_the_producer_when_the_consumer_stops():
    produced: list[int] = []
    for item, _ in pipelined(range(1000), produced.append, depth=1):
        if item == 3:
            break
    assert no_embed_thread_left()  # joined before the generator closed
    assert len(produced) <= 3 + 1 + 1 + 1


def test_ingest_embeds_the_next_batch_while_a_write_is_in_progress_and_loses_nothing(ads_path: Path, store: AdStore, embedder):
    emb = RecordingEmbedder(embedder)
    waiting = FakeWaitingStore(store, emb.second_batch_asked)
    rep = ingest_catalog(ads_path=ads_path, store=waiting, embedder=emb, batch_size=BATCH)
    assert waiting.overlapped is True  # batch 2 was being embedded while batch 1 was written
    ads = read_ads(ads_path)
    assert rep.embedded == N_ADS and [t for c in emb.calls for t in c] == [a.document() for a in ads]
    state = stored(store)
    assert {i: h for i, (h, _) in state.items()} == {a.ad_id: ad_content_hash(a) for a in ads}
    assert store.stored_hash() == catalog_hash(ads)
    # every ad got its own vector (a batch written under another batch's ads would break this)
    ids = [a.ad_id for a in ads]
    np.testing.assert_allclose(np.stack([state[i][1] for i in ids]), embedder.encode([a.document() for a in ads]), atol=1e-4)


def test_a_writer_error_is_raised_and_a_rerun_writes_only_what_is_missing(ads_path: Path, store: AdStore, embedder):
    failing = FakeFailingStore(store, fail_on=3)
    with pytest.raises(FakeStoreFault):
        ingest_catalog(ads_path=ads_path, store=failing, embedder=RecordingEmbedder(embedder), batch_size=BATCH)
    assert no_embed_thread_left()
    ads = read_ads(ads_path)
    assert store.count() == 2 * BATCH  # the two batches written before the fault, whole
    assert store.stored_hash() != catalog_hash(ads)  # never marked complete

    again = RecordingEmbedder(embedder)
    rep = ingest_catalog(ads_path=ads_path, store=store, embedder=again, batch_size=BATCH)
    assert (rep.unchanged, rep.embedded) == (2 * BATCH, N_ADS - 2 * BATCH)
    assert sum(len(c) for c in again.calls) == N_ADS - 2 * BATCH
    assert store.count() == N_ADS and store.stored_hash() == catalog_hash(ads)


def test_an_embedder_error_is_raised_after_the_batches_before_it_are_written(ads_path: Path, store: AdStore, embedder):
    with pytest.raises(FakeEmbedFault):
        ingest_catalog(ads_path=ads_path, store=store, embedder=RecordingEmbedder(embedder, fail_on=3), batch_size=BATCH)
    assert no_embed_thread_left()
    assert store.count() == 2 * BATCH
    assert store.stored_hash() is None
