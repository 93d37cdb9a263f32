"""Copy off the hot path: validated rewrites in a cache, produced by a bounded background queue on a miss.

    copier = BackgroundCopier(rewriter=CopyRewriter.from_settings(settings, copy_llm),
                              validate=lambda copy, ad: validate_copy(copy, ad).reasons,
                              cache=CopyCache(max_entries=settings.copy_cache_entries),
                              queue_size=settings.copy_queue_size, workers=settings.copy_workers)
    async with copier:                            # starts the workers on the running loop
        copy = copier.lookup(ad, interest_key(history_ads))   # never waits; None = serve the advertiser's copy

* The cache key is (ad content hash, coarse user-interest key, prompt sha256, model): a new prompt, a
  new model or an edited ad never serves an old rewrite.
* On a miss `lookup` enqueues one rewrite and returns None at once. Drop policy: when the queue is
  full the new miss is dropped (drop-newest, counted in `dropped_full`); nothing queued is evicted and
  nothing waits. A key already queued or being generated is not queued again (`deduped`).
* Every rewrite passes the injected `validate(copy, ad) -> reasons` before it is cached; a rejected
  rewrite is cached as a rejection (the same prompt and model would write it again), so it is not
  regenerated and never served. An LLM failure is counted by reason and not cached (a later miss retries).
* The worker enforces the rewrite deadline itself (a hung server cannot hold a worker longer) and
  survives any exception.
* `lookup` may be called from any thread (the pipeline serves from a worker thread): the cache and the
  counts sit behind one lock, and a miss is handed to the event loop the copier was started on with
  `call_soon_threadsafe`. The queue bound (`queue_size` rewrites waiting, not yet taken by a worker) is
  checked under that lock at lookup time, so the drop decision is made at once, on the caller's thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kernel.errors import LLMOutputInvalid, LLMUnavailable, PromptError
from kernel.types import Ad, Copy

from .ad_content import ad_content_hash
from .schema import DESCRIPTION_MAX, HEADLINE_MAX
from .llm import ChatLLMLike
from .prompts import PromptRegistry, PromptTemplate, neutralise

if TYPE_CHECKING:
    from kernel.settings import Settings

    from .copy_store import SharedCopyCache

logger = logging.getLogger(__name__)

Validate = Callable[[Copy, Ad], Sequence[str]]
PROMPT_VARIABLES = frozenset({"title", "text", "interest"})
INTEREST_ITEMS = 5  # history ads the interest key looks at (the most recent ones)
COPY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "headline": {"type": "string", "maxLength": HEADLINE_MAX},
        "description": {"type": "string", "maxLength": DESCRIPTION_MAX},
    },
    "required": ["headline", "description"],
    "additionalProperties": False,
}


def interest_key(history_ads: Sequence[Ad], *, items: int = INTEREST_ITEMS) -> str:
    """A coarse user interest: the most frequent category among the last `items` history ads (the most
    recent wins a tie), case-folded; "" when none has a category. Coarse on purpose: many users share it."""
    recent = [ad.category.strip().casefold() for ad in list(history_ads)[-items:] if ad.category.strip()]
    if not recent:
        return ""
    counts = Counter(recent)
    best = max(counts.values())
    return next(c for c in reversed(recent) if counts[c] == best)


@dataclass(frozen=True, slots=True)
class CopyKey:
    ad_hash: str
    interest: str
    prompt_sha256: str
    model: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A rewrite the validator refused: cached so it is not regenerated, never served."""

    reasons: tuple[str, ...]


class CopyCache:
    """An in-memory LRU of validated rewrites and rejections by CopyKey (one process's; agent.copy_store.SharedCopyCache
    puts Redis behind it for every worker and replica)."""

    def __init__(self, *, max_entries: int = 10000):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.errors: Counter[str] = Counter()  # an in-memory cache has no store to fail (SharedCopyCache counts Redis's)
        self._items: OrderedDict[CopyKey, Copy | Rejected] = OrderedDict()
        self._lock = threading.Lock()  # read on the serving threads, written by the workers on the event loop

    def get(self, key: CopyKey) -> Copy | Rejected | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: CopyKey, item: Copy | Rejected) -> None:
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def claim(self, key: CopyKey) -> bool:
        """Whether this process should generate `key`: always (the copier's own `_pending` dedupes within it)."""
        return True

    def release(self, key: CopyKey) -> None:
        """Give a claim back after a failed rewrite: nothing to do in one process."""

    def __len__(self) -> int:
        return len(self._items)


class _RewriteOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    headline: str
    description: str


class CopyRewriter:
    """One short rewrite of one ad for one interest: prompt → chat call (the client's max_tokens is the cap) → Copy."""

    def __init__(self, llm: ChatLLMLike, prompt: PromptTemplate, *, timeout_s: float = 20.0, max_text_chars: int = 300):
        if set(prompt.variables) != PROMPT_VARIABLES:
            raise PromptError(f"prompt {prompt.name!r} declares {sorted(prompt.variables)}; the rewriter fills {sorted(PROMPT_VARIABLES)}")
        self.llm, self.prompt, self.timeout_s, self.max_text_chars = llm, prompt, timeout_s, max_text_chars

    @classmethod
    def from_settings(cls, settings: Settings, llm: ChatLLMLike, *, registry: PromptRegistry | None = None) -> CopyRewriter:
        """`llm` should be a client built with max_tokens=settings.copy_max_tokens (the token cap of a rewrite)."""
        registry = registry or PromptRegistry(settings.prompts_dir)
        return cls(llm, registry.get(settings.copy_prompt_name), timeout_s=settings.copy_timeout_s)

    def key(self, ad: Ad, interest: str) -> CopyKey:
        return CopyKey(ad_hash=ad_content_hash(ad), interest=interest, prompt_sha256=self.prompt.sha256, model=self.llm.model)

    async def rewrite(self, ad: Ad, interest: str) -> Copy:
        """Raises LLMUnavailable (including "timeout" at `timeout_s`) or LLMOutputInvalid."""
        messages = self.prompt.render(
            title=neutralise(ad.title, 120), text=neutralise(ad.text, self.max_text_chars), interest=neutralise(interest, 60)
        )
        try:
            completion = await asyncio.wait_for(
                self.llm.acomplete(messages, schema=COPY_SCHEMA, timeout_s=self.timeout_s), timeout=self.timeout_s
            )
        except TimeoutError as e:
            raise LLMUnavailable("timeout", "background rewrite") from e
        try:
            out = _RewriteOut.model_validate(json.loads(completion.text))
        except (ValueError, ValidationError) as e:
            reason = "truncated" if completion.finish_reason == "length" else "malformed_json"
            raise LLMOutputInvalid(reason, raw=completion.text, detail=type(e).__name__) from None
        return Copy(headline=out.headline.strip(), description=out.description.strip())


@dataclass
class CopyStats:
    lookups: int = 0
    hits: int = 0  # a validated rewrite was returned
    rejected_hits: int = 0  # the key holds a rejection: the advertiser's copy is served, nothing queued
    misses: int = 0
    enqueued: int = 0
    deduped: int = 0  # the key was already queued or being generated
    shared_deduped: int = 0  # another worker or replica holds the key's claim, or has cached it since (shared cache)
    dropped_full: int = 0  # the queue was full: the miss was dropped (drop-newest)
    dropped_stopped: int = 0  # no worker running (before start / after close)
    generated: int = 0  # rewrites that passed the validator and were cached
    rejected: int = 0  # rewrites the validator refused (cached as rejections)
    failed: Counter[str] = field(default_factory=Counter)  # LLM failures by reason (not cached)

    def as_dict(self) -> dict[str, Any]:
        """For /metrics and eval reports: counts, the hit rate and the share of lookups served a rewrite."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "failed"}
        out["failed"] = dict(self.failed)
        out["hit_rate"] = self.hits / self.lookups if self.lookups else 0.0
        return out


class BackgroundCopier:
    """Cache lookups on the hot path; rewrites for misses on a bounded queue served by background workers."""

    def __init__(
        self, *, rewriter: CopyRewriter, validate: Validate, cache: CopyCache | SharedCopyCache | None = None, queue_size: int = 64, workers: int = 1
    ):
        if queue_size < 1 or workers < 1:
            raise ValueError("queue_size and workers must be >= 1")
        self.rewriter, self.validate = rewriter, validate
        self.cache = cache if cache is not None else CopyCache()
        self.queue_size, self.workers = queue_size, workers
        self.stats = CopyStats()
        self._queue: asyncio.Queue[tuple[CopyKey, Ad, str]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # stats, _pending and _waiting: lookups come from serving threads
        self._waiting = 0  # rewrites queued and not yet taken by a worker (at most queue_size)
        self._pending: set[CopyKey] = set()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: Settings, *, rewriter: CopyRewriter, validate: Validate, redis_client: Any = None) -> BackgroundCopier:
        """`redis_client`: the cache is shared through it by every worker and replica (agent.copy_store)."""
        cache: CopyCache | SharedCopyCache = CopyCache(max_entries=settings.copy_cache_entries)
        if redis_client is not None:
            from .copy_store import SharedCopyCache

            # a claim outlives the rewrite deadline by a second, so a slow rewrite is not started twice
            cache = SharedCopyCache(redis_client, local=cache, ttl_s=settings.copy_cache_ttl_s, claim_s=settings.copy_timeout_s + 1.0)
        return cls(
            rewriter=rewriter, validate=validate, cache=cache,
            queue_size=settings.copy_queue_size, workers=settings.copy_workers,
        )  # fmt: skip

    def lookup(self, ad: Ad, interest: str) -> Copy | None:
        """The cached validated rewrite, else None (and a rewrite is queued unless full/duplicate). Never waits;
        callable from any thread."""
        key = self.rewriter.key(ad, interest)
        item = self.cache.get(key)
        with self._lock:
            self.stats.lookups += 1
            if isinstance(item, Copy):
                self.stats.hits += 1
                return item
            if isinstance(item, Rejected):
                self.stats.rejected_hits += 1
                return None
            self.stats.misses += 1
            loop, queue = self._loop, self._queue
            if key in self._pending:
                self.stats.deduped += 1
                return None
            if loop is None or queue is None or loop.is_closed():
                self.stats.dropped_stopped += 1
                return None
            if self._waiting >= self.queue_size:
                self.stats.dropped_full += 1
                logger.info("copy queue full: miss dropped", extra={"queue_size": self.queue_size})
                return None
            self._pending.add(key)
            self._waiting += 1
            self.stats.enqueued += 1
        job = (key, ad, interest)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            queue.put_nowait(job)
        else:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, job)
            except RuntimeError:  # the loop closed between the check and the hand-off
                with self._lock:
                    self._pending.discard(key)
                    self._waiting -= 1
                    self.stats.enqueued -= 1
                    self.stats.dropped_stopped += 1
        return None

    def cached_copy(self, ad: Ad, *, history_ads: Sequence[Ad]) -> Copy | None:
        """`lookup` for the user whose history this is (its coarse interest key): what the pipeline calls."""
        return self.lookup(ad, interest_key(history_ads))

    def snapshot(self) -> dict[str, Any]:
        """The counts as one consistent dict (for /metrics, eval reports), taken under the lock; `store_errors`:
        the cache's store failures by operation (a shared cache's Redis; always empty in memory)."""
        with self._lock:
            out = self.stats.as_dict()
        out["store_errors"] = dict(self.cache.errors)
        return out

    async def start(self) -> None:
        """Start the workers on the running loop (idempotent: the pipeline calls it before each lookup)."""
        if self._queue is not None:
            return
        self._queue = asyncio.Queue()  # bounded by `_waiting` at lookup time (see the module doc)
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._work(), name=f"copy-worker-{i}") for i in range(self.workers)]

    async def drain(self) -> None:
        """Wait until every queued rewrite is done (each is bounded by the rewrite deadline)."""
        if self._queue is not None:
            await asyncio.sleep(0)  # hand-offs from other threads already scheduled on this loop land first
            await self._queue.join()

    def _stop(self) -> list[asyncio.Task[None]]:
        with self._lock:
            tasks, self._tasks, self._queue, self._loop = self._tasks, [], None, None
            self._pending.clear()
            self._waiting = 0
        for task in tasks:
            task.cancel()
        return tasks

    def close(self) -> None:
        """Cancel the workers without waiting (synchronous shutdown code on their loop); queued rewrites are abandoned."""
        self._stop()

    async def aclose(self) -> None:
        """Stop the workers and wait for them; queued rewrites are abandoned."""
        for task in self._stop():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> BackgroundCopier:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            key, ad, interest = await queue.get()
            with self._lock:
                self._waiting -= 1
            claimed = False
            try:
                # a shared cache: one worker (of all processes) generates a key; it may have landed since the miss
                claimed = await asyncio.to_thread(self.cache.claim, key)
                if not claimed or await asyncio.to_thread(self.cache.get, key) is not None:
                    self._count("shared_deduped")
                    continue
                copy = await self.rewriter.rewrite(ad, interest)
                reasons = list(self.validate(copy, ad))
                if reasons:
                    await asyncio.to_thread(self.cache.put, key, Rejected(tuple(reasons)))
                    self._count("rejected")
                    logger.info("background rewrite rejected", extra={"ad_id": ad.ad_id, "reasons": reasons})
                else:
                    await asyncio.to_thread(self.cache.put, key, copy)  # a shared cache writes Redis: off the loop
                    self._count("generated")
            except (LLMUnavailable, LLMOutputInvalid) as e:
                self._count(failed=e.reason)
                logger.info("background rewrite failed", extra={"ad_id": ad.ad_id, "reason": e.reason})
                await asyncio.to_thread(self.cache.release, key)  # not cached: another worker may try it
            except Exception:  # noqa: BLE001 - a worker must outlive any bug in one rewrite
                self._count(failed="error")
                logger.exception("background rewrite crashed", extra={"ad_id": ad.ad_id})
                if claimed:
                    await asyncio.to_thread(self.cache.release, key)
            finally:
                with self._lock:
                    self._pending.discard(key)
                queue.task_done()

    def _count(self, name: str = "", *, failed: str = "") -> None:
        with self._lock:
            if failed:
                self.stats.failed[failed] += 1
            else:
                setattr(self.stats, name, getattr(self.stats, name) + 1)
