"""Catalog ingest: a full ingest against a re-ingest with 1% of the ads changed (seconds, ads embedded),
with the phases of each (parse + validate, diff against the stored per-ad hashes, embedding, Chroma writes).

    python bench/bench_ingest.py [--ads PATH] [--limit N] [--changed-pct 1]

Default catalog: the 16,859-ad Games catalog (../shared/data/amazon_games_6k/ads.jsonl), ingested into a
fresh embedded Chroma under a temporary directory (deleted at the end). The changed file edits the text
of every (100 / pct)-th ad, so those ads need new vectors; nothing else changes.

Backends first (--backends, default torch,onnx,onnx-int8): each embeds the same --compare-sample ads,
interleaved in rounds so that a shared machine's load falls on all of them alike; printed as ads/s, the ratio
to torch, the largest cosine drift from torch and the mean top-10 neighbour overlap with torch within the
sample. The ingest figures that follow use --backend (default ADSELECT_EMBED_BACKEND).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CATALOGS, Settings

from retrieval.embedder import Embedder
from retrieval.records import read_ads

from retrieval.ingest import IngestReport, ingest_catalog
from selection.services import make_embedder, make_store


def phases(rep: IngestReport) -> str:
    return ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in rep.timings_s.items())


def compare_backends(ads_path: Path, *, backends: list[str], sample: int, rounds: int, batch_size: int, onnx_dir: Path | None) -> None:
    ads = read_ads(ads_path)
    step = max(1, len(ads) // sample)
    docs = [a.document() for a in ads[::step][:sample]]  # spread over the file: the same text-length mix
    embedders, load_s = {}, {}
    for b in backends:
        t = time.perf_counter()
        embedders[b] = Embedder(backend=b, onnx_dir=onnx_dir, batch_size=batch_size)
        load_s[b] = time.perf_counter() - t
    secs = dict.fromkeys(backends, 0.0)
    parts: dict[str, list[np.ndarray]] = {b: [] for b in backends}
    per = -(-len(docs) // rounds)
    for r in range(rounds):
        chunk = docs[r * per : (r + 1) * per]
        for b in backends if r % 2 == 0 else backends[::-1]:
            t = time.perf_counter()
            parts[b].append(embedders[b].encode(chunk))
            secs[b] += time.perf_counter() - t
    vecs = {b: np.vstack(v) for b, v in parts.items()}
    base = backends[0]
    top = {b: np.argsort(-(v @ v.T), axis=1)[:, 1:11] for b, v in vecs.items()}
    print(f"embed backends on {len(docs)} ads of {ads_path.name} (every {step}th), {rounds} interleaved rounds, batch {batch_size}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}:")  # fmt: skip
    for b in backends:
        cos = (vecs[b] * vecs[base]).sum(axis=1)
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top[b], top[base])])
        print(f"  {b:10s}: {len(docs) / secs[b]:7.1f} ads/s  x{secs[base] / secs[b]:4.2f} vs {base}  "
              f"max cosine drift {1 - cos.min():.2e}  top-10 overlap {overlap:.3f}  (load {load_s[b]:.1f}s, key {embedders[b].key})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ads", type=Path, default=CATALOGS["games"]["ads"])
    ap.add_argument("--limit", type=int, default=None, help="Only the first N ads.")
    ap.add_argument("--changed-pct", type=float, default=1.0, help="Percent of the ads whose text changes.")
    ap.add_argument("--upsert-batch", type=int, default=1000)
    ap.add_argument("--backends", default="torch,onnx,onnx-int8", help="Compared first (comma-separated; the first is the reference); empty: skip.")
    ap.add_argument("--compare-sample", type=int, default=2000, help="Ads each backend embeds in the comparison.")
    ap.add_argument("--compare-rounds", type=int, default=4)
    ap.add_argument("--backend", default=None, help="Backend of the ingest figures; default ADSELECT_EMBED_BACKEND.")
    ap.add_argument("--skip-ingest", action="store_true", help="Only the backend comparison.")
    args = ap.parse_args()
    env = Settings()
    batch = env.embed_batch_size
    if args.backends:
        compare_backends(
            args.ads, backends=args.backends.split(","), sample=args.compare_sample, rounds=args.compare_rounds,
            batch_size=batch, onnx_dir=env.onnx_dir,
        )  # fmt: skip
    if args.skip_ingest:
        return

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

        settings = Settings(_env_file=None, data_dir=Path(tmp) / "var", embed_backend=args.backend or env.embed_backend, onnx_dir=env.onnx_dir)
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

    print(f"catalog {args.ads}: {len(rows)} ads; backend {settings.embed_backend}, torch threads {torch.get_num_threads()}, "
          f"embed batch {settings.embed_batch_size}, upsert batch {args.upsert_batch}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"embedder load : {load_s:7.2f}s (once per process, not in the figures below)")
    print(f"full ingest   : {first.seconds:7.2f}s  {first.embedded:6d} ads embedded  {first.ads_per_s:6.0f} ads/s end to end  "
          f"(embed {first.embedded / max(first.timings_s['embed_s'], 1e-9):.0f} ads/s; {phases(first)})")  # fmt: skip
    print(f"{args.changed_pct:g}% changed    : {incr.seconds:7.2f}s  {incr.embedded:6d} ads embedded  "
          f"({incr.added} added, {incr.changed} changed, {incr.unchanged} unchanged, {incr.removed} removed; {phases(incr)})")  # fmt: skip
    print(f"ratio         : {first.seconds / incr.seconds:7.1f}x faster, {first.embedded / max(incr.embedded, 1):.0f}x fewer ads embedded")
    print(f"unchanged     : {same.seconds:7.2f}s  {same.embedded:6d} ads embedded  (catalog hash matches: skipped)")
    print(f"unchanged/diff: {diff_only.seconds:7.2f}s  {diff_only.embedded:6d} ads embedded  (every ad compared by hash; {phases(diff_only)})")
    print(f"load_index    : {load_index_s:7.2f}s  (start-up: the in-memory matrix the hot path uses)")


if __name__ == "__main__":
    main()
