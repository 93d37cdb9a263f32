"""The dense source's two searches over the same Games vectors: the full scan (one BLAS gemv over n x 384) and the
two-stage projected search (retrieval.projected_search), on real user profiles, one BLAS thread as served.

    python bench/bench_dense_search.py --data-dir GAMES_VAR [--collection NAME] [--users 300] [--k 100] [--pause-ms 5]

Prints the projection's build time, how often the two return the same rows (as sets and in the same order: the full
scan breaks exact ties by argpartition, the projected search by row) and recall@k of the projected search against
the full scan, then both searches' p50/p99 with --pause-ms idle before each call (as in a server, where the matrix
is read from memory again between requests), alternating, two rounds, with the load average.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import CATALOGS, histories
from threadpoolctl import threadpool_limits

from retrieval.features import build_profile
from retrieval.projected_search import ProjectedSearch
from retrieval.similarity import row_dots


def full_scan(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = row_dots(vectors, q)
    top = np.argpartition(-s, k - 1)[:k]
    return top[np.argsort(-s[top], kind="stable")]  # what CandidateGenerator._dense did for every catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--collection", default="ads")
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--pause-ms", type=float, default=5.0)
    args = ap.parse_args()
    import chromadb

    from retrieval.store import AdStore

    index = AdStore(chromadb.PersistentClient(path=os.path.join(args.data_dir, "chroma")), args.collection).load_index()
    queries = []
    for h in histories(CATALOGS["games"]["impressions"], args.users, seed=1):
        rows, _ = index.rows(h)
        if rows:
            queries.append(build_profile(index, rows, decay=0.8).vector)
    with threadpool_limits(1):
        search = ProjectedSearch(index.vectors)
        print(f"{len(index)} ads x {index.vectors.shape[1]}: projection to {search.basis.shape[1]} dims built in {1000 * search.build_s:.0f} ms")
        same_set = same_order = 0
        recall = []
        for q in queries:
            a, b = full_scan(index.vectors, q, args.k), search.top(q, args.k)
            same_order += bool(np.array_equal(a, b))
            same_set += set(a.tolist()) == set(b.tolist())
            recall.append(len(set(a.tolist()) & set(b.tolist())) / len(a))
        print(f"{len(queries)} real profiles, k={args.k}: same rows {same_set}/{len(queries)}, same order {same_order}/{len(queries)}, "
              f"recall@{args.k} mean {np.mean(recall):.4f} min {np.min(recall):.2f}")  # fmt: skip
        for rnd in range(2):
            times: dict[str, list[float]] = {"full scan": [], "projected": []}
            for i, q in enumerate(queries * 2):
                for name, f in (("full scan", lambda: full_scan(index.vectors, q, args.k)), ("projected", lambda: search.top(q, args.k))):
                    time.sleep(args.pause_ms / 1000)
                    t = time.perf_counter()
                    f()
                    times[name].append(1000 * (time.perf_counter() - t))
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"round {rnd + 1} (load {load}): " + "; ".join(
                f"{n} p50 {np.percentile(v, 50):.3f} p99 {np.percentile(v, 99):.3f} ms" for n, v in times.items()
            ))  # fmt: skip


if __name__ == "__main__":
    main()
