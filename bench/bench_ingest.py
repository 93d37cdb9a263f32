"""Catalog ingest: end-to-end ads/s of a full ingest per backend (the ratio to torch in the same run), the
stage breakdown (parse, catalog hash, diff, tokenise, embed, Chroma upsert, their overlap, finish, behaviour
tables), and a re-ingest with 1% of the ads changed (seconds, ads embedded).

    python bench/bench_ingest.py [--ads PATH] [--limit N] [--changed-pct 1] [--ingest-backends torch,onnx-int8]

Default catalog: the 16,859-ad Games catalog (../shared/data/amazon_games_6k/ads.jsonl), ingested into a
fresh embedded Chroma under a temporary directory (deleted at the end). The changed file edits the text
of every (100 / pct)-th ad, so those ads need new vectors; nothing else changes.

Embedders first (--backends, default torch,onnx,onnx-int8, plus onnx-int8 with one thread, and in two processes
of one thread each): each embeds the same --compare-sample ads, interleaved in rounds so that a shared
machine's load falls on all of them alike; printed as ads/s, the ratio to torch, the largest cosine drift from
torch and the mean top-10 neighbour overlap with torch within the sample. Then a full ingest per
--ingest-backends (each into its own fresh Chroma, one after the other), and the incremental figures for the
last of them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CATALOGS, Settings

from retrieval.embed_pool import ProcessEmbedder
from retrieval.embedder import Embedder
from retrieval.ingest import IngestReport, ingest_catalog, learn_behaviour
from retrieval.records import read_ads
from selection.services import behaviour_dir, make_embedder, make_store


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_s() -> tuple[float, float]:
    """(this process's, its reaped children's) user + system CPU seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def phases(rep: IngestReport) -> str:
    return ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in rep.timings_s.items())


def compare_backends(ads_path: Path, *, backends: list[str], sample: int, rounds: int, env: Settings) -> None:
    ads = read_ads(ads_path)
    step = max(1, len(ads) // sample)
    docs = [a.document() for a in ads[::step][:sample]]  # spread over the file: the same text-length mix
    common_kw = dict(onnx_dir=env.onnx_dir, batch_size=env.embed_batch_size, batch_tokens=env.embed_batch_tokens, spin=env.embed_spin)
    configs = {b: dict(backend=b, threads=env.embed_threads or None) for b in backends}
    if "onnx-int8" in backends:
        configs["onnx-int8 1 thread"] = dict(backend="onnx-int8", threads=1)
        configs["onnx-int8 rows128"] = dict(backend="onnx-int8", threads=env.embed_threads or None, batch_tokens=None)
    embedders, load_s = {}, {}
    for name, kw in configs.items():
        t = time.perf_counter()
        embedders[name] = Embedder(**(common_kw | kw))
        load_s[name] = time.perf_counter() - t
    pool = None
    if "onnx-int8" in backends:
        t = time.perf_counter()
        pool = embedders["onnx-int8 2 procs x 1"] = ProcessEmbedder(embedders["onnx-int8"].config, processes=2)  # type: ignore[assignment]
        load_s["onnx-int8 2 procs x 1"] = time.perf_counter() - t
    names = list(embedders)
    secs = dict.fromkeys(names, 0.0)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    per = -(-len(docs) // rounds)
    load_before = load()
    for r in range(rounds):
        chunk = docs[r * per : (r + 1) * per]
        for n in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            parts[n].append(embedders[n].encode(chunk))
            secs[n] += time.perf_counter() - t
    if pool is not None:
        pool.close()
    vecs = {n: np.vstack(v) for n, v in parts.items()}
    base = names[0]
    top = {n: np.argsort(-(v @ v.T), axis=1)[:, 1:11] for n, v in vecs.items()}
    print(f"embedders on {len(docs)} ads of {ads_path.name} (every {step}th), {rounds} interleaved rounds, at most {env.embed_batch_size} rows "
          f"and {env.embed_batch_tokens} padded tokens a batch (rows128: 128 rows, no token budget); load average {load_before} -> {load()}:")  # fmt: skip
    for n in names:
        cos = (vecs[n] * vecs[base]).sum(axis=1)
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top[n], top[base])])
        print(f"  {n:22s}: {len(docs) / secs[n]:7.1f} ads/s  x{secs[base] / secs[n]:5.2f} vs {base}  "
              f"max cosine drift {1 - cos.min():.2e}  top-10 overlap {overlap:.3f}  (load {load_s[n]:.1f}s)")  # fmt: skip


def tokenise_s(embedder: Embedder, docs: list[str]) -> float | None:
    """Seconds the ONNX encoder's tokenizer takes over `docs` (a part of the embed stage; None for torch)."""
    if embedder._onnx is None:
        return None
    t = time.perf_counter()
    embedder._onnx.tokenize(docs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ads", type=Path, default=CATALOGS["games"]["ads"])
    ap.add_argument("--history", type=Path, default=CATALOGS["games"]["impressions"], help="Histories for the behaviour-table stage.")
    ap.add_argument("--limit", type=int, default=None, help="Only the first N ads.")
    ap.add_argument("--changed-pct", type=float, default=1.0, help="Percent of the ads whose text changes.")
    ap.add_argument("--upsert-batch", type=int, default=1000)
    ap.add_argument("--backends", default="torch,onnx,onnx-int8", help="Compared first (comma-separated; the first is the reference); empty: skip.")
    ap.add_argument("--compare-sample", type=int, default=2000, help="Ads each embedder embeds in the comparison.")
    ap.add_argument("--compare-rounds", type=int, default=4)
    ap.add_argument("--ingest-backends", default=None, help="Full ingests, one per backend (comma-separated; default torch,ADSELECT_EMBED_BACKEND); "
                    "BACKEND/N embeds in N worker processes (1: in the ingest's own process; default: one per CPU for onnx backends).")
    ap.add_argument("--skip-ingest", action="store_true", help="Only the embedder comparison.")
    args = ap.parse_args()
    env = Settings()
    if args.backends:
        compare_backends(args.ads, backends=args.backends.split(","), sample=args.compare_sample, rounds=args.compare_rounds, env=env)
    if args.skip_ingest:
        return

    import torch

    ingest_backends = (args.ingest_backends or ",".join(dict.fromkeys(["torch", env.embed_backend]))).split(",")
    rows = [json.loads(line) for line in args.ads.read_text(encoding="utf-8").splitlines() if line.strip()][: args.limit]
    print(f"catalog {args.ads}: {len(rows)} ads; torch threads {torch.get_num_threads()}, embed batch {env.embed_batch_size} rows / "
          f"{env.embed_batch_tokens} tokens, embed threads {env.embed_threads or 'all'} (spin {env.embed_spin}), upsert batch {args.upsert_batch}")  # fmt: skip
    full_s: dict[str, float] = {}
    for spec in ingest_backends:
        backend, _, procs = spec.partition("/")
        embed_processes = int(procs) if procs else None
        with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
            full = Path(tmp) / "ads.jsonl"
            full.write_text("".join(json.dumps(r) + "\n" for r in rows))
            step = max(1, round(100 / args.changed_pct))
            edited = [{**r, "text": (r.get("text") or "") + " Now with free shipping."} if i % step == 0 else r for i, r in enumerate(rows)]
            changed = Path(tmp) / "ads_changed.jsonl"
            changed.write_text("".join(json.dumps(r) + "\n" for r in edited))
            n_changed = sum(1 for a, b in zip(rows, edited) if a is not b)

            settings = env.model_copy(update={"data_dir": Path(tmp) / "var", "embed_backend": backend, "collection": "ads"})
            t = time.perf_counter()
            embedder = make_embedder(settings)
            load_s = time.perf_counter() - t
            store = make_store(settings)
            load_before = load()
            cpu_before = cpu_s()
            first = ingest_catalog(ads_path=full, store=store, embedder=embedder, batch_size=args.upsert_batch, embed_processes=embed_processes)
            full_s[spec] = first.seconds
            cpu_self, cpu_children = (after - before for after, before in zip(cpu_s(), cpu_before))
            tok = tokenise_s(embedder, [a.document() for a in read_ads(full)])
            ts = first.timings_s
            print(f"[{spec}] full ingest: {first.seconds:7.2f}s  {first.embedded} ads embedded  **{first.ads_per_s:.0f} ads/s end to end**"
                  f"  x{full_s[ingest_backends[0]] / first.seconds:.2f} vs {ingest_backends[0]}; load average {load_before} -> {load()}; "
                  f"embedder load {load_s:.1f}s (once per process, not counted)")  # fmt: skip
            n = first.embedded
            stage = [("parse", ts["parse_s"]), ("catalog hash", ts["hash_s"]), ("diff", ts.get("diff_s", 0.0))]
            if tok is not None:
                stage.append(("tokenise (in embed)", tok))
            if "pool_start_s" in ts:
                stage.append(("start embed workers (2 loads)", ts["pool_start_s"]))
            stage += [("embed (busy)", ts["embed_s"]), ("Chroma upsert (busy)", ts["upsert_s"]),
                      ("embed+upsert (wall, overlapped)", ts["embed_upsert_s"]), ("finish (metadata, hash)", ts["finish_s"])]  # fmt: skip
            for name, secs in stage:
                print(f"    {name:32s} {secs:7.2f}s  {n / max(secs, 1e-9):9.0f} ads/s")
            print(f"    CPU: ingest process {cpu_self:.1f}s, embed workers {cpu_children:.1f}s, over {first.seconds:.1f}s wall "
                  f"({(cpu_self + cpu_children) / first.seconds:.2f} of the {os.cpu_count()} cores)")  # fmt: skip
            hidden = ts["embed_s"] + ts["upsert_s"] - ts["embed_upsert_s"]
            print(f"    overlap: {hidden:.2f}s of busy time hidden ({hidden / max(min(ts['embed_s'], ts['upsert_s']), 1e-9):.0%} of the shorter stage)")
            if spec != ingest_backends[-1]:
                continue
            if args.history and args.history.is_file():
                t = time.perf_counter()
                learn_behaviour(
                    history_paths=[args.history], catalog_ids=store.load_index().ids, out_dir=behaviour_dir(settings),
                    window=settings.covisit_window, decay=settings.recency_decay, cf_dims=settings.cf_dims,
                )  # fmt: skip
                print(f"    {'behaviour tables (--history)':32s} {time.perf_counter() - t:7.2f}s  (`adselect ingest --history`; not in ads/s)")
            incr = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)
            same = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)
            store.set_content_hash("bench-forces-the-diff", embedder_key=embedder.key)  # the per-ad comparison, nothing to write
            diff_only = ingest_catalog(ads_path=changed, store=store, embedder=embedder, batch_size=args.upsert_batch)
            t = time.perf_counter()
            index = store.load_index()
            load_index_s = time.perf_counter() - t
            assert len(index) == len(rows) and incr.embedded == n_changed and diff_only.embedded == 0
            print(f"[{spec}] {args.changed_pct:g}% changed : {incr.seconds:7.2f}s  {incr.embedded:6d} ads embedded  "
                  f"({incr.added} added, {incr.changed} changed, {incr.unchanged} unchanged, {incr.removed} removed; {phases(incr)})")  # fmt: skip
            print(f"    ratio         : {first.seconds / incr.seconds:7.1f}x faster, {first.embedded / max(incr.embedded, 1):.0f}x fewer ads embedded")
            print(f"    unchanged     : {same.seconds:7.2f}s  {same.embedded:6d} ads embedded  (catalog hash matches: skipped)")
            print(f"    unchanged/diff: {diff_only.seconds:7.2f}s  {diff_only.embedded:6d} ads embedded  (every ad compared by hash; {phases(diff_only)})")
            print(f"    load_index    : {load_index_s:7.2f}s  (start-up: the in-memory matrix the hot path uses)")


if __name__ == "__main__":
    main()
