"""What the bench scripts share: data locations, real user histories, a catalog ingested once, percentiles."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as `python bench/x.py` from anywhere

from kernel.settings import Settings  # noqa: E402

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
    from selection.services import behaviour_dir, make_embedder, make_store
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


def start_server(
    data_dir: Path,
    port: int,
    log_path: Path,
    *,
    env_overrides: dict[str, str] | None = None,
    workers: int | None = None,
    checkout: Path | None = None,
) -> subprocess.Popen:
    """A real `adselect serve --no-llm` process (this checkout's code, `python -m adselect.cli`, or that of
    `checkout`: another git worktree) on 127.0.0.1:`port`, returned once /healthz answers. `workers` None:
    the server's default (one per CPU)."""
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(env_overrides or {})
    cmd = [
        sys.executable, "-m", "adselect.cli", "serve", "--no-llm",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
    ]  # fmt: skip
    if workers is not None:
        cmd += ["--workers", str(workers)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=checkout or REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"server did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """Graceful first (in-flight requests finish, their audit lines are written), then kill."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def scratch_services(data_dir: Path, *, collection: str | None, fresh_state: bool = False) -> Iterator:
    """build_services (LLM off) over a scratch copy of `data_dir`, closed and removed on exit: caps and logs
    go to the copy, the catalog dir is only read. `fresh_state`: the copy leaves out caps, feedback and the
    impression log, so every run starts from empty state."""
    from selection.services import build_services

    ignore = shutil.ignore_patterns("caps.sqlite*", "feedback.sqlite*", "impressions") if fresh_state else None
    with tempfile.TemporaryDirectory() as scratch:
        var = Path(scratch) / "var"
        shutil.copytree(data_dir, var, symlinks=True, ignore=ignore)
        upd: dict = {"data_dir": var, "llm_enabled": False}
        if collection:
            upd["collection"] = collection
        svc = build_services(Settings(_env_file=None).model_copy(update=upd))
        try:
            yield svc
        finally:
            if hasattr(svc, "close"):
                svc.close()
