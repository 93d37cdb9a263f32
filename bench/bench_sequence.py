"""Sequence model cost on the Games catalog: training time and peak memory, and per-request serving latency.

Training: the 50,546 histories of impressions_full_dev.jsonl, on --threads torch threads (2 = the
machine), into a fresh directory unless --state-dir already holds a model for the same inputs.
Serving: p50/p99 per call over real user histories of
- `scores(history)` (numpy forward pass + one 16,859 x hidden matvec), `top_n(history, 100)`,
- the same forward pass + matvec in torch, single-threaded (same shapes; the weights' values do not matter),
- the numpy floor: the matvec alone, for the ratio, all in one run.

    python bench/bench_sequence.py --threads 2                  # train on 2 cores, then time serving
    python bench/bench_sequence.py --state-dir DIR              # reuse a trained model, time serving
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # serving: one request on one core
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from common import CATALOGS, histories, summary  # noqa: E402

from retrieval.records import read_ads, read_histories  # noqa: E402
from retrieval.sequence import SequenceConfig, SequenceModel, train_or_load  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fn, inputs, *, repeat: int) -> list[float]:
    ms = []
    for _ in range(repeat):
        for x in inputs:
            t0 = time.perf_counter()
            fn(x)
            ms.append((time.perf_counter() - t0) * 1000)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games-dir", type=Path, default=CATALOGS["games"]["ads"].parent)
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="models live in STATE_DIR/<config digest> (sequence_quality.py's layout) and are reused; default: a fresh temp dir")
    ap.add_argument("--serve-only", type=Path, default=None, help="time serving of the model saved in this dir, no training")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (2 for the reported figure)")
    ap.add_argument("--requests", type=int, default=1000, help="distinct user histories timed")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--text-init", action="store_true")
    ap.add_argument("--max-epochs", type=int, default=None)
    args = ap.parse_args()

    ads = read_ads(args.games_dir / "ads.jsonl")
    ids = [a.ad_id for a in ads]
    train_path = args.games_dir / "impressions_full_dev.jsonl"
    hist = read_histories(train_path)
    cfg = SequenceConfig(text_init=args.text_init, **({"max_epochs": args.max_epochs} if args.max_epochs else {}))
    if args.serve_only:
        model = SequenceModel.load(args.serve_only, ids)
        cfg = model.config
        print(f"config: {cfg}\nserving the model in {args.serve_only}; trained in {model.meta['train']['seconds']}s")
        serve(model, ids, train_path, args)
        return
    text = None
    if cfg.text_init:
        from sequence_quality import title_vectors

        text = title_vectors(ads, Path("/tmp/adselect_sequence_bench/cache"))
    scratch = tempfile.TemporaryDirectory()
    directory = args.state_dir / cfg.digest()[:16] if args.state_dir else Path(scratch.name) / "sequence"
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    model = train_or_load(histories=hist, ids=ids, directory=directory, config=cfg, text_vectors=text, threads=args.threads)
    wall = time.perf_counter() - t0
    rep = model.meta.get("train", {})
    print(f"config: {cfg}")
    if model.meta["reused"]:
        print(f"training: reused the model in {directory} (loaded in {wall:.2f}s); trained earlier in {rep.get('seconds')}s "
              f"on {rep.get('threads')} thread(s)")  # fmt: skip
    else:
        print(f"training: {len(hist)} histories -> {rep['train_histories']} distinct trained ({rep['targets']} targets), "
              f"{rep['holdout_histories']} held out; {len(rep['curve'])} epochs (best {rep['best_epoch']}, holdout nDCG@10 "
              f"{rep['holdout_ndcg10']:.4f}); {rep['seconds']:.1f}s training, {wall:.1f}s with reading and saving, "
              f"{args.threads} torch thread(s); peak RSS {peak_rss_mib():.0f} MiB (before training {rss0:.0f} MiB)")  # fmt: skip
    t0 = time.perf_counter()
    SequenceModel.load(directory, ids)
    print(f"load: {(time.perf_counter() - t0) * 1000:.0f} ms")
    serve(model, ids, train_path, args)
    scratch.cleanup()


def serve(model: SequenceModel, ids: list[str], train_path: Path, args) -> None:
    import torch

    cfg = model.config

    users = histories(train_path, args.requests, seed=0, max_len=cfg.max_len)
    row = {a: i for i, a in enumerate(ids)}
    reqs = [[row[a] for a in h if a in row] for h in users]
    lens = np.array([len(r) for r in reqs])
    print(f"serving: {len(reqs)} real histories (length mean {lens.mean():.1f}, max {lens.max()}), x{args.repeat}, "
          f"{len(ids)} items x {cfg.hidden}, 1 thread")  # fmt: skip
    time_calls(model.scores, reqs[:50], repeat=1)  # warm-up
    floor_u = [np.random.default_rng(i).normal(size=cfg.hidden).astype(np.float32) for i in range(len(reqs))]
    floor = time_calls(lambda u: model.items @ u, floor_u, repeat=args.repeat)
    sc = time_calls(model.scores, reqs, repeat=args.repeat)
    top = time_calls(lambda h: model.top_n(h, 100, exclude=h), reqs, repeat=args.repeat)

    from retrieval.sequence_train import SASRec

    torch.set_num_threads(1)
    net = SASRec(len(ids), replace(cfg, text_init=False)).eval()  # the served item matrix already holds the projection
    with torch.no_grad():
        items = net.item_matrix()

        def torch_scores(h):
            return (net(torch.as_tensor([h[-cfg.max_len :]]), items)[0, -1] @ items.T).numpy()

        time_calls(torch_scores, reqs[:50], repeat=1)
        tor = time_calls(torch_scores, reqs, repeat=args.repeat)
    def p(a):
        return float(np.percentile(a, 50)), float(np.percentile(a, 99))

    print(f"  numpy floor (matvec only)  {summary(floor)}")
    print(f"  scores (numpy)             {summary(sc)}   p50 x{p(sc)[0] / p(floor)[0]:.1f} floor, p99 x{p(sc)[1] / p(floor)[1]:.1f}")
    print(f"  top_n(100, exclude hist)   {summary(top)}   p50 x{p(top)[0] / p(floor)[0]:.1f} floor")
    print(f"  scores (torch, 1 thread)   {summary(tor)}   p50 x{p(tor)[0] / p(floor)[0]:.1f} floor")


if __name__ == "__main__":
    main()
