"""Fixtures for the API-protection, robustness and injection tests (all on 127.0.0.1, all bounded in time).

Built on the session's demo catalog (`demo_settings`, `demo_services`, `embedder` from tests/conftest.py).
Tests that change the LLM stage, caps or breaker get a copy of the demo selector with those parts
replaced (`services_with`), so the shared services are never mutated.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from selection.services import Services
from kernel.settings import Settings
from agent.breaker import CircuitBreaker, ConcurrencyLimiter
from agent.prompts import PromptRegistry
from agent.reranker import LLMReranker

DEMO_DIR = Path(__file__).resolve().parents[2] / "data" / "demo"
API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-fedcba9876543210"


def settings_with(base: Settings, **changes) -> Settings:
    """A copy of `base` with `changes`; `api_keys` may be given as plain strings."""
    if "api_keys" in changes:
        changes["api_keys"] = [SecretStr(k) for k in changes["api_keys"]]
    return base.model_copy(update=changes)


def reranker_for(llm, settings: Settings, **options) -> LLMReranker:
    """The real LLM stage over any ChatLLMLike (a fake, or agent.llm.ChatLLM)."""
    return LLMReranker.from_settings(settings, llm, registry=PromptRegistry(settings.prompts_dir), **options)


def services_with(
    services: Services,
    *,
    reranker=None,
    breaker_failures: int = 5,
    breaker_reset_s: float = 30.0,
    llm_concurrency: int = 4,
    max_deadline_ms: int | None = None,
    **selector_changes,
) -> Services:
    """`services` with its own selector: the given reranker, a fresh breaker and LLM limiter (and deadline cap),
    other fields replaced."""
    admission = dataclasses.replace(
        services.selector.admission,
        breaker=CircuitBreaker(breaker_failures, breaker_reset_s),
        limiter=ConcurrencyLimiter(llm_concurrency),
        max_deadline_ms=max_deadline_ms if max_deadline_ms is not None else services.selector.admission.max_deadline_ms,
    )
    selector = dataclasses.replace(services.selector, reranker=reranker, admission=admission, **selector_changes)
    return dataclasses.replace(services, selector=selector)


def load_impressions(limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (DEMO_DIR / "impressions.jsonl").read_text().splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class AuditLog(_Collect):
    def lines(self) -> list[dict]:
        return [json.loads(r.getMessage()) for r in self.records]


@pytest.fixture
def audit_log() -> Iterator[AuditLog]:
    """Collects every audit line written while the test runs (`.lines()` parses them)."""
    logger = logging.getLogger("adselect.audit")
    handler = AuditLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def all_logs() -> Iterator[list[logging.LogRecord]]:
    """Every log record of any logger, at DEBUG and up, while the test runs."""
    root = logging.getLogger()
    handler = _Collect()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
def frozen_gc() -> Iterator[None]:
    """As in production (create_app freezes what it built): the long-lived objects of this test process
    (models, catalogs, Chroma) out of the cyclic collector's reach, so a full collection during a
    latency measurement does not pause it for ~100 ms. Unfrozen afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
