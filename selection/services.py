"""Builds the long-lived services from Settings, once at start-up (server lifespan, CLI, eval).

Everything is constructed here and passed in: nothing reaches for a global.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from selection.fusion import FusionModel
from selection.admission import LLMAdmission
from selection.pipeline import AuditSink, Reranker, Selector
from kernel.settings import Settings
from agent.review import ModelTextReviewer
from retrieval.behaviour import BehaviourStats
from retrieval.candidates import CandidateGenerator
from retrieval.chroma import make_chroma_client
from retrieval.embedder import Embedder
from retrieval.store import AdStore, CatalogIndex

log = logging.getLogger(__name__)


def behaviour_dir(settings: Settings) -> Path:
    return settings.data_dir / "behaviour" / settings.collection


def make_store(settings: Settings) -> AdStore:
    return AdStore(make_chroma_client(data_dir=settings.data_dir, chroma_url=settings.chroma_url), settings.collection)


def make_embedder(settings: Settings) -> Embedder:
    return Embedder(settings.embedder_path, batch_size=settings.embed_batch_size, cache_size=settings.event_cache_size)


def load_behaviour(settings: Settings, index: CatalogIndex) -> BehaviourStats:
    stats = BehaviourStats.load(behaviour_dir(settings), index.ids)
    if stats is None:
        log.warning("no behaviour tables under %s: co-visitation and popularity priors are zero", behaviour_dir(settings))
        return BehaviourStats.empty(index.ids, window=settings.covisit_window, decay=settings.recency_decay)
    return stats


def make_reranker(settings: Settings, *, llm_url: str) -> Reranker:
    """The LLM stage over an OpenAI-compatible server (vLLM, or the bundled llama.cpp server)."""
    from agent.llm import ChatLLM
    from agent.prompts import PromptRegistry
    from agent.reranker import LLMReranker

    registry = PromptRegistry(settings.prompts_dir)
    llm = ChatLLM.from_settings(settings, base_url=llm_url)
    return LLMReranker.from_settings(settings, llm, registry=registry)


@dataclass
class Services:
    settings: Settings
    store: AdStore
    index: CatalogIndex
    behaviour: BehaviourStats
    fusion: FusionModel
    embedder: Embedder
    selector: Selector


def audit_logger() -> AuditSink:
    """Audit lines go to the `adselect.audit` logger as one JSON object each."""
    import json

    logger = logging.getLogger("adselect.audit")

    def sink(record: dict) -> None:
        logger.info(json.dumps(record, separators=(",", ":"), default=str))

    return sink


def build_services(
    settings: Settings,
    *,
    llm_url: str | None = None,
    embedder: Embedder | None = None,
    store: AdStore | None = None,
    reranker: Reranker | None = None,
    serving: bool = True,
    caps=None,
    audit: AuditSink | None = None,
) -> Services:
    """`llm_url` None and no `reranker`: the LLM stage is off (fast path only).

    serving=True adds what only live traffic needs: eligibility rules, frequency caps (SQLite under the
    data dir, or Redis), the breaker and concurrency limit, the audit log. Offline replay passes False."""
    if settings.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=settings.blas_threads, user_api="blas")
    store = store or make_store(settings)
    index = store.load_index()
    behaviour = load_behaviour(settings, index)
    fusion = FusionModel.load(settings.resolved_weights_path())
    embedder = embedder or make_embedder(settings)
    if reranker is None and llm_url and settings.llm_enabled:
        reranker = make_reranker(settings, llm_url=llm_url)
    generator = CandidateGenerator(
        index=index,
        store=store,
        behaviour=behaviour,
        n_dense=settings.n_dense,
        n_covisit=settings.n_covisit,
        n_popular=settings.n_popular,
        n_cf=settings.n_cf,
        exact_max_ads=settings.exact_search_max_ads,
    )
    safety: dict = {}
    admission = LLMAdmission(margin_ms=settings.llm_margin_ms, max_deadline_ms=settings.max_deadline_ms)
    if serving:
        from selection.caps import open_cap_store
        from kernel.hashing import secret_from_settings, user_key
        from selection.rules import EligibilityPolicy
        from agent.breaker import CircuitBreaker, ConcurrencyLimiter

        admission.breaker = CircuitBreaker(settings.llm_breaker_failures, settings.llm_breaker_reset_s)
        admission.limiter = ConcurrencyLimiter(settings.llm_max_concurrency)
        secret = secret_from_settings(settings)
        safety = dict(
            policy=EligibilityPolicy.from_settings(settings),
            caps=caps if caps is not None else open_cap_store(settings),
            caps_on_error=settings.caps_on_error,
            user_key=lambda uid: user_key(uid, secret=secret),
            audit=audit or audit_logger(),
            rank_by=settings.rank_by,
        )
    selector = Selector(
        index=index,
        generator=generator,
        fusion=fusion,
        embedder=embedder,
        reranker=reranker if settings.llm_enabled else None,
        admission=admission,
        recency_decay=settings.recency_decay,
        exclude_history=settings.exclude_history,
        llm_max_candidates=settings.llm_max_candidates,
        reviewer=ModelTextReviewer.from_settings(settings),
        **safety,
    )
    return Services(settings, store, index, behaviour, fusion, embedder, selector)
