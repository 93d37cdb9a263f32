"""The LLM systems on the LLM sample, and the position-bias check, through the endpoint's Selector.

One `Selector.aselect` call per impression (up to `concurrency` in flight; the prior stage computed
once and handed to it) gives both LLM systems:
`default+llm` is `Decision.ranking` (prior fused with the LLM term); `llm` is the LLM's own order of
the candidates it was sent, the rest after in prior order. A degraded call (timeout, invalid output)
leaves the prior order in both, as the endpoint would serve it, and is counted by reason.

Position bias: the same candidates sent again reversed and shuffled (seeded per impression); how often
the LLM's top pick changes, and where in the presented list its top pick sat.

Each record also keeps, for logged candidates, the fused score of every ranked ad and where the
clicks are (the report's calibration of `default+llm`) and, when `llm.rewrite` is on, what became of
the rewritten copy (served on the top ad or not, and the validator's and text guard's reasons).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.reasons import DegradedReason, degradation_for
from selection.pipeline import Selector, scoring_seed_key
from kernel.types import Decision, SelectRequest
from eval.config import LLMSpec
from eval.data import EvalImpression
from eval.exposure import SLATE_K
from agent.local_server import LazyLocalServer
from eval.llm_cache import CachingChatLLM, LLMCache
from eval.rankers import impression_rng

log = logging.getLogger(__name__)

# Per impression, the LLM calls its serving decision made: [calls, cache misses, LLM ms of the misses].
# Set by `_one` around `Selector.aselect` (a context variable follows the impression's task and the
# tasks it spawns, so concurrent impressions never mix); counted by `CallCounter`.
_CALLS: ContextVar[list[float] | None] = ContextVar("eval_llm_calls", default=None)


class CallCounter:
    """ChatLLMLike over the caching client: counts the calls of the impression being served (`_CALLS`);
    a cache hit (latency 0) is a call but not a miss."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def stats(self):
        """The caching client's counters (eval.distributed adds its actors' counts to them)."""
        return getattr(self.inner, "stats", None)

    async def acomplete(self, messages, *, schema, timeout_s):
        c = await self.inner.acomplete(messages, schema=schema, timeout_s=timeout_s)
        counter = _CALLS.get()
        if counter is not None:
            counter[0] += 1
            if c.latency_ms > 0:
                counter[1] += 1
                counter[2] += c.latency_ms
        return c


def decoding_params(spec: LLMSpec) -> dict[str, Any]:
    return {
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
        "structured": spec.structured,
        "max_candidates": spec.max_candidates,
        "rewrite": spec.rewrite,
    }


@dataclass
class LLMStack:
    reranker: Any  # agent.reranker.LLMReranker
    llm: CachingChatLLM
    prompt_info: dict[str, str]
    model: str
    url: str
    server: LazyLocalLLM | None  # the bundled llama.cpp server, started on the first cache miss

    @property
    def served_by(self) -> dict[str, str | None]:
        if self.server is not None:
            return {"url": self.server.url, "gguf": self.server.gguf, "local": "llama_cpp.server (started on first cache miss)"}
        return {"url": self.url or None, "gguf": None, "local": None}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        elif hasattr(self.llm.inner, "close"):
            self.llm.inner.close()
        if self.llm.cache is not None:
            self.llm.cache.close()


def build_llm_stack(
    spec: LLMSpec,
    *,
    data_dir: Path,
    prompts_dir: Path,
    settings=None,
    inner=None,
    cache_path: Path | None = None,
) -> LLMStack:
    """Reranker over a caching wrapper over the chat client; starts the bundled server when no URL is set.

    `inner` replaces the chat client (tests pass a fake with the ChatLLMLike interface); `cache_path`
    replaces the cache file (default data_dir/eval/llm_cache.sqlite).
    """
    from agent.prompts import PromptRegistry
    from agent.reranker import LLMReranker

    prompt = PromptRegistry(prompts_dir).get(spec.prompt)
    server = None
    if inner is None:
        if spec.url:
            inner = _chat_client(spec, spec.url)
        else:
            server = LazyLocalLLM(spec, settings)
            inner = server
    cache = LLMCache(cache_path or Path(data_dir) / "eval" / "llm_cache.sqlite") if spec.cache else None
    llm = CachingChatLLM(inner, cache, prompt_sha256=prompt.sha256, decoding=decoding_params(spec))
    # The endpoint's prompt options (selection.services.make_reranker → LLMReranker.from_settings), so eval measures
    # what the service sends; only the candidate count comes from the task.
    from kernel.settings import Settings

    opts = settings if settings is not None else Settings(_env_file=None)
    reranker = LLMReranker(
        CallCounter(llm),
        prompt,
        max_candidates=spec.max_candidates,
        max_text_chars=opts.llm_max_text_chars,
        max_ranked=opts.llm_max_ranked,
        alias_ids=opts.llm_alias_ids,
    )
    return LLMStack(reranker, llm, prompt.info(), inner.model, spec.url or "", server)


def _chat_client(spec: LLMSpec, url: str):
    from agent.llm import ChatLLM

    return ChatLLM(
        base_url=url,
        model=spec.model,
        structured=spec.structured,
        temperature=spec.temperature,
        max_tokens=spec.max_tokens,
        timeout_s=spec.timeout_s,
    )


class LazyLocalLLM(LazyLocalServer):
    """The bundled llama.cpp server for one LLM spec (its model alias and decoding), started on the first
    call that misses the cache: a re-run answered wholly from the cache never starts a server. Every user of
    the shared server (its own calls, SharedServerClient, scoring-mode variants) starts it with `ensure()`."""

    def __init__(self, spec: LLMSpec, settings=None):
        from kernel.settings import Settings

        self.spec = spec
        s = (settings or Settings()).model_copy(update={"llm_model": spec.model})
        super().__init__(s, lambda url: _chat_client(spec, url), model=spec.model)


class SharedServerClient:
    """ChatLLMLike with its own decoding (a variant's) over a LazyLocalLLM another stack owns: one bundled
    server for every variant of a run. `close` closes this client only; the owner stops the server."""

    def __init__(self, server: LazyLocalLLM, spec: LLMSpec):
        self.server, self.spec = server, spec
        self._client = None
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.spec.model

    def _chat(self):
        url = self.server.ensure()
        with self._lock:
            if self._client is None:
                self._client = _chat_client(self.spec, url)
            return self._client

    async def acomplete(self, messages, *, schema, timeout_s):
        client = self._client or await asyncio.to_thread(self._chat)
        return await client.acomplete(messages, schema=schema, timeout_s=timeout_s)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None


def decision_scores(decision: Decision, clicked: frozenset[str]) -> dict[str, list]:
    """The fused score of every ad of the decision, in served order, and where the clicks are: the
    report's pCTR of `default+llm` is fusion.pctr(score), as `RankedAd.pctr` (kept from the score
    because `RankedAd.pctr` is rounded to 6 decimals, and log loss needs tiny probabilities)."""
    return {
        "default+llm": [a.score for a in decision.ads],
        "clicked_at": [k for k, a in enumerate(decision.ads) if a.ad.ad_id in clicked],
    }


def rewrite_outcome(decision: Decision) -> dict[str, Any]:
    """What became of the requested rewrite in one decision.

    `top_served`: the top ad (Decision.ads[0]) shows rewritten copy. `copy_ok`: some ad of the decision
    does (the LLM writes copy for one ad; when that ad is not first, the copy passed but is shown only
    where that ad is). `rejections`: Decision.copy_rejections (copy validator reasons, and
    `justification_*` from the text guard)."""
    top = decision.ads[0] if decision.ads else None
    return {
        "top_served": top is not None and top.copy != top.original,
        "copy_ok": any(a.copy != a.original for a in decision.ads),
        "rejections": list(decision.copy_rejections),
    }


def _llm_ranking(decision, prior_ids: list[str]) -> list[str]:
    ranked = sorted((a.llm_rank, a.ad.ad_id) for a in decision.ads if a.llm_rank is not None)
    head = [i for _, i in ranked]
    seen = set(head)
    return head + [i for i in prior_ids if i not in seen]


async def _top_pick(
    selector: Selector, stage, cands, *, timeout_s: float, rewrite: bool, seed_key: str
) -> tuple[str | None, str | None]:  # fmt: skip
    """The LLM stage's top pick for `cands` in this order: listwise's first ranked id, or in scoring mode
    the scorer's own first (with the serving decision's seed key, so the shown orders are the ones serving
    chose); (None, reason) on a failure."""
    try:
        if selector.llm_mode == "score":
            sc = await asyncio.wait_for(
                selector.scorer.ascore(history_ads=stage.history_ads, events=[], candidates=cands, timeout_s=timeout_s, seed_key=seed_key),
                timeout=timeout_s,
            )
            if not sc.answered:
                return None, str(DegradedReason.LLM_INVALID_OUTPUT)
            return sc.ranking()[0], None
        res = await asyncio.wait_for(
            selector.reranker.arerank(history_ads=stage.history_ads, events=[], candidates=cands, timeout_s=timeout_s, rewrite=rewrite),
            timeout=timeout_s,
        )
    except Exception as e:  # noqa: BLE001 - any failure of the LLM stage is a degradation, named by type
        return None, str(degradation_for(e))
    return (res.ranking[0] if res.ranking else None), None


async def _one(
    imp: EvalImpression,
    *,
    selector: Selector,
    spec: LLMSpec,
    seed: int,
    position_bias: bool,
    sem: asyncio.Semaphore,
    metrics_of: Callable[[EvalImpression, dict[str, list[str]], int | None], dict[str, dict[str, float | None]]],
    pool_size: int | None,
    phase: str = "llm",
) -> dict[str, Any]:
    timeout_ms = int(spec.timeout_s * 1000)
    req = SelectRequest(
        user_id=imp.user_id,
        history=imp.history,
        candidates=imp.candidates,
        # Every candidate the LLM is sent must come back in Decision.ads with its llm_rank.
        k=max(len(imp.candidates or ()), selector.llm_max_candidates),
        deadline_ms=timeout_ms,
        use_llm=True,
        rewrite=spec.rewrite,
        request_id=imp.impression_id,
    )
    async with sem:
        stage = await asyncio.to_thread(selector.prior_stage, req)
        prior_ids = [c.ad.ad_id for c in stage.candidates] + stage.tail_ids
        t = time.perf_counter()
        counter = [0, 0, 0.0]
        token = _CALLS.set(counter)
        try:
            decision = await selector.aselect(req, stage=stage)
        finally:
            _CALLS.reset(token)
        llm_ms = (time.perf_counter() - t) * 1000
        rankings = {"default+llm": decision.ranking, "llm": _llm_ranking(decision, prior_ids) if decision.llm_used else prior_ids}
        rec: dict[str, Any] = {
            "phase": phase,
            "impression_id": imp.impression_id,
            "metrics": metrics_of(imp, rankings, pool_size),
            "top": {s: r[:SLATE_K] for s, r in rankings.items()},  # the served slate of each system: exposure
            "llm_used": decision.llm_used,
            "degraded_reason": decision.degraded_reason,
            "sent": prior_ids[: selector.llm_max_candidates],
            "llm_top": rankings["llm"][0] if decision.llm_used and rankings["llm"] else None,
            "llm_ranking": [a for a in rankings["llm"][: selector.llm_max_candidates]] if decision.llm_used else None,
            "latency_ms": round(llm_ms, 1),
            "usage": decision.usage,
            # scoring calls (one-token logprob requests) bypass the cached client: counted from the decision
            "llm_calls": {"calls": counter[0], "misses": counter[1], "llm_ms": round(counter[2], 1)}
            if counter[0] or selector.llm_mode != "score"
            else {"calls": decision.usage.get("llm_calls", 0), "misses": decision.usage.get("llm_calls", 0), "llm_ms": round(llm_ms, 1)},
        }
        if imp.candidates is not None:
            rec["scores"] = decision_scores(decision, imp.clicked)
        if spec.rewrite:
            rec["rewrite"] = rewrite_outcome(decision)
        if position_bias and len(stage.candidates) >= 2:
            sent = stage.candidates[: selector.llm_max_candidates]
            rng = impression_rng(seed + 1, imp.impression_id)
            shuffled = [sent[i] for i in rng.permutation(len(sent))]
            bias: dict[str, Any] = {"prior": {"top": rec["llm_top"], "error": decision.degraded_reason}}
            for name, cands in (("reversed", sent[::-1]), ("shuffled", shuffled)):
                top, err = await _top_pick(selector, stage, cands, timeout_s=spec.timeout_s, rewrite=spec.rewrite, seed_key=scoring_seed_key(req))
                bias[name] = {"top": top, "error": err, "order": [c.ad.ad_id for c in cands]}
            bias["prior"]["order"] = [c.ad.ad_id for c in sent]
            rec["position_bias"] = bias
    return rec


async def run_llm_phase(
    items: list[EvalImpression],
    *,
    selector: Selector,
    spec: LLMSpec,
    seed: int,
    metrics_of,
    pool_size_of: Callable[[EvalImpression], int | None],
    on_result: Callable[[dict[str, Any]], None],
    progress=None,
    phase: str = "llm",
) -> float:
    """Run every impression (concurrently up to spec.concurrency); `on_result` gets each record as it finishes."""
    sem = asyncio.Semaphore(spec.concurrency)
    t0 = time.perf_counter()

    async def guarded(imp: EvalImpression) -> None:
        rec = await _one(
            imp, selector=selector, spec=spec, seed=seed, position_bias=spec.position_bias, sem=sem,
            metrics_of=metrics_of, pool_size=pool_size_of(imp), phase=phase,
        )  # fmt: skip
        on_result(rec)
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(guarded(i) for i in items))
    return time.perf_counter() - t0
