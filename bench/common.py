"""What the bench scripts share: data locations, real user histories, a catalog ingested once, percentiles."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/x.py` from anywhere

from adselect.settings import Settings  # noqa: E402

SHARED_DATA = REPO_ROOT / ".." / "shared" / "data"
CATALOGS = {
    "demo": {"ads": REPO_ROOT / "data" / "demo" / "ads.jsonl", "impressions": REPO_ROOT / "data" / "demo" / "impressions.jsonl"},
    "games": {
        "ads": SHARED_DATA / "amazon_games_6k" / "ads.jsonl",
        "impressions": SHARED_DATA / "amazon_games_6k" / "impressions_full_dev.jsonl",
    },
}


def histories(path: Path, n: int, *, seed: int = 0, max_len: int = 200) -> list[list[str]]:
    """`n` non-empty histories of distinct users from a canonical impressions file, sampled with `seed`."""
    by_user: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("history"):
                by_user[rec["user_id"]] = rec["history"][-max_len:]  # the latest impression's history
    users = sorted(by_user)
    random.Random(seed).shuffle(users)
    picked = [by_user[u] for u in users[:n]]
    while len(picked) < n:  # a small log (the demo's): cycle through it
        picked += picked[: n - len(picked)]
    return picked


def ensure_ingested(catalog: str, data_dir: Path | None, scratch: Path) -> Path:
    """An ingested data dir for `catalog`: `data_dir` as given (must already hold it), else a fresh one."""
    if data_dir is not None:
        return data_dir
    from adselect.services import behaviour_dir, make_embedder, make_store
    from retrieval.ingest import ingest_catalog, learn_behaviour

    settings = Settings(_env_file=None, data_dir=scratch / f"{catalog}_var")
    store = make_store(settings)
    paths = CATALOGS[catalog]
    rep = ingest_catalog(ads_path=paths["ads"], store=store, embedder=make_embedder(settings), show_progress=False)
    learn_behaviour(
        history_paths=[paths["impressions"]], catalog_ids=store.load_index().ids, out_dir=behaviour_dir(settings),
        window=settings.covisit_window, decay=settings.recency_decay, cf_dims=settings.cf_dims,
    )  # fmt: skip
    print(f"[{catalog}] ingested {rep.ads} ads into {settings.data_dir} in {rep.seconds:.1f}s")
    return settings.data_dir


def summary(ms: list[float] | np.ndarray) -> str:
    a = np.asarray(ms, dtype=np.float64)
    if len(a) == 0:
        return "n=0"
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return f"n={len(a)} p50={p50:.2f}ms p90={p90:.2f}ms p99={p99:.2f}ms mean={a.mean():.2f}ms max={a.max():.2f}ms"
