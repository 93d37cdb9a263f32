"""Catalog ingest: validate the whole file, embed, upsert into Chroma, learn behaviour from histories.

Validation and embedding finish before the first write, so bad input leaves the collection as it was.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.behaviour import BehaviourStats
from retrieval.embedder import Embedder
from retrieval.records import read_ads, read_histories
from retrieval.store import AdStore, catalog_hash

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    ads: int
    seconds: float
    ads_per_s: float
    skipped_unchanged: bool
    content_hash: str
    histories: int = 0
    covisit_pairs: int = 0


def ingest_catalog(
    *,
    ads_path: Path,
    store: AdStore,
    embedder: Embedder | Callable[[], Embedder],
    batch_size: int = 1000,
    show_progress: bool = False,
    force: bool = False,
) -> IngestReport:
    t0 = time.perf_counter()
    ads = read_ads(ads_path)  # raises DataFileError(file, line) before anything is written
    h = catalog_hash(ads)
    if not force and store.stored_hash() == h and store.count() == len(ads):
        return IngestReport(len(ads), time.perf_counter() - t0, 0.0, True, h)
    if not isinstance(embedder, Embedder):  # a factory: the model loads only once the file is known good
        embedder = embedder()
    vectors = embedder.encode([a.document() for a in ads], show_progress=show_progress)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ads), desc="upsert", unit="ad")
    # Ads that left the catalog file leave the collection too: the file is the catalog.
    existing = set(store.collection.get(include=[])["ids"]) if store.count() else set()
    stale = list(existing - {a.ad_id for a in ads})
    store.upsert(ads, vectors, batch_size=batch_size, progress=bar.update if bar else None)
    for i in range(0, len(stale), 5000):
        store.collection.delete(ids=stale[i : i + 5000])
    store.set_content_hash(h)
    if bar:
        bar.close()
    secs = time.perf_counter() - t0
    return IngestReport(len(ads), secs, len(ads) / secs if secs > 0 else 0.0, False, h)


def learn_behaviour(
    *,
    history_paths: list[Path],
    catalog_ids: list[str],
    out_dir: Path,
    window: int,
    decay: float,
    cf_dims: int = 64,
) -> BehaviourStats:
    """Co-visitation + popularity from the histories of logged impressions (never their `clicked`)."""
    histories: list[list[str]] = []
    for p in history_paths:
        histories.extend(read_histories(p))
    stats = BehaviourStats.learn(histories, catalog_ids, window=window, decay=decay, cf_dims=cf_dims)
    stats.save(out_dir)
    return stats
