"""Catalog ingest: a full ingest against a re-ingest with 1% of the ads changed (seconds, ads embedded),
with the phases of each (parse + validate, diff against the stored per-ad hashes, embedding, Chroma writes).

    python bench/bench_ingest.py [--ads PATH] [--limit N] [--changed-pct 1]

Default catalog: the 16,859-ad Games catalog (../shared/data/amazon_games_6k/ads.jsonl), ingested into a
fresh embedded Chroma under a temporary directory (deleted at the end). The changed file edits the text
of every (100 / pct)-th ad, so those ads need new vectors; nothing else changes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import CATALOGS, Settings

from retrieval.ingest import IngestReport, ingest_catalog
from selection.services import make_embedder, make_store


def phases(rep: IngestReport) -> str:
    return ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in rep.timings_s.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ads", type=Path, default=CATALOGS["games"]["ads"])
    ap.add_argument("--limit", type=int, default=None, help="Only the first N ads.")
    ap.add_argument("--changed-pct", type=float, default=1.0, help="Percent of the ads whose text changes.")
    ap.add_argument("--upsert-batch", type=int, default=1000)
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        rows = [json.loads(line) for line in args.ads.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = rows[: args.limit]
        full = Path(tmp) / "ads.jsonl"
        full.write_text("".join(json.dumps(r) + "\n" for r in rows))
        step = max(1, round(100 / args.changed_pct))
        edited = [{**r, "text": (r.get("text") or "") + " Now with free shipping."} if i % step == 0 else r for i, r in enumerate(rows)]
        changed = Path(tmp) / "ads_changed.jsonl"
        changed.write_text("".join(json.dumps(r) + "\n" for r in edited))
        n_changed = sum(1 for a, b in zip(rows, edited) if a is not b)

        settings = Settings(_env_file=None, data_dir=Path(tmp) / "var")
        t = time.perf_counter()
        embedder = make_embedder(settings)
        load_s = time.perf_counter() - t
        store = make_store(settings)

        first = ingest_catalog(ads_path=full, store=store, embedder=embedder, batch_size=args.upsert_batch)
        incr = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)
        same = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)
        store.set_content_hash("bench-forces-the-diff")  # the per-ad comparison, nothing to write
        diff_only = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)

        t = time.perf_counter()
        index = store.load_index()
        load_index_s = time.perf_counter() - t
        assert len(index) == len(rows) and incr.embedded == n_changed and diff_only.embedded == 0

    print(f"catalog {args.ads}: {len(rows)} ads; torch threads {torch.get_num_threads()}, embed batch {settings.embed_batch_size}, upsert batch {args.upsert_batch}")
    print(f"embedder load : {load_s:7.2f}s (once per process, not in the figures below)")
    print(f"full ingest   : {first.seconds:7.2f}s  {first.embedded:6d} ads embedded  ({phases(first)})")
    print(f"{args.changed_pct:g}% changed    : {incr.seconds:7.2f}s  {incr.embedded:6d} ads embedded  "
          f"({incr.added} added, {incr.changed} changed, {incr.unchanged} unchanged, {incr.removed} removed; {phases(incr)})")  # fmt: skip
    print(f"ratio         : {first.seconds / incr.seconds:7.1f}x faster, {first.embedded / max(incr.embedded, 1):.0f}x fewer ads embedded")
    print(f"unchanged     : {same.seconds:7.2f}s  {same.embedded:6d} ads embedded  (catalog hash matches: skipped)")
    print(f"unchanged/diff: {diff_only.seconds:7.2f}s  {diff_only.embedded:6d} ads embedded  (every ad compared by hash; {phases(diff_only)})")
    print(f"load_index    : {load_index_s:7.2f}s  (start-up: the in-memory matrix the hot path uses)")


if __name__ == "__main__":
    main()
