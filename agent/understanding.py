"""Ad understanding at ingest: one LLM pass per ad → a validated record (category, tags, claims, summary).

    store = UnderstandingStore(data_dir / "understanding")
    understander = AdUnderstander.from_settings(settings, llm, store=store, taxonomy=None)
    report = understander.run(ads)          # tqdm bar; batched, concurrent, resumable
    record = store.get(understander.key(ad))  # AdUnderstanding | None

* Cached by key = sha256(ad content hash, prompt sha256, model, taxonomy): on disk, one append-only
  JSONL file (`understanding.jsonl`), a line per finished ad, appended as each ad finishes; an
  interrupted run resumes where it stopped, and a torn last line is skipped (counted).
* The model's answer is JSON constrained by a schema (llama.cpp: grammar; vLLM: structured outputs)
  and validated by pydantic (extra="forbid"). An answer that fails is stored as a counted failure
  with its reason (the same prompt and model would fail again: a re-run is a cache hit; pass
  `retry_invalid=True` to try again). An unavailable LLM is counted and not stored (a re-run retries).
* A claim is kept only if its text appears in the ad's title or text (`grounded_claims`); the
  others are dropped and counted (a small model invents offers).
* `taxonomy` (e.g. a catalog's editor categories) restricts `category` to that list (a schema enum).

At ingest (`adselect ingest --understand`, `AdUnderstander.enrich`) each record is stored with its ad,
in `Ad.metadata["understanding"]` (`to_metadata`: the record plus `category_source: "extracted"`), which
the Chroma metadata carries. Read back with `understanding_of(ad)`; it is used by the copy validator (a
rewrite's claim must be among the extracted claims and in the source text), by the category block
lists (`extracted_category`: an ad without a category of its own) and, with
`summary_in_document`, by the retrieval document (`kernel.types.DOCUMENT_EXTRA_KEY`).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from kernel.errors import LLMOutputInvalid, LLMUnavailable, PromptError
from kernel.types import DOCUMENT_EXTRA_KEY, Ad

from .ad_content import ad_content_hash
from .llm import ChatLLMLike
from .prompts import PromptRegistry, PromptTemplate, neutralise

if TYPE_CHECKING:
    from kernel.settings import Settings

logger = logging.getLogger(__name__)

PROMPT_VARIABLES = frozenset({"title", "text", "taxonomy"})
STORE_FILE = "understanding.jsonl"
UNDERSTANDING_DIR = "understanding"  # the store's folder under data_dir
METADATA_KEY = "understanding"  # Ad.metadata key the ingest stores the record under
EXTRACTED = "extracted"  # category_source of a category the LLM extracted (not the advertiser's)
MAX_TAGS, MAX_CLAIMS = 5, 4
TAG_CHARS, CATEGORY_CHARS, CLAIM_CHARS, SUMMARY_CHARS = 40, 60, 80, 160
ClaimKind = Literal["price", "feature", "offer"]


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClaimKind
    text: str = Field(min_length=1, max_length=CLAIM_CHARS)


class AdUnderstanding(BaseModel):
    """What the LLM extracted from one ad (stored with the ad; `category` is marked extracted by the caller)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    category: str = Field(min_length=1, max_length=CATEGORY_CHARS)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    claims: list[Claim] = Field(default_factory=list, max_length=MAX_CLAIMS)
    summary: str = Field(min_length=1, max_length=SUMMARY_CHARS)

    @field_validator("category")
    @classmethod
    def _category(cls, v: str) -> str:
        v = " ".join(v.split()).casefold()
        if not v:
            raise ValueError("empty category")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        tags = [" ".join(t.split()).casefold() for t in v]
        if any(not t or len(t) > TAG_CHARS for t in tags):
            raise ValueError("empty or long tag")
        return list(dict.fromkeys(tags))

    @field_validator("summary")
    @classmethod
    def _one_line(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("empty summary")
        return v


def output_schema(taxonomy: Sequence[str] | None = None) -> dict[str, Any]:
    """The answer's JSON schema (the grammar a llama.cpp server decodes with)."""
    category: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": CATEGORY_CHARS}
    if taxonomy:
        category = {"type": "string", "enum": list(dict.fromkeys(taxonomy))}
    return {
        "type": "object",
        "properties": {
            "category": category,
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": TAG_CHARS}, "maxItems": MAX_TAGS},
            "claims": {
                "type": "array",
                "maxItems": MAX_CLAIMS,
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": ["price", "feature", "offer"]},
                        "text": {"type": "string", "minLength": 1, "maxLength": CLAIM_CHARS},
                    },
                    "required": ["kind", "text"],
                    "additionalProperties": False,
                },
            },
            "summary": {"type": "string", "minLength": 1, "maxLength": SUMMARY_CHARS},
        },
        "required": ["category", "tags", "claims", "summary"],
        "additionalProperties": False,
    }


def _plain(text: str) -> str:
    return " ".join(text.casefold().split())


def grounded_claims(record: AdUnderstanding, ad: Ad) -> tuple[AdUnderstanding, int]:
    """The record with only the claims whose text appears in the ad's title or text (case and spacing
    aside), and how many were dropped: a claim the ad does not state is not a claim of the ad."""
    source = _plain(f"{ad.title} {ad.text}")
    kept = [c for c in record.claims if _plain(c.text) in source]
    return record.model_copy(update={"claims": kept}), len(record.claims) - len(kept)


def to_metadata(record: AdUnderstanding) -> dict[str, Any]:
    """What the ingest stores in `Ad.metadata[METADATA_KEY]`: the record, its category marked extracted."""
    return record.model_dump(mode="json") | {"category_source": EXTRACTED}


def understanding_of(ad: Ad) -> AdUnderstanding | None:
    """The record stored with the ad at ingest, or None (not understood, or a malformed entry)."""
    raw = ad.metadata.get(METADATA_KEY) if ad.metadata else None
    if not isinstance(raw, dict):
        return None
    try:
        return AdUnderstanding.model_validate({k: v for k, v in raw.items() if k != "category_source"})
    except ValidationError:
        return None


def extracted_category(ad: Ad) -> str | None:
    """The category the LLM extracted for this ad at ingest, or None."""
    record = understanding_of(ad)
    return record.category if record is not None else None


def with_understanding(ad: Ad, record: AdUnderstanding | None, *, summary_in_document: bool = False) -> Ad:
    """The ad with `record` in its metadata (and, if asked, the summary appended to its retrieval document)."""
    meta = {k: v for k, v in ad.metadata.items() if k not in (METADATA_KEY, DOCUMENT_EXTRA_KEY)}
    if record is not None:
        meta[METADATA_KEY] = to_metadata(record)
        if summary_in_document:
            meta[DOCUMENT_EXTRA_KEY] = record.summary
    return replace(ad, metadata=meta)


def parse_understanding(raw: str, *, taxonomy: Sequence[str] | None = None, truncated: bool = False) -> AdUnderstanding:
    """Validated record from the model's text; LLMOutputInvalid(malformed_json | schema_mismatch | truncated)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise LLMOutputInvalid("truncated" if truncated else "malformed_json", raw=raw) from None
    try:
        record = AdUnderstanding.model_validate(data)
    except ValidationError as e:
        raise LLMOutputInvalid("schema_mismatch", raw=raw, detail=str(e.errors()[0]["loc"])) from None
    if taxonomy and record.category not in {t.casefold() for t in taxonomy}:
        raise LLMOutputInvalid("schema_mismatch", raw=raw, detail="category outside the taxonomy")
    return record


@dataclass(frozen=True, slots=True)
class StoredUnderstanding:
    key: str
    ad_id: str
    record: AdUnderstanding | None  # None: a counted failure
    reason: str | None = None  # the failure's LLMOutputInvalid.reason
    dropped_claims: int = 0  # extracted claims not found in the ad's text (not stored)


class UnderstandingStore:
    """Append-only JSONL of understanding results by key, loaded into memory at open (later lines win)."""

    def __init__(self, directory: Path | str):
        self.path = Path(directory) / STORE_FILE
        self.corrupt_lines = 0
        self._items: dict[str, StoredUnderstanding] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        record = AdUnderstanding.model_validate(row["record"]) if row["record"] is not None else None
                        item = StoredUnderstanding(key=row["key"], ad_id=row["ad_id"], record=record, reason=row.get("reason"))
                    except (ValueError, KeyError, TypeError, ValidationError):
                        self.corrupt_lines += 1  # a torn last line after a crash; the ad is redone
                        continue
                    self._items[item.key] = item

    def get(self, key: str) -> StoredUnderstanding | None:
        return self._items.get(key)

    def append(self, items: Sequence[StoredUnderstanding]) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for it in items:
                row = {"key": it.key, "ad_id": it.ad_id, "reason": it.reason,
                       "record": it.record.model_dump(mode="json") if it.record is not None else None}  # fmt: skip
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
        for it in items:
            self._items[it.key] = it

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class UnderstandReport:
    ads: int = 0
    cached: int = 0  # served from the store (records and stored failures)
    generated: int = 0  # new validated records
    invalid: Counter[str] = field(default_factory=Counter)  # new failures by reason (stored)
    cached_invalid: int = 0  # of `cached`: stored failures
    unavailable: Counter[str] = field(default_factory=Counter)  # LLM down, by reason (not stored: retried next run)
    dropped_claims: int = 0  # extracted claims absent from the ad's text, dropped before storing
    corrupt_lines: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["invalid"], out["unavailable"] = dict(self.invalid), dict(self.unavailable)
        out["hit_rate"] = self.cached / self.ads if self.ads else 0.0
        return out


class AdUnderstander:
    """Runs the understanding prompt over a catalog: batched, concurrent, resumable, cached by content hash."""

    def __init__(
        self,
        llm: ChatLLMLike,
        prompt: PromptTemplate,
        *,
        store: UnderstandingStore,
        taxonomy: Sequence[str] | None = None,
        concurrency: int = 4,
        batch_size: int = 32,
        timeout_s: float = 60.0,
        max_text_chars: int = 600,
    ):
        if set(prompt.variables) != PROMPT_VARIABLES:
            raise PromptError(f"prompt {prompt.name!r} declares {sorted(prompt.variables)}; understanding fills {sorted(PROMPT_VARIABLES)}")
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1")
        self.llm, self.prompt, self.store = llm, prompt, store
        self.taxonomy = [t.casefold() for t in dict.fromkeys(taxonomy)] if taxonomy else None
        self.concurrency, self.batch_size, self.timeout_s, self.max_text_chars = concurrency, batch_size, timeout_s, max_text_chars
        self.schema = output_schema(self.taxonomy)
        self._salt = hashlib.sha256(
            json.dumps([prompt.sha256, llm.model, self.taxonomy or []], separators=(",", ":")).encode()
        ).hexdigest()

    @classmethod
    def from_settings(
        cls, settings: Settings, llm: ChatLLMLike, *, store: UnderstandingStore, taxonomy: Sequence[str] | None = None,
        registry: PromptRegistry | None = None,
    ) -> AdUnderstander:  # fmt: skip
        """`llm` should be a client built with max_tokens=settings.understand_max_tokens."""
        registry = registry or PromptRegistry(settings.prompts_dir)
        return cls(
            llm, registry.get(settings.understand_prompt_name), store=store, taxonomy=taxonomy,
            concurrency=settings.understand_concurrency, batch_size=settings.understand_batch_size,
            timeout_s=settings.understand_timeout_s,
        )  # fmt: skip

    def key(self, ad: Ad) -> str:
        return hashlib.sha256(f"{ad_content_hash(ad)}:{self._salt}".encode()).hexdigest()

    def get(self, ad: Ad) -> AdUnderstanding | None:
        """The stored record for this ad under this prompt/model/taxonomy; None if absent or failed."""
        item = self.store.get(self.key(ad))
        return item.record if item is not None else None

    async def _one(self, ad: Ad, sem: asyncio.Semaphore, bar: tqdm) -> StoredUnderstanding | LLMUnavailable:
        try:
            result = await self._ask(ad, sem)
            if isinstance(result, StoredUnderstanding):
                self.store.append([result])  # as each ad finishes: an interrupted run loses at most the calls in flight
            return result
        finally:
            bar.update(1)

    async def _ask(self, ad: Ad, sem: asyncio.Semaphore) -> StoredUnderstanding | LLMUnavailable:
        messages = self.prompt.render(
            title=neutralise(ad.title, 200), text=neutralise(ad.text, self.max_text_chars), taxonomy=self.taxonomy or []
        )
        async with sem:
            try:
                completion = await asyncio.wait_for(
                    self.llm.acomplete(messages, schema=self.schema, timeout_s=self.timeout_s), timeout=self.timeout_s
                )
            except TimeoutError:
                return LLMUnavailable("timeout", "understanding call")
            except LLMUnavailable as e:
                return e
        try:
            record = parse_understanding(completion.text, taxonomy=self.taxonomy, truncated=completion.finish_reason == "length")
        except LLMOutputInvalid as e:
            return StoredUnderstanding(key=self.key(ad), ad_id=ad.ad_id, record=None, reason=e.reason)
        record, dropped = grounded_claims(record, ad)
        return StoredUnderstanding(key=self.key(ad), ad_id=ad.ad_id, record=record, dropped_claims=dropped)

    async def arun(self, ads: Sequence[Ad], *, progress: bool = True, retry_invalid: bool = False) -> UnderstandReport:
        started = time.perf_counter()
        report = UnderstandReport(ads=len(ads), corrupt_lines=self.store.corrupt_lines)
        todo: list[Ad] = []
        seen: set[str] = set()
        for ad in ads:
            item = self.store.get(self.key(ad))
            if item is not None and (item.record is not None or not retry_invalid):
                report.cached += 1
                report.cached_invalid += item.record is None
            elif (k := self.key(ad)) not in seen:  # the same content twice in one run is asked once
                seen.add(k)
                todo.append(ad)
            else:
                report.cached += 1
        sem = asyncio.Semaphore(self.concurrency)
        with tqdm(total=len(ads), initial=report.cached, desc="understanding", unit="ad", disable=not progress) as bar:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                results = await asyncio.gather(*(self._one(ad, sem, bar) for ad in batch))
                for r in results:
                    if isinstance(r, LLMUnavailable):
                        report.unavailable[r.reason] += 1
                    elif r.record is None:
                        report.invalid[r.reason or "invalid"] += 1
                    else:
                        report.generated += 1
                        report.dropped_claims += r.dropped_claims
        report.seconds = time.perf_counter() - started
        logger.info("ad understanding", extra={**report.as_dict(), "prompt_sha256": self.prompt.sha256[:12], "model": self.llm.model})
        return report

    def run(self, ads: Sequence[Ad], *, progress: bool = True, retry_invalid: bool = False) -> UnderstandReport:
        """Blocking wrapper around `arun` (for the CLI's ingest)."""
        return asyncio.run(self.arun(ads, progress=progress, retry_invalid=retry_invalid))

    def enrich(self, ads: Sequence[Ad], *, progress: bool = True, summary_in_document: bool = False) -> tuple[list[Ad], UnderstandReport]:
        """Understand every ad (cached), then each ad with its record in its metadata (`with_understanding`);
        an ad without a record (a counted failure, or the LLM down) is returned without one."""
        report = self.run(ads, progress=progress)
        return [with_understanding(ad, self.get(ad), summary_in_document=summary_in_document) for ad in ads], report


def ingest_hook(
    understander: AdUnderstander, *, summary_in_document: bool, progress: bool = True, reports: list[UnderstandReport] | None = None
) -> Callable[[list[Ad]], list[Ad]]:
    """The `enrich` callable `retrieval.ingest.ingest_catalog` applies to the catalog it read; each run's
    report is appended to `reports`."""

    def enrich(ads: list[Ad]) -> list[Ad]:
        out, report = understander.enrich(ads, progress=progress, summary_in_document=summary_in_document)
        if reports is not None:
            reports.append(report)
        return out

    return enrich


def understanding_at_ingest(settings: Settings, stack: contextlib.ExitStack, *, reports: list[UnderstandReport]) -> Callable[[list[Ad]], list[Ad]]:
    """The ingest hook from settings: the LLM at `llm_url` with `understand_concurrency` calls in flight
    (else the bundled llama.cpp server, started by the first ad the cache does not hold and stopped when
    `stack` closes, one call at a time), the store in data_dir/understanding."""
    from .llm import ChatLLM

    llm: ChatLLMLike
    if settings.llm_url:
        llm = ChatLLM(
            base_url=settings.llm_url, model=settings.llm_model, max_tokens=settings.understand_max_tokens, timeout_s=settings.understand_timeout_s
        )
        stack.callback(llm.close)
    else:
        from .local_server import LazyLocalServer

        bundled = LazyLocalServer(
            settings,
            lambda url: ChatLLM(base_url=url, model=settings.llm_model, max_tokens=settings.understand_max_tokens, timeout_s=settings.understand_timeout_s),
            model=settings.llm_model,
        )
        stack.callback(bundled.stop)  # the client closes before the server stops
        llm = bundled
    understander = AdUnderstander.from_settings(settings, llm, store=UnderstandingStore(Path(settings.data_dir) / UNDERSTANDING_DIR))
    if not settings.llm_url:
        # The bundled llama.cpp server answers one request at a time: more in flight only queue there,
        # each waiting against its own deadline (and a timed-out call still costs the server its work).
        understander.concurrency = 1
    return ingest_hook(understander, summary_in_document=settings.understand_summary_in_document, reports=reports)
