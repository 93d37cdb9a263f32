"""Catalog ingest: validate the whole file, then bring the Chroma collection to it with the least work.

- The whole file is validated before the first write, so bad input leaves the collection as it was.
- Incremental: every stored ad carries the hash of its content and of its embedded document
  (retrieval.store). Against them, each ad of the file is added (new id), changed (content differs) or
  unchanged; stored ids missing from the file are removed. Only added ads and changed ads whose document
  changed are embedded; a change of bid, URL or other metadata rewrites the metadata and keeps the vector.
- Resumable: ads are embedded and written batch by batch, each ad with its hashes in the same write, and
  the catalog hash on the collection is set last. Killed at any point, the collection holds whole ads
  only (old or new), and a re-run sees what is already current, writes the rest and finishes the job.
- Pipelined: a background thread embeds the next batches (at most PIPELINE_DEPTH ahead) while the
  calling thread writes the last one to Chroma; both release the GIL in native code, so on two cores
  the writes hide behind the embedding. Batches are written in order; an error on either side stops
  both and is raised by ingest_catalog; batches embedded but not yet written are simply embedded again
  by the re-run.
- Parallel: with more than POOL_MIN_ADS ads to embed, an ONNX embedder is replaced for the run by
  `embed_processes` single-threaded copies in worker processes (retrieval.embed_pool; default: one per
  CPU this process may use); each batch is split between them and comes back in order. A worker's
  error or death stops the ingest like any embed error (the written batches stay; a re-run resumes).
- `enrich` (optional) maps the validated ads before anything is compared or written: the CLI passes
  ad understanding (agent.understanding.ingest_hook), whose records land in each ad's metadata; since
  the catalog and ad hashes cover the metadata, a new record rewrites that ad's metadata only.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kernel.types import Ad
from retrieval.behaviour import BehaviourCounts, BehaviourStats, count_behaviour
from retrieval.embed_pool import ProcessEmbedder
from retrieval.embedder import Embedder, available_cpus
from retrieval.records import iter_histories, read_ads
from retrieval.sequence import SequenceConfig, SequenceModel, train_or_load
from retrieval.store import AdStore, CatalogIndex, ad_content_hash, catalog_hash, document_hash

log = logging.getLogger(__name__)

POOL_MIN_ADS = 2000  # below this, starting worker processes (~1-2 s each: a model load) costs more than it saves
PIPELINE_DEPTH = 2  # embedded batches waiting for their Chroma write: the writer never starves, memory stays bounded
IN_PROGRESS = "ingest-in-progress"  # the collection's content hash while a first ingest writes it
_DONE = object()
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class IngestReport:
    ads: int  # ads in the file (= in the collection afterwards)
    seconds: float
    ads_per_s: float
    skipped_unchanged: bool  # the collection already held exactly this catalog: nothing was read or written
    content_hash: str
    added: int = 0  # ids new to the collection
    changed: int = 0  # stored ids whose content differed (re-embedded only if their document changed)
    unchanged: int = 0
    removed: int = 0  # stored ids no longer in the file, deleted
    embedded: int = 0  # documents sent to the embedder
    histories: int = 0
    covisit_pairs: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped_unchanged:
            return f"catalog unchanged ({self.ads} ads, sha256 {self.content_hash[:12]}): nothing re-embedded"
        return (
            f"ingested {self.ads} ads in {self.seconds:.1f}s: {self.added} added, {self.changed} changed, "
            f"{self.unchanged} unchanged, {self.removed} removed; {self.embedded} embedded"
        )


@dataclass
class IngestPlan:
    """What it takes to make the collection equal to the file."""

    embed: list[Ad]  # added ads and changed ads whose document changed (or all, when forced)
    metadata_only: list[Ad]  # changed ads with the same document: new metadata, stored vector kept
    remove: list[str]
    added: int
    changed: int
    unchanged: int


def plan_ingest(ads: list[Ad], stored: dict[str, tuple[str | None, str | None]], *, force: bool = False) -> IngestPlan:
    embed: list[Ad] = []
    metadata_only: list[Ad] = []
    added = changed = unchanged = 0
    for ad in ads:
        have = stored.get(ad.ad_id)
        if have is None:
            added += 1
            embed.append(ad)
            continue
        content, document = have
        if content == ad_content_hash(ad):
            unchanged += 1
            if force:
                embed.append(ad)
            continue
        changed += 1
        if not force and document is not None and document == document_hash(ad):
            metadata_only.append(ad)
        else:
            embed.append(ad)
    in_file = {a.ad_id for a in ads}
    remove = [i for i in stored if i not in in_file]
    return IngestPlan(embed, metadata_only, remove, added, changed, unchanged)


def ingest_catalog(
    *,
    ads_path: Path,
    store: AdStore,
    embedder: Embedder | Callable[[], Embedder],
    batch_size: int = 1000,
    show_progress: bool = False,
    force: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    enrich: Callable[[list[Ad]], list[Ad]] | None = None,
    embedder_key: str | None = None,
    queue_depth: int = PIPELINE_DEPTH,
    embed_processes: int | None = None,
    pool_min_ads: int = POOL_MIN_ADS,
) -> IngestReport:
    """Make the collection equal to the file at `ads_path`. `force` re-embeds every ad (a new model).
    `enrich` maps the ads read from the file (same ids, same order) before they are compared and written.
    `embedder_key` (retrieval.embedder.embedder_key; default: the embedder's own `key`, when it has one)
    is recorded on the collection; a collection whose recorded key differs (or is missing) is re-embedded whole.

    `on_batch(written, to_embed)` is called after each batch of embedded ads is written (in the calling
    thread). Embedding runs one thread ahead of the Chroma writes, at most `queue_depth` batches ahead.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ads = read_ads(ads_path)  # raises DataFileError(file, line) before anything is written
    timings["parse_s"] = time.perf_counter() - t0
    if enrich is not None:
        t = time.perf_counter()
        ads = enrich(ads)
        timings["enrich_s"] = time.perf_counter() - t
    t = time.perf_counter()
    h = catalog_hash(ads)
    timings["hash_s"] = time.perf_counter() - t
    key = embedder_key or getattr(embedder, "key", None)
    if key is not None and store.stored_embedder() != key and store.count() > 0:
        log.info("re-embedding the catalog", extra={"stored_embedder": store.stored_embedder(), "embedder": key})
        force = True  # one collection, one embedder: vectors of two backends never mix
    if not force and store.stored_hash() == h and store.count() == len(ads):
        secs = time.perf_counter() - t0
        return IngestReport(len(ads), secs, 0.0, True, h, unchanged=len(ads), timings_s=timings)

    t = time.perf_counter()
    plan = plan_ingest(ads, store.stored_hashes(), force=force)
    timings["diff_s"] = time.perf_counter() - t
    log.info(
        "ingest plan",
        extra={"added": plan.added, "changed": plan.changed, "unchanged": plan.unchanged, "removed": len(plan.remove), "embed": len(plan.embed)},
    )

    t = time.perf_counter()
    stage = {"embed_s": 0.0, "upsert_s": 0.0}
    if plan.embed and key is not None and store.count() == 0:
        # A first ingest records its embedder before the first write, so a re-run after a crash keeps what
        # was written (without it, a partial collection with no key was re-embedded whole). A re-embed under
        # a new key records it only at the end: until then the collection mixes two embedders.
        store.set_content_hash(IN_PROGRESS, embedder_key=key)
    if plan.embed:
        if not hasattr(embedder, "encode"):
            embedder = embedder()  # a factory: the model loads only once the file is known good and work is due
        encoder = embedder
        procs = available_cpus() if embed_processes is None else embed_processes
        pool = None
        if procs > 1 and len(plan.embed) >= pool_min_ads and isinstance(embedder, Embedder) and embedder.backend != "torch":
            t_pool = time.perf_counter()
            encoder = pool = ProcessEmbedder(embedder.config, processes=procs)
            timings["pool_start_s"] = time.perf_counter() - t_pool
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan.embed), desc="embed+upsert", unit="ad")

        def embed(chunk: list[Ad]):
            te = time.perf_counter()
            vectors = encoder.encode([a.document() for a in chunk])
            stage["embed_s"] += time.perf_counter() - te
            return vectors

        written = 0
        try:
            for chunk, vectors in pipelined(_batches(plan.embed, batch_size), embed, depth=queue_depth):
                tw = time.perf_counter()
                store.upsert(chunk, vectors, batch_size=batch_size)
                stage["upsert_s"] += time.perf_counter() - tw
                written += len(chunk)
                if bar:
                    bar.update(len(chunk))
                if on_batch:
                    on_batch(written, len(plan.embed))
        finally:
            if pool is not None:
                pool.close()
        if bar:
            bar.close()
    timings.update(stage)  # busy time of each stage; they overlap, so embed + upsert may exceed embed_upsert
    timings["embed_upsert_s"] = time.perf_counter() - t

    t = time.perf_counter()
    store.update_metadata(plan.metadata_only, batch_size=batch_size)
    # Ads that left the catalog file leave the collection too: the file is the catalog.
    store.delete(plan.remove)
    store.set_content_hash(h, embedder_key=key)  # last: "this collection is exactly catalog h, embedded by key"
    timings["finish_s"] = time.perf_counter() - t
    secs = time.perf_counter() - t0
    return IngestReport(
        len(ads),
        secs,
        len(ads) / secs if secs > 0 else 0.0,
        False,
        h,
        added=plan.added,
        changed=plan.changed,
        unchanged=plan.unchanged,
        removed=len(plan.remove),
        embedded=len(plan.embed),
        timings_s=timings,
    )


def pipelined(items: Iterable[T], produce: Callable[[T], R], *, depth: int = PIPELINE_DEPTH) -> Iterator[tuple[T, R]]:
    """(item, produce(item)) for each item in order, produce running in a background thread at most
    `depth` results ahead of the consumer (a bounded queue: memory stays bounded however slow the
    consumer). An exception in produce is raised here, at its item's turn; when the consumer stops
    (an exception in its loop, a break, a closed generator), the producer stops after its current item
    and the thread is joined before this generator returns, so nothing runs on behind the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put((item, produce(item), None)):
                    return
        except BaseException as e:  # handed to the consumer, raised at this item's turn
            put((None, None, e))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="ingest-embed", daemon=True)
    thread.start()
    try:
        while True:
            entry = q.get()
            if entry is _DONE:
                return
            item, result, error = entry
            if error is not None:
                raise error
            yield item, result
    finally:
        stop.set()
        thread.join()


def _batches(items: list[Ad], size: int) -> Iterator[list[Ad]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def learn_behaviour(
    *,
    history_paths: list[Path],
    catalog_ids: list[str],
    out_dir: Path,
    window: int,
    decay: float,
    cf_dims: int = 64,
    count: Callable[..., BehaviourCounts] | None = None,
) -> BehaviourStats:
    """Co-visitation + popularity from the histories of logged impressions (never their `clicked`),
    streamed file by file; the tables are written atomically (BehaviourStats.save). `count` counts the
    histories: None, count_behaviour in this process; with --ray, eval.distributed.behaviour.RayBehaviourCounter
    (the same counts, on actors)."""

    def histories() -> Iterator[list[str]]:
        for p in history_paths:
            yield from iter_histories(p)

    counts = (count or count_behaviour)(histories(), catalog_ids, window=window, decay=decay)
    stats = BehaviourStats.from_counts(counts, catalog_ids, window=window, decay=decay, cf_dims=cf_dims)
    stats.save(out_dir)
    return stats


SEQUENCE_DIR = "sequence"  # the sequence model's folder inside the behaviour dir


def learn_sequence(
    *,
    history_paths: list[Path],
    index: CatalogIndex,
    behaviour_dir: Path,
    config: SequenceConfig,
    show_progress: bool | None = None,
    threads: int | None = None,
) -> SequenceModel:
    """The next-item sequence model from the same histories as the behaviour tables (never `clicked`),
    saved in `behaviour_dir/sequence`; reused when histories, catalog rows, config and vectors are unchanged."""
    histories = [h for p in history_paths for h in iter_histories(p)]
    # The vectors are named by the documents they embed: Chroma's read-back floats vary in the last bits.
    docs = hashlib.sha256("\n".join(f"{a}\t{document_hash(ad)}" for a, ad in zip(index.ids, index.ads)).encode()).hexdigest()
    return train_or_load(
        histories=histories,
        ids=index.ids,
        directory=Path(behaviour_dir) / SEQUENCE_DIR,
        config=config,
        text_vectors=index.vectors if config.text_init else None,
        show_progress=show_progress,
        threads=threads,
        vectors_key=f"documents:{docs}",
    )
