"""An on-disk cache of LLM completions, as a wrapper with the same interface as agent.llm.ChatLLM.

`CachingChatLLM(inner, cache, prompt_sha256=..., decoding=...)` implements ChatLLMLike, so the
reranker and the Selector do not know it is there. The key is the sha256 of (prompt sha256, model,
decoding parameters, the exact rendered messages — which include the candidate list in the order
sent — and the output schema). Only successful completions are stored; a failure is never cached.
The store is one SQLite file under the data dir, safe for concurrent callers of one process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.llm import ChatLLMLike, Completion, Message

log = logging.getLogger(__name__)


def _message_dict(m: Message) -> dict[str, str]:
    if isinstance(m, dict):
        return {"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
    return {"role": str(getattr(m, "type", "")), "content": str(getattr(m, "content", ""))}


def cache_key(
    *, prompt_sha256: str, model: str, decoding: dict[str, Any], messages: Sequence[Message], schema: dict[str, Any]
) -> str:
    doc = {
        "prompt_sha256": prompt_sha256,
        "model": model,
        "decoding": decoding,
        "messages": [_message_dict(m) for m in messages],
        "schema": schema,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class LLMCache:
    """key -> Completion, in SQLite."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, model TEXT, completion TEXT, created REAL DEFAULT (julianday('now')))"
        )

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT completion FROM completions WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        d = json.loads(row[0])
        return Completion(
            text=d["text"],
            prompt_tokens=d.get("prompt_tokens"),
            completion_tokens=d.get("completion_tokens"),
            latency_ms=0.0,
            model=d.get("model", ""),
            finish_reason=d.get("finish_reason"),
        )

    def put(self, key: str, c: Completion) -> None:
        doc = {
            "text": c.text,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "latency_ms": c.latency_ms,
            "model": c.model,
            "finish_reason": c.finish_reason,
        }
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO completions (key, model, completion) VALUES (?, ?, ?)",
                (key, c.model, json.dumps(doc, ensure_ascii=False)),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0  # calls that failed (not cached)

    @property
    def calls(self) -> int:
        return self.hits + self.misses

    def to_dict(self) -> dict[str, Any]:
        calls = self.calls
        return {
            "hits": self.hits,
            "misses": self.misses,
            "errors": self.errors,
            "hit_rate": (self.hits / calls) if calls else None,
        }


class CachingChatLLM:
    """ChatLLMLike: answers from the cache when the exact same call was made before, else asks `inner`."""

    def __init__(
        self,
        inner: ChatLLMLike,
        cache: LLMCache | None,
        *,
        prompt_sha256: str,
        decoding: dict[str, Any],
    ):
        self.inner = inner
        self.cache = cache
        self.prompt_sha256 = prompt_sha256
        self.decoding = dict(decoding)
        self.stats = CacheStats()
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.inner.model

    def key(self, messages: Sequence[Message], schema: dict[str, Any]) -> str:
        return cache_key(
            prompt_sha256=self.prompt_sha256, model=self.inner.model, decoding=self.decoding, messages=messages, schema=schema
        )

    def _lookup(self, key: str) -> Completion | None:
        hit = self.cache.get(key) if self.cache is not None else None
        with self._lock:
            if hit is not None:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        return hit

    def _store(self, key: str, c: Completion) -> None:
        if self.cache is not None:
            self.cache.put(key, c)

    def _failed(self) -> None:
        with self._lock:
            self.stats.errors += 1

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        key = self.key(messages, schema)
        hit = self._lookup(key)
        if hit is not None:
            return hit
        try:
            c = await self.inner.acomplete(messages, schema=schema, timeout_s=timeout_s)
        except BaseException:
            self._failed()
            raise
        self._store(key, c)
        return c
