"""Builds the long-lived services from Settings, once at start-up (server lifespan, CLI, eval).

Everything is constructed here and passed in: nothing reaches for a global.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from selection.fusion import FusionModel
from selection.admission import LLMAdmission
from selection.experiments import Experiment, experiment_from_settings
from selection.impression_log import ImpressionLogWriter, JsonlImpressionLog, NullImpressionLog, event_hashes
from selection.feedback import FeedbackStore
from selection.pipeline import ArmPolicy, AuditSink, Reranker, Selector
from selection.served_queue import ServedQueue
from kernel.errors import ConfigError
from kernel.settings import Settings
from agent.review import ModelTextReviewer
from retrieval.behaviour import BehaviourStats
from retrieval.candidates import CandidateGenerator
from retrieval.chroma import make_chroma_client
from retrieval.embedder import Embedder, check_catalog_embedder, embedder_key
from retrieval.ingest import SEQUENCE_DIR
from retrieval.sequence import SequenceConfig, SequenceModel
from retrieval.store import AdStore, CatalogIndex

log = logging.getLogger(__name__)


def behaviour_dir(settings: Settings) -> Path:
    return settings.data_dir / "behaviour" / settings.collection


def make_store(settings: Settings) -> AdStore:
    return AdStore(make_chroma_client(data_dir=settings.data_dir, chroma_url=settings.chroma_url), settings.collection)


def make_embedder(settings: Settings) -> Embedder:
    return Embedder(
        settings.embedder_path, backend=settings.embed_backend, onnx_dir=settings.onnx_dir,
        batch_size=settings.embed_batch_size, cache_size=settings.event_cache_size,
        batch_tokens=settings.embed_batch_tokens, threads=settings.embed_threads or None, spin=settings.embed_spin,
    )  # fmt: skip


def embedder_key_for(settings: Settings) -> str:
    """The key make_embedder's embedder will have, without loading it (retrieval.embedder.embedder_key)."""
    return embedder_key(settings.embedder_path, settings.embed_backend)


def load_behaviour(settings: Settings, index: CatalogIndex) -> BehaviourStats:
    stats = BehaviourStats.load(behaviour_dir(settings), index.ids)
    if stats is None:
        log.warning("no behaviour tables under %s: co-visitation and popularity priors are zero", behaviour_dir(settings))
        return BehaviourStats.empty(index.ids, window=settings.covisit_window, decay=settings.recency_decay)
    return stats


def sequence_config(settings: Settings) -> SequenceConfig:
    return SequenceConfig(
        text_init=settings.sequence_text_init,
        max_epochs=settings.sequence_max_epochs,
        max_train_seconds=settings.sequence_max_train_s,
        lr_schedule=settings.sequence_lr_schedule,
        warmup_frac=settings.sequence_warmup_frac,
    )


def load_sequence(settings: Settings, index: CatalogIndex) -> SequenceModel | None:
    """The saved next-item model (None when disabled or never trained: the `sequence` prior is 0 and the
    source empty); SequenceModelMismatch when it was trained for other catalog rows."""
    if not settings.sequence_enabled:
        return None
    model = SequenceModel.load(behaviour_dir(settings) / SEQUENCE_DIR, index.ids)
    if model is None:
        log.warning("no sequence model under %s: the sequence prior is zero", behaviour_dir(settings) / SEQUENCE_DIR)
    return model


@dataclass
class ServingState:
    """What serving reads from files: the behaviour tables, fusion weights (and calibration), the sequence
    model, and their versions. From the artifact at settings.artifact_dir when set, else from data_dir."""

    behaviour: BehaviourStats
    fusion: FusionModel
    sequence: SequenceModel | None
    versions: dict[str, str | None]


def load_serving_state(settings: Settings, index: CatalogIndex) -> ServingState:
    """With an artifact: ArtifactTampered / ArtifactCatalogMismatch (kernel.errors) refuse it."""
    if settings.artifact_dir is not None:
        from selection.artifact import load_artifact

        if settings.weights_path is not None:
            raise ConfigError("ADSELECT_WEIGHTS_PATH", "set together with ADSELECT_ARTIFACT_DIR: the artifact holds the weights; unset one")
        art = load_artifact(settings.artifact_dir, index=index)
        sequence = art.sequence if settings.sequence_enabled else None
        versions = {"weights": weights_version(art.fusion), "behaviour": art.components.get("behaviour"), "artifact": art.version}
        return ServingState(art.behaviour.aligned_to(index.ids), art.fusion, sequence, versions)
    behaviour = load_behaviour(settings, index)
    fusion = FusionModel.load(settings.resolved_weights_path())
    versions = {"weights": weights_version(fusion), "behaviour": file_version(behaviour_dir(settings) / "behaviour.json"), "artifact": None}
    return ServingState(behaviour, fusion, load_sequence(settings, index), versions)


def make_reranker(settings: Settings, *, llm_url: str) -> Reranker:
    """The LLM stage over an OpenAI-compatible server (vLLM, or the bundled llama.cpp server)."""
    from agent.llm import ChatLLM
    from agent.prompts import PromptRegistry
    from agent.reranker import LLMReranker

    registry = PromptRegistry(settings.prompts_dir)
    llm = ChatLLM.from_settings(settings, base_url=llm_url)
    return LLMReranker.from_settings(settings, llm, registry=registry)


def make_scorer(settings: Settings, *, llm_url: str):
    """Scoring mode's LLM stage (agent.scorer.LLMScorer) over the same OpenAI-compatible server."""
    from agent.logprob_llm import LogprobChatLLM
    from agent.prompts import PromptRegistry
    from agent.scorer import LLMScorer

    llm = LogprobChatLLM(base_url=llm_url, model=settings.llm_model, api_key=settings.llm_api_key, timeout_s=settings.llm_timeout_s)
    return LLMScorer.from_settings(settings, llm, registry=PromptRegistry(settings.prompts_dir))


def make_copier(settings: Settings, *, llm_url: str, reviewer: ModelTextReviewer):
    """Background rewrites of the served ad (agent.copy_cache.BackgroundCopier); every rewrite passes the
    reviewer's copy check before it is cached. Its workers start on the first request that can use it."""
    from agent.copy_cache import BackgroundCopier, CopyRewriter
    from agent.llm import ChatLLM
    from agent.prompts import PromptRegistry

    llm = ChatLLM.from_settings(settings.model_copy(update={"llm_max_tokens": settings.copy_max_tokens}), base_url=llm_url)
    rewriter = CopyRewriter.from_settings(settings, llm, registry=PromptRegistry(settings.prompts_dir))
    redis_client = None
    if settings.redis_url:  # one cache for every worker and replica (agent.copy_store)
        from selection.redis_client import redis_from_settings

        redis_client = redis_from_settings(settings)
    return BackgroundCopier.from_settings(
        settings, rewriter=rewriter, validate=lambda copy, ad: [str(r) for r in reviewer.check_copy(copy, ad)],
        redis_client=redis_client,
    )  # fmt: skip


def copier_wanted(settings: Settings) -> bool:
    """The copy cache serves rewrites in scoring mode, and in listwise mode when copy_background is set."""
    return settings.llm_mode == "score" or settings.copy_background


@dataclass
class Services:
    settings: Settings
    store: AdStore
    index: CatalogIndex
    behaviour: BehaviourStats
    fusion: FusionModel
    embedder: Embedder
    selector: Selector
    impressions: ImpressionLogWriter = field(default_factory=NullImpressionLog)
    feedback: FeedbackStore | None = None
    served: ServedQueue | None = None
    experiment: Experiment = field(default_factory=Experiment.single)
    llm_url: str | None = None

    @property
    def versions(self) -> dict[str, str | None]:
        return dict(self.selector.versions)

    def close(self) -> None:
        """Drain the impression log and the served rows (server shutdown)."""
        self.impressions.close(5.0)
        copier = getattr(self.selector, "copier", None)
        if copier is not None:
            copier.close()  # background rewrites are a cache warm-up: abandoned, not drained
        if self.served is not None:
            self.served.close()
        if self.feedback is not None:
            self.feedback.close()


def weights_version(fusion: FusionModel) -> str:
    """The content hash of fusion weights (and calibration): sha256 of their canonical JSON, 12 hex."""
    text = json.dumps(fusion.to_json() | {"meta": {}}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_version(path: Path | None) -> str | None:
    """sha256 (12 hex) of a file's bytes; None when there is no such file."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def arm_policies(
    root: Selector, experiment: Experiment, *, settings: Settings, llm_url: str | None, reranker_injected: bool
) -> dict[str, ArmPolicy]:
    """Each arm's serving policy; an arm with its own weights or prompt gets its own selector, loaded
    here once (a bad weights file raises ConfigError/ValueError: start-up or reload refuses it)."""
    out: dict[str, ArmPolicy] = {}
    for arm in experiment.arms:
        v = arm.variant
        changes: dict = {}
        if v.weights is not None:
            fusion = FusionModel.load(v.weights)
            changes.update(fusion=fusion, versions={"weights": weights_version(fusion)})
        if v.prompt is not None and llm_url and settings.llm_enabled and not reranker_injected:
            changes["reranker"] = make_reranker(settings.model_copy(update={"prompt_name": v.prompt}), llm_url=llm_url)
        sel = replace(root, arm_policies={}, **changes) if changes else None
        out[arm.name] = ArmPolicy(arm.name, exploration=v.exploration, llm=v.llm, selector=sel)
    return out


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
    index: CatalogIndex | None = None,
    impressions: ImpressionLogWriter | None = None,
) -> Services:
    """`llm_url` None and no `reranker`: the LLM stage is off (fast path only). `index`: the store's
    catalog index when the caller has already loaded it.

    serving=True adds what only live traffic needs: eligibility rules, frequency caps (SQLite under the
    data dir, or Redis), the breaker and concurrency limit, the audit log, the impression log and the
    feedback store, and the experiment's arms. Offline replay passes False."""
    if settings.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=settings.blas_threads, user_api="blas")
    store = store or make_store(settings)
    index = index if index is not None else store.load_index()
    state = load_serving_state(settings, index)
    behaviour, fusion = state.behaviour, state.fusion
    prompt_names = None
    if settings.prompts_dir.is_dir():
        prompt_names = {p.stem for p in settings.prompts_dir.iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    experiment = experiment_from_settings(settings, prompt_names=prompt_names)
    reranker_injected = reranker is not None
    embedder = embedder or make_embedder(settings)
    check_catalog_embedder(collection=settings.collection, stored=store.stored_embedder(), configured=getattr(embedder, "key", None))
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
        sequence=state.sequence,
        n_sequence=settings.n_sequence,
        exact_max_ads=settings.exact_search_max_ads,
        projected_min_ads=settings.dense_projected_min_ads,
    )
    if generator.searches_exactly():
        generator.projected()  # built at load, not by the first request
    safety: dict = {}
    loop: dict = {}
    feedback = served = None
    log_writer: ImpressionLogWriter = NullImpressionLog()
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
        if impressions is not None:
            log_writer = impressions
        elif settings.impression_log_enabled:
            log_writer = JsonlImpressionLog.from_settings(settings)
        cap_store = safety["caps"]
        feedback = FeedbackStore.from_settings(settings, on_rendered=cap_store if settings.cap_count == "rendered" else None)
        served = ServedQueue(feedback)
        loop = dict(
            impressions=log_writer,
            served_sink=served,
            hash_events=lambda events: event_hashes(events, secret=secret),
            log_sync=settings.impression_log_sync,
        )
    reviewer = ModelTextReviewer.from_settings(settings)
    scorer = copier = None
    if llm_url and settings.llm_enabled and settings.llm_mode == "score":
        scorer = make_scorer(settings, llm_url=llm_url)
    if llm_url and settings.llm_enabled and copier_wanted(settings):
        copier = make_copier(settings, llm_url=llm_url, reviewer=reviewer)
    selector = Selector(
        index=index,
        generator=generator,
        fusion=fusion,
        embedder=embedder,
        reranker=reranker if settings.llm_enabled else None,
        llm_mode=settings.llm_mode,
        scorer=scorer,
        copier=copier,
        admission=admission,
        recency_decay=settings.recency_decay,
        exclude_history=settings.exclude_history,
        llm_max_candidates=settings.llm_max_candidates,
        reviewer=reviewer,
        experiment=experiment,
        versions={
            "weights": state.versions["weights"],
            "experiment": file_version(settings.experiment_path),
            "behaviour": state.versions["behaviour"],
            "artifact": state.versions["artifact"],
        },
        **safety,
        **loop,
    )
    selector.arm_policies = arm_policies(selector, experiment, settings=settings, llm_url=llm_url, reranker_injected=reranker_injected)
    return Services(
        settings, store, index, behaviour, fusion, embedder, selector,
        impressions=log_writer, feedback=feedback, served=served, experiment=experiment, llm_url=llm_url,
    )  # fmt: skip


def reload_services(svc: Services) -> Services:
    """New services with the weights (and calibration), behaviour tables, experiment and prompts read again.

    Everything is loaded and checked first; any bad file raises `ReloadRefused` naming what failed and nothing
    changes. The caller swaps the returned object in (one reference assignment): requests in flight finish on
    the old one. Writers (impression log, feedback) and the safety stack are shared, not reopened."""
    from kernel.errors import ReloadRefused

    settings = svc.settings
    old = svc.selector

    def load(component: str, fn):
        try:
            return fn()
        except Exception as e:  # every failure of a file is a refusal; the message names it for the operator
            log.error("reload refused", extra={"component": component, "error": f"{type(e).__name__}: {e}"})
            raise ReloadRefused(component, f"{type(e).__name__}: {e}") from e

    if settings.artifact_dir is not None:
        state = load("artifact", lambda: load_serving_state(settings, svc.index))
    else:  # each file its own component, named in the refusal
        fusion = load("weights", lambda: FusionModel.load(settings.resolved_weights_path()))
        behaviour = load("behaviour", lambda: _load_behaviour_strict(settings, svc.index))
        sequence = load("sequence", lambda: load_sequence(settings, svc.index))
        state = ServingState(behaviour, fusion, sequence, {
            "weights": weights_version(fusion), "behaviour": file_version(behaviour_dir(settings) / "behaviour.json"), "artifact": None,
        })  # fmt: skip
    fusion, behaviour = state.fusion, state.behaviour
    prompt_names = None
    if settings.prompts_dir.is_dir():
        prompt_names = {p.stem for p in settings.prompts_dir.iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    experiment = load("experiment", lambda: experiment_from_settings(settings, prompt_names=prompt_names))
    stages, commit_prompts = load("prompts", lambda: reload_prompts(old, settings=settings, llm_url=svc.llm_url))
    sequence = state.sequence  # behaviour state too
    generator = replace(old.generator, behaviour=behaviour, sequence=sequence)
    selector = replace(
        old,
        **stages,
        fusion=fusion,
        generator=generator,
        experiment=experiment,
        arm_policies={},
        versions={
            "weights": state.versions["weights"],
            "experiment": file_version(settings.experiment_path),
            "behaviour": state.versions["behaviour"],
            "artifact": state.versions["artifact"],
        },
    )
    selector.arm_policies = load(
        "experiment",
        lambda: arm_policies(selector, experiment, settings=settings, llm_url=svc.llm_url, reranker_injected=svc.llm_url is None),
    )
    commit_prompts()  # everything loaded: the shared copier takes its new prompt
    log.info("reloaded", extra={"versions": selector.versions})
    return replace(svc, selector=selector, fusion=fusion, behaviour=behaviour, experiment=experiment)


def reload_prompts(old: Selector, *, settings: Settings, llm_url: str | None):
    """Every prompt the service uses, read again from settings.prompts_dir: the one reload path for them.

    Returns (the Selector fields to replace, commit): the listwise reranker (rebuilt when the service made
    it from llm_url; an injected one is kept), the scoring-mode scorer (its prompt and options again, over
    the same logprob client). The background copier is shared with the services serving now, so its
    rewriter (the copy prompt, same chat client) is switched by `commit()`, called once every file loaded.
    A missing or invalid prompt raises (PromptError): the reload is refused and nothing changes."""
    from agent.prompts import PromptRegistry

    registry = PromptRegistry(settings.prompts_dir)
    stages: dict = {}
    if old.reranker is not None and llm_url and settings.llm_enabled:
        stages["reranker"] = make_reranker(settings, llm_url=llm_url)
    if old.scorer is not None and llm_url and settings.llm_enabled:
        from agent.scorer import LLMScorer

        stages["scorer"] = LLMScorer.from_settings(settings, old.scorer.llm, registry=registry)
    copier, rewriter = old.copier, None
    if copier is not None and llm_url and settings.llm_enabled:
        from agent.copy_cache import CopyRewriter

        rewriter = CopyRewriter.from_settings(settings, copier.rewriter.llm, registry=registry)

    def commit() -> None:
        if copier is not None and rewriter is not None:
            copier.rewriter = rewriter

    return stages, commit


def _load_behaviour_strict(settings: Settings, index: CatalogIndex) -> BehaviourStats:
    """Like load_behaviour, but a manifest that is there and unreadable is an error (a reload must not
    silently swap working tables for empty ones)."""
    manifest = behaviour_dir(settings) / "behaviour.json"
    stats = BehaviourStats.load(behaviour_dir(settings), index.ids)
    if stats is None:
        if manifest.exists():
            raise ValueError(f"{manifest}: behaviour tables unreadable")
        return load_behaviour(settings, index)
    return stats
