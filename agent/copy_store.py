"""The copy cache shared by every worker and replica: the in-process LRU (agent.copy_cache.CopyCache) in front of Redis.

Without it each `adselect serve` worker (and each replica) keeps its own cache, so every one of them pays an LLM
call for the same (ad, interest, prompt, model) rewrite and starts cold after a restart. With `redis_url` set:

* `get` reads the local LRU, then Redis (one GET on a local miss); a Redis hit is kept locally.
* `put` writes both; Redis keeps an entry `ttl_s` seconds (rejections too: the same prompt and model would write
  the same rejected copy again).
* `claim` is taken by the background worker before it calls the LLM: `SET NX` with the rewrite deadline as its
  expiry, so workers that miss the same key at once make one call between them; the others drop their job
  (`BackgroundCopier` counts it as `shared_deduped`) and a later lookup finds the rewrite. `release` gives a claim
  back when the rewrite failed, so another worker may retry.
* Redis failures never fail a request or a rewrite: a failed read is a miss, a failed write stays local, a failed
  claim generates locally (the process's own dedupe still holds). Each is counted in `errors` by operation.

Entries are JSON ({"headline", "description"} or {"rejected": [reasons]}) under `prefix` + sha256 of the key's
fields, so a new prompt, model or ad edit is a new entry, exactly as in the local cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from typing import Any

from kernel.types import Copy

from .copy_cache import CopyCache, CopyKey, Rejected

logger = logging.getLogger(__name__)

PREFIX = "adselect:copy:"


def redis_key(key: CopyKey, *, prefix: str = PREFIX) -> str:
    fields = json.dumps([key.ad_hash, key.interest, key.prompt_sha256, key.model], ensure_ascii=False)
    return prefix + hashlib.sha256(fields.encode()).hexdigest()


def encode(item: Copy | Rejected) -> str:
    if isinstance(item, Rejected):
        return json.dumps({"rejected": list(item.reasons)}, ensure_ascii=False)
    return json.dumps({"headline": item.headline, "description": item.description}, ensure_ascii=False)


def decode(raw: bytes | str) -> Copy | Rejected:
    """ValueError for anything that is not an entry `encode` wrote."""
    d = json.loads(raw)
    if not isinstance(d, dict):
        raise ValueError("copy entry is not an object")
    if "rejected" in d:
        return Rejected(tuple(str(r) for r in d["rejected"]))
    if not isinstance(d.get("headline"), str) or not isinstance(d.get("description"), str):
        raise ValueError("copy entry lacks headline/description")
    return Copy(headline=d["headline"], description=d["description"])


class SharedCopyCache:
    """CopyCache's interface (get/put/claim/release/errors/len) over a local LRU and an injected Redis client."""

    def __init__(self, client: Any, *, local: CopyCache, ttl_s: float, claim_s: float, prefix: str = PREFIX):
        if ttl_s <= 0 or claim_s <= 0:
            raise ValueError("ttl_s and claim_s must be > 0")
        self.client, self.local = client, local
        self.ttl_s, self.claim_s, self.prefix = ttl_s, claim_s, prefix
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _error(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.errors[op] += 1
        logger.warning("shared copy cache %s failed", op, extra={"error": type(exc).__name__})

    def get(self, key: CopyKey) -> Copy | Rejected | None:
        item = self.local.get(key)
        if item is not None:
            return item
        import redis

        try:
            raw = self.client.get(redis_key(key, prefix=self.prefix))
        except redis.RedisError as e:
            self._error("get", e)
            return None
        if raw is None:
            return None
        try:
            item = decode(raw)
        except ValueError as e:  # not ours (or damaged): a miss; the rewrite will overwrite it
            self._error("decode", e)
            return None
        self.local.put(key, item)
        return item

    def put(self, key: CopyKey, item: Copy | Rejected) -> None:
        self.local.put(key, item)
        import redis

        try:
            self.client.set(redis_key(key, prefix=self.prefix), encode(item), px=int(self.ttl_s * 1000))
        except redis.RedisError as e:
            self._error("put", e)

    def claim(self, key: CopyKey) -> bool:
        """True: this process generates the key (it holds the claim, or Redis could not be asked)."""
        import redis

        try:
            return bool(self.client.set(self._claim_key(key), "1", nx=True, px=int(self.claim_s * 1000)))
        except redis.RedisError as e:
            self._error("claim", e)
            return True

    def release(self, key: CopyKey) -> None:
        import redis

        try:
            self.client.delete(self._claim_key(key))
        except redis.RedisError as e:
            self._error("release", e)

    def _claim_key(self, key: CopyKey) -> str:
        return redis_key(key, prefix=self.prefix + "claim:")

    def __len__(self) -> int:
        return len(self.local)
