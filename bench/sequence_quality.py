"""Sequence model quality on the Games dev data, standalone (no pipeline, no fusion): prints figures.

Trains (or reuses, see --state-dir) the next-item model on the HISTORIES of impressions_full_dev.jsonl
(50,546 users; never `clicked`), then
- sampled: ranks the 20 logged candidates of impressions_sampled_dev.jsonl by the model's score:
  nDCG@1/5/10, MRR, bootstrap 95% CI;
- full: the model's top-100 over all 16,859 products (history excluded) for the first --limit
  impressions of impressions_full_dev.jsonl: nDCG@10, Hit@10, Recall@20/50/100 (Recall@100 = how often the
  top-100 as a candidate source holds the clicked product).

    python bench/sequence_quality.py                      # SASRec-style, full softmax, random item init
    python bench/sequence_quality.py --text-init          # items start from the MiniLM title vectors
    python bench/sequence_quality.py --text-init --lr-schedule cosine --warmup-frac 0.05 --max-epochs 10
    python bench/sequence_quality.py --model-dir DIR      # evaluate a saved model (an eval data dir's)
    python bench/sequence_quality.py --sources DATA_DIR --n-sequence 100 --n-sequence 200

--sources: the candidate stage as `adselect eval` builds it (eval.env.prepare_env on DATA_DIR with the
ADSELECT_* settings of the environment, the shipped fusion weights), per source: Recall@20/50/100 of
each generator's own best-first list, and of the fused union (the `default` order) for each
--n-sequence (the sequence source's top-N in the union).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eval.metrics import impression_metrics, mean_with_ci  # noqa: E402
from retrieval.records import iter_impressions, read_ads, read_histories  # noqa: E402
from retrieval.sequence import SequenceConfig, SequenceModel, train_or_load  # noqa: E402

GAMES = REPO_ROOT / ".." / "shared" / "data" / "amazon_games_6k"
SAMPLED_METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "mrr")
FULL_METRICS = ("ndcg@10", "hit@10", "recall@20", "recall@50", "recall@100")


def title_vectors(ads, cache_dir: Path) -> np.ndarray:
    """MiniLM vectors of the ad documents (what ingest embeds), cached outside the repo by content."""
    key = hashlib.sha256("\n".join(a.ad_id + "\t" + a.document() for a in ads).encode()).hexdigest()[:16]
    path = cache_dir / f"title_vectors_{key}.npy"
    if path.exists():
        return np.load(path)
    from retrieval.embedder import Embedder

    t0 = time.perf_counter()
    vecs = Embedder().encode([a.document() for a in ads], show_progress=sys.stderr.isatty())
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    print(f"encoded {len(ads)} titles in {time.perf_counter() - t0:.0f}s -> {path}")
    return vecs


def fmt(name: str, m: tuple[float, float, float]) -> str:
    return f"{name} {m[0]:.4f} [{m[1]:.4f}, {m[2]:.4f}]"


def evaluate(model: SequenceModel, row: dict[str, int], *, sampled: Path, full: Path, limit: int, n_boot: int) -> dict:
    out: dict[str, dict] = {}
    per: dict[str, list] = {m: [] for m in SAMPLED_METRICS}
    for _, rec in iter_impressions(sampled):
        hist = [row[a] for a in rec.history if a in row]
        cands = [a for a in rec.candidates if a in row]
        s = model.scores(hist)[[row[a] for a in cands]]
        ranking = [cands[j] for j in np.argsort(-s, kind="stable")]
        for k, v in impression_metrics(ranking, set(rec.clicked), names=SAMPLED_METRICS).items():
            per[k].append(v)
    out["sampled"] = {k: mean_with_ci(v, n_boot=n_boot) for k, v in per.items()} | {"n": len(per["mrr"])}
    ids = list(row)
    per = {m: [] for m in FULL_METRICS}
    t0 = time.perf_counter()
    n = 0
    for _, rec in iter_impressions(full):
        if n >= limit:
            break
        n += 1
        hist = [row[a] for a in rec.history if a in row]
        top = model.top_n(hist, 100, exclude=hist)
        ranking = [ids[r] for r in top]
        for k, v in impression_metrics(ranking, set(rec.clicked), names=FULL_METRICS, pool_size=len(ids)).items():
            per[k].append(v)
    out["full"] = {k: mean_with_ci(v, n_boot=n_boot) for k, v in per.items()} | {"n": n}
    out["full_ms_per_impression"] = (time.perf_counter() - t0) * 1000 / max(n, 1)
    return out


SOURCE_KS = (20, 50, 100)


def source_recall(data_dir: Path, games: Path, *, limit: int, n_sequence: list[int], n_boot: int) -> None:
    """Per-source and fused Recall@K of the full-catalog candidate stage on the first `limit` impressions."""
    from eval.env import prepare_env
    from kernel.settings import Settings
    from retrieval.features import build_profile

    settings = Settings(_env_file=None, data_dir=data_dir)
    t0 = time.perf_counter()
    env = prepare_env(settings, ads_path=games / "ads.jsonl", train_paths=[games / "impressions_full_dev.jsonl"], show_progress=False)
    sel = env.services.selector
    gen, index = sel.generator, env.services.index
    print(f"environment {data_dir} ready in {time.perf_counter() - t0:.1f}s (reused {env.reused}); sequence model "
          f"{'on' if gen.sequence is not None else 'OFF'}; fusion weights {env.services.fusion.__class__.__name__}")  # fmt: skip
    ids = index.ids
    per: dict[str, list[float]] = {}
    sizes: dict[str, list[int]] = {}
    n = 0
    for _, rec in iter_impressions(games / "impressions_full_dev.jsonl"):
        if n >= limit:
            break
        clicked = {a for a in rec.clicked if a in index.row}
        if not clicked:
            continue
        n += 1
        hist, _ = index.rows(rec.history)
        profile = build_profile(index, hist, decay=sel.recency_decay)
        exclude = set(hist)
        for n_seq in n_sequence:
            gen.n_sequence = n_seq
            cset = gen.generate(profile, exclude=exclude)
            lists = {f"source {name}": [int(r) for r in rows if r not in exclude] for name, rows in cset.by_source.items()}
            if n_seq != n_sequence[0]:
                lists = {}
            order = np.argsort(-sel.fusion.prior_scores(cset.features), kind="stable")
            lists[f"union, fused (n_sequence={n_seq})"] = [int(r) for r in cset.rows[order]]
            for name, rows in lists.items():
                ranking = [ids[r] for r in rows]
                sizes.setdefault(name, []).append(len(ranking))
                m = impression_metrics(ranking, clicked, names=[f"recall@{k}" for k in SOURCE_KS], pool_size=len(ids))
                for k in SOURCE_KS:
                    per.setdefault(f"{name}\t{k}", []).append(m[f"recall@{k}"])
                per.setdefault(f"{name}\tall", []).append(float(bool(clicked & set(ranking))))
    print(f"{n} full-catalog impressions (first {limit} of impressions_full_dev.jsonl), {len(ids)} products, history excluded")
    print("list | mean length | Recall@20 | Recall@50 [95% CI] | Recall@100 | any position")
    for name in sizes:
        r = {k: mean_with_ci(per[f"{name}\t{k}"], n_boot=n_boot) for k in (*SOURCE_KS, "all")}
        print(f"{name} | {np.mean(sizes[name]):.0f} | {r[20][0]:.4f} | {fmt('', r[50]).strip()} | {r[100][0]:.4f} | {r['all'][0]:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games-dir", type=Path, default=GAMES, help="the amazon_games_6k data folder")
    ap.add_argument("--limit", type=int, default=5000, help="full-catalog impressions evaluated")
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/adselect_sequence_bench"), help="model dirs (reused)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--text-init", action="store_true")
    for name, typ in (("hidden", int), ("blocks", int), ("heads", int), ("dropout", float), ("lr", float), ("loss", str),
                      ("negatives", int), ("batch-tokens", int), ("max-epochs", int), ("patience", int),
                      ("max-train-seconds", float), ("seed", int), ("weight-decay", float), ("max-len", int),
                      ("lr-schedule", str), ("warmup-frac", float), ("label-smoothing", float)):  # fmt: skip
        ap.add_argument(f"--{name}", type=typ, default=None)
    ap.add_argument("--model-dir", type=Path, default=None, help="evaluate the model saved in this directory (no training)")
    ap.add_argument("--sources", type=Path, default=None, metavar="DATA_DIR", help="per-source candidate recall (see above)")
    ap.add_argument("--n-sequence", type=int, action="append", default=None, help="--sources: the sequence source's top-N (repeatable)")
    args = ap.parse_args()
    if args.sources is not None:
        logging.basicConfig(level=logging.WARNING)
        source_recall(args.sources, args.games_dir, limit=args.limit, n_sequence=args.n_sequence or [100], n_boot=args.n_boot)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("retrieval.sequence_train").setLevel(logging.INFO)
    import torch

    torch.set_num_threads(args.threads)
    over = {k.replace("-", "_"): getattr(args, k.replace("-", "_")) for k in (
        "hidden", "blocks", "heads", "dropout", "lr", "loss", "negatives", "batch-tokens", "max-epochs", "patience",
        "max-train-seconds", "seed", "weight-decay", "max-len", "lr-schedule", "warmup-frac", "label-smoothing")}  # fmt: skip
    cfg = SequenceConfig(**{k: v for k, v in over.items() if v is not None}, text_init=args.text_init)
    games = args.games_dir
    ads = read_ads(games / "ads.jsonl")
    ids = [a.ad_id for a in ads]
    text = title_vectors(ads, args.state_dir / "cache") if cfg.text_init and args.model_dir is None else None
    histories = read_histories(games / "impressions_full_dev.jsonl")  # histories only, never `clicked`
    directory = args.model_dir or args.state_dir / cfg.digest()[:16]
    t0 = time.perf_counter()
    if args.model_dir is not None:  # a model saved elsewhere (e.g. an eval data dir's), evaluated as it is
        model = SequenceModel.load(args.model_dir, ids)
        if model is None:
            raise SystemExit(f"no sequence model in {args.model_dir}")
        model.meta["reused"] = True
        cfg = model.config
    else:
        model = train_or_load(
            histories=histories, ids=ids, directory=directory, config=cfg, text_vectors=text,
            show_progress=False if args.no_progress else None, threads=args.threads,
        )  # fmt: skip
    secs = time.perf_counter() - t0
    rep = model.meta.get("train", {})
    print(f"config {json.dumps({k: v for k, v in cfg.__dict__.items()}, sort_keys=True)}")
    print(f"state {directory} reused={model.meta['reused']} ({secs:.1f}s this run)")
    print(
        f"training: {rep.get('train_histories')} histories ({rep.get('targets')} targets), {rep.get('holdout_histories')} held out; "
        f"best epoch {rep.get('best_epoch')} of {len(rep.get('curve', []))}, holdout nDCG@10 {rep.get('holdout_ndcg10', float('nan')):.4f}, "
        f"{rep.get('seconds')}s on {rep.get('threads')} thread(s)"
    )
    for c in rep.get("curve", []):
        print(f"  epoch {c['epoch']}: loss {c['loss']:.4f} holdout nDCG@10 {c['holdout_ndcg10']:.4f} at {c['seconds']}s"
              + (f", lr at the end {c['lr_end']:.2e}" if "lr_end" in c else ""))
    row = {a: i for i, a in enumerate(ids)}
    res = evaluate(model, row, sampled=games / "impressions_sampled_dev.jsonl", full=games / "impressions_full_dev.jsonl", limit=args.limit, n_boot=args.n_boot)
    s, f = res["sampled"], res["full"]
    print(f"sampled ({s['n']} impressions, 20 candidates): " + "  ".join(fmt(k, s[k]) for k in SAMPLED_METRICS))
    print(f"full ({f['n']} impressions, {len(ids)} products, history excluded): " + "  ".join(fmt(k, f[k]) for k in FULL_METRICS))
    print(f"top-100 as a candidate source: Recall@50 {f['recall@50'][0]:.4f}, coverage of the 100 {f['recall@100'][0]:.4f}")
    print(f"full-catalog scoring {res['full_ms_per_impression']:.2f} ms/impression incl. metrics; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
