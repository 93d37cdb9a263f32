"""The actors of an eval run on Ray. Each builds its environment once, in its constructor, through the
same `eval.env.prepare_env` the driver used (which finds the catalog, behaviour tables and sequence
model already built under the data dir and only loads them), never per batch.

- FastActor: a Ray Data callable class. A batch of raw impression rows → cleaned (eval.data's rules) →
  the fast record of every system (eval.harness.fast_record), one JSON payload per row, in row order.
- LLMWorker: an actor with its own LLM client (its endpoint URL), cache connection and Selector; runs a
  chunk of the LLM sample with `llm.concurrency` calls in flight (eval.llm_phase.run_llm_phase).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from eval.config import EvalTask
from kernel.settings import Settings


def _metrics_of(names: list[str]):
    from eval.metrics import metrics_by_protocol

    return metrics_by_protocol([m for m in names if not m.startswith("recall@")], names)


def _one_thread() -> None:
    """A pool actor computes on one core (its logical CPU share may be a fraction: backend.actor_cpus)."""
    import torch

    torch.set_num_threads(1)


def _env(settings: Settings, env_args: dict[str, Any], task: EvalTask, *, reranker=None):
    from eval.env import prepare_env

    env = prepare_env(settings, **env_args, reranker=reranker, show_progress=False)
    env.services.selector.generator.use_chroma = task.protocol.use_chroma
    return env


class FastActor:
    """One Selector and FastRankers per actor; `__call__` maps a pyarrow batch to {"payload": [json, …]}."""

    def __init__(self, *, settings: Settings, env_args: dict[str, Any], task: EvalTask, fast_systems: list[str], names: list[str], kind: str):
        from eval.bm25 import BM25Index
        from eval.rankers import FastRankers

        _one_thread()
        self.env = _env(settings, env_args, task)
        selector = self.env.services.selector
        bm25 = BM25Index(self.env.services.index.ads) if "bm25" in fast_systems else None
        self.rankers = FastRankers(
            selector=selector, bm25=bm25, systems=fast_systems,
            n_retrieve=task.protocol.n_retrieve, use_chroma=task.protocol.use_chroma, seed=task.protocol.seed,
        )  # fmt: skip
        self.metrics_of = _metrics_of(names)
        self.kind = kind

    def __call__(self, batch) -> dict[str, list[str]]:
        from eval.data import clean_record
        from eval.distributed.reading import batch_records
        from eval.harness import fast_records

        catalog = self.env.services.index.row
        payloads: list[dict[str, Any]] = []
        items = []
        for rec in batch_records(batch, self.kind):
            cleaned = clean_record(rec, catalog=catalog, line=0)  # the driver numbers the records
            payload: dict[str, Any] = {"id": rec.impression_id, "skip": cleaned.skip, "unknown": cleaned.unknown}
            if cleaned.item is not None:
                imp = cleaned.item
                imp.candidates = self.rankers.canonical(imp.candidates)  # as the single-process harness does
                payload["item"] = {"user_id": imp.user_id, "history": imp.history, "candidates": imp.candidates, "clicked": sorted(imp.clicked)}
                items.append((payload, imp))
            payloads.append(payload)
        # the batch's records through the harness's own block function (one batched sequence pass, as a worker's chunk)
        for (payload, _), record in zip(items, fast_records([imp for _, imp in items], self.rankers, self.metrics_of)):
            payload["fast"] = record
        return {"payload": [json.dumps(p, ensure_ascii=False) for p in payloads]}


class LLMWorker:
    """The LLM systems for chunks of the LLM sample, through this actor's own Selector and LLM endpoint."""

    def __init__(
        self, *, settings: Settings, env_args: dict[str, Any], task: EvalTask, names: list[str], url: str | None, cache_path: Path | None,
    ):  # fmt: skip
        from eval.llm_phase import build_llm_stack

        self.spec = task.llm.model_copy(update={"url": url}) if url else task.llm
        self.seed = task.protocol.seed
        self.stack = build_llm_stack(
            self.spec, data_dir=settings.data_dir, prompts_dir=settings.prompts_dir, settings=settings, cache_path=cache_path,
        )  # fmt: skip
        self.env = _env(settings, env_args, task, reranker=self.stack.reranker)
        self.metrics_of = _metrics_of(names)

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from eval.llm_phase import run_llm_phase

        imps = [impression_of(d) for d in items]
        n_catalog = len(self.env.services.index)
        records: list[dict[str, Any]] = []
        asyncio.run(
            run_llm_phase(
                imps, selector=self.env.services.selector, spec=self.spec, seed=self.seed, metrics_of=self.metrics_of,
                pool_size_of=lambda i: None if i.candidates is not None else n_catalog, on_result=records.append,
            )
        )  # fmt: skip
        return records

    def stats(self) -> dict[str, Any]:
        """The cache counters and where the calls went (merged into the driver's report)."""
        s = self.stack.llm.stats
        return {"hits": s.hits, "misses": s.misses, "errors": s.errors, "served_by": self.stack.served_by}

    def close(self) -> None:
        self.stack.close()


def impression_of(d: dict[str, Any]):
    """An EvalImpression from its plain-dict form (the form that crosses process boundaries)."""
    from eval.data import EvalImpression

    return EvalImpression(d["impression_id"], d["user_id"], list(d["history"]), d["candidates"], frozenset(d["clicked"]), d["line"])


def impression_dict(imp) -> dict[str, Any]:
    d = asdict(imp)
    d["clicked"] = sorted(imp.clicked)
    return d


class TuneActor:
    """`eval tune --ray`: the feature rows of planned training impressions (eval.tune.featurize)."""

    def __init__(self, *, settings: Settings, env_args: dict[str, Any], n_hard: int):
        from eval.env import prepare_env

        _one_thread()
        self.env = prepare_env(settings, **env_args, show_progress=False)
        self.n_hard = n_hard

    def run(self, planned: list) -> list:
        from eval.tune import featurize

        sel = self.env.services.selector
        return [featurize(p, generator=sel.generator, recency_decay=sel.recency_decay, n_hard=self.n_hard) for p in planned]
