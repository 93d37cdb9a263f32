"""The eval environment: the catalog in Chroma, behaviour learned from training histories, the Selector.

Everything is keyed by content so a re-run reuses what an earlier run built under the data dir:

- the catalog goes into the Chroma collection `ads_<catalog hash[:16]>` (retrieval.store.catalog_hash);
  when that collection already holds exactly this catalog, nothing is embedded;
- behaviour tables (co-visitation, popularity, collaborative vectors) are learned from the histories
  of the training impression files (never their `clicked`) into
  `data_dir/eval/behaviour/<sha256 of the train files + learning parameters + catalog hash>`;
- the next-item sequence model is trained from the same histories into `<behaviour dir>/sequence`
  (retrieval.sequence.train_or_load: reused when histories, catalog rows, config and vectors match);
  off with ADSELECT_SEQUENCE_ENABLED=false;
- the Selector comes from `selection.services.build_services`, the constructor the server uses, with
  the LLM reranker passed in (or none for the fast path).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval.provenance import file_sha256
from selection.services import Services, behaviour_dir, build_services, embedder_key_for, make_embedder, make_store, sequence_config
from kernel.settings import Settings
from retrieval.ingest import ingest_catalog, learn_behaviour, learn_sequence
from retrieval.embedder import catalog_embedder_ok
from retrieval.records import read_ads
from retrieval.store import catalog_hash

log = logging.getLogger(__name__)


class LazyEmbedder:
    """Loads the sentence-transformers model on first use: replaying logged ids never needs it."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._real = None
        self.key = embedder_key_for(settings)  # the catalog check needs no model load

    @property
    def real(self):
        if self._real is None:
            self._real = make_embedder(self._settings)
        return self._real

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def encode(self, texts, **kw):
        return self.real.encode(texts, **kw)

    def encode_cached(self, texts):
        return self.real.encode_cached(texts)


@dataclass
class EvalEnv:
    services: Services
    settings: Settings  # as given to build_services
    catalog_hash: str
    collection: str
    ads_sha256: str
    train: list[dict[str, str]]  # [{"path", "sha256"}]
    behaviour_dir: Path
    timings_s: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def behaviour_key(train_shas: list[str], *, settings: Settings, content_hash: str) -> str:
    spec = {
        "train": train_shas,
        "window": settings.covisit_window,
        "decay": settings.recency_decay,
        "cf_dims": settings.cf_dims,
        "catalog": content_hash,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def prepare_env(
    settings: Settings,
    *,
    ads_path: Path,
    train_paths: list[Path],
    weights_path: Path | None = None,
    reranker=None,
    show_progress: bool = True,
    count_behaviour=None,
) -> EvalEnv:
    """Ingest (or reuse) the catalog, learn (or reuse) behaviour, build the services. `count_behaviour`:
    how learn_behaviour counts the histories (None: here; --ray: RayBackend.behaviour_counter())."""
    timings: dict[str, float] = {}
    reused: dict[str, bool] = {}
    t = time.perf_counter()
    ads = read_ads(ads_path)  # DataFileError(file, line) on a bad catalog line
    content_hash = catalog_hash(ads)
    collection = f"ads_{content_hash[:16]}"
    s = settings.model_copy(update={"collection": collection})
    store = make_store(s)
    embedder = LazyEmbedder(s)
    if store.stored_hash() == content_hash and store.count() == len(ads) and catalog_embedder_ok(store.stored_embedder(), embedder.key):
        reused["catalog"] = True
    else:
        log.info("ingesting catalog", extra={"ads": len(ads), "collection": collection})
        ingest_catalog(ads_path=ads_path, store=store, embedder=embedder.real, show_progress=show_progress, embedder_key=embedder.key)
        reused["catalog"] = False
    timings["ingest_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train = [{"path": str(p), "sha256": file_sha256(p)} for p in train_paths]
    key = behaviour_key([d["sha256"] for d in train], settings=s, content_hash=content_hash)
    # build_services reads behaviour from behaviour_dir(settings) = data_dir/behaviour/<collection>:
    # point its data_dir at the train-keyed folder so the constructor stays the server's.
    s_build = s.model_copy(update={"data_dir": Path(settings.data_dir) / "eval" / "behaviour" / key})
    bdir = behaviour_dir(s_build)
    index = store.load_index()
    if (bdir / "behaviour.json").exists():
        reused["behaviour"] = True
    else:
        learn_behaviour(
            history_paths=list(train_paths), catalog_ids=list(index.ids), out_dir=bdir,
            window=s.covisit_window, decay=s.recency_decay, cf_dims=s.cf_dims, count=count_behaviour,
        )  # fmt: skip
        (bdir / "train.json").write_text(json.dumps({"train": train, "key": key}, indent=2))
        reused["behaviour"] = False
    timings["behaviour_s"] = time.perf_counter() - t
    if s.sequence_enabled:
        t = time.perf_counter()
        model = learn_sequence(
            history_paths=list(train_paths), index=index, behaviour_dir=bdir, config=sequence_config(s),
            show_progress=show_progress, threads=s.sequence_threads,
        )  # fmt: skip
        reused["sequence"] = bool(model.meta.get("reused"))
        timings["sequence_s"] = time.perf_counter() - t

    resolved_weights = weights_path if weights_path is not None else settings.resolved_weights_path()
    s_build = s_build.model_copy(update={"weights_path": resolved_weights})
    t = time.perf_counter()
    # serving=False: offline replay, as the endpoint minus live-traffic state (no caps, no eligibility rules, no audit)
    services = build_services(s_build, store=store, embedder=embedder, reranker=reranker, serving=False, index=index)  # type: ignore[arg-type]
    timings["load_s"] = time.perf_counter() - t
    return EvalEnv(
        services=services,
        settings=s_build,
        catalog_hash=content_hash,
        collection=collection,
        ads_sha256=file_sha256(ads_path),
        train=train,
        behaviour_dir=bdir,
        timings_s=timings,
        reused=reused,
    )
