"""Catalog ingest throughput in ads/s, each phase on its own: parse + validate, embedding, Chroma upsert.

    python bench/bench_ingest.py [--ads PATH] [--limit N]

Default catalog: the 16,859-ad Games catalog (../shared/data/amazon_games_6k/ads.jsonl), upserted into a
fresh embedded Chroma under a temporary directory (deleted at the end).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import CATALOGS, Settings

from selection.services import make_embedder, make_store
from retrieval.records import read_ads
from retrieval.store import catalog_hash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ads", type=Path, default=CATALOGS["games"]["ads"])
    ap.add_argument("--limit", type=int, default=None, help="Only the first N ads.")
    ap.add_argument("--upsert-batch", type=int, default=1000)
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp))
        t = time.perf_counter()
        ads = read_ads(args.ads)[: args.limit]
        parse_s = time.perf_counter() - t
        n = len(ads)
        docs = [a.document() for a in ads]

        t = time.perf_counter()
        embedder = make_embedder(settings)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        vectors = embedder.encode(docs)
        embed_s = time.perf_counter() - t

        store = make_store(settings)
        t = time.perf_counter()
        store.upsert(ads, vectors, batch_size=args.upsert_batch)
        store.set_content_hash(catalog_hash(ads))
        upsert_s = time.perf_counter() - t

        t = time.perf_counter()
        index = store.load_index()
        load_index_s = time.perf_counter() - t
        assert len(index) == n

    chars = sum(map(len, docs)) / n
    print(f"catalog {args.ads} : {n} ads, mean document {chars:.0f} chars, dim {embedder.dim}")
    print(f"torch threads {torch.get_num_threads()}, embed batch {settings.embed_batch_size}, upsert batch {args.upsert_batch}")
    print(f"parse+validate : {parse_s:7.2f}s  {n / parse_s:9.0f} ads/s")
    print(f"embedder load  : {load_s:7.2f}s  (once per process)")
    print(f"embedding      : {embed_s:7.2f}s  {n / embed_s:9.0f} ads/s")
    print(f"chroma upsert  : {upsert_s:7.2f}s  {n / upsert_s:9.0f} ads/s")
    print(f"ingest total   : {parse_s + embed_s + upsert_s:7.2f}s  {n / (parse_s + embed_s + upsert_s):9.0f} ads/s (parse + embed + upsert)")
    print(f"load_index     : {load_index_s:7.2f}s  (start-up: the in-memory matrix the hot path uses)")


if __name__ == "__main__":
    main()
