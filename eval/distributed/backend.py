"""The Ray backend of eval.harness.run_eval (`adselect eval run --ray`).

Fast phase: Ray Data reads the impressions (eval/distributed/reading.py) and maps them through a pool of
`workers` FastActors; the driver walks the payloads in input order and applies the file-wide rule
(duplicate ids: the first kept, eval.data.ImpressionCollector) so it holds exactly the LoadedImpressions
and fast records the single-process run computes. LLM phase: the sample in chunks over LLM actors, each
with its own endpoint (Settings.llm_urls in turn, or the task's llm.url; none: a bundled model per actor).
Ray must be initialised by the caller (eval.distributed.cluster.ray_session).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from eval.config import EvalTask
from eval.data import Cleaned, EvalImpression, ImpressionCollector, LoadedImpressions
from eval.distributed.eval_actors import FastActor, LLMWorker, TuneActor, impression_dict
from eval.distributed.reading import impressions_dataset
from kernel.settings import Settings

log = logging.getLogger(__name__)



def actor_cpus(workers: int) -> float:
    """Logical CPUs per pool actor: one, or less so that one CPU stays free for Ray Data's read tasks
    (its scheduler starts no read while the actors hold every CPU; a local Ray with 2 CPUs and 2 actors
    gives each 0.5). Each actor still computes on a core of its own: its threads are set to one."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, (total - 1.0) / max(workers, 1)))


@dataclasses.dataclass(frozen=True)
class RayBackend:
    workers: int = 2
    batch_size: int = 250
    llm_urls: tuple[str, ...] = ()
    settings: Settings | None = None  # bound by run_eval: the settings and data it built the driver's env from
    env_args: dict[str, Any] | None = None
    llm_cache_path: Path | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> "RayBackend":
        return cls(workers=s.ray_workers, batch_size=s.ray_batch_size, llm_urls=tuple(s.llm_urls))

    def bind(self, *, settings: Settings, env_args: dict[str, Any], llm_cache_path: Path | None) -> "RayBackend":
        return dataclasses.replace(self, settings=settings, env_args=dict(env_args), llm_cache_path=llm_cache_path)

    def fast_phase(
        self, task: EvalTask, *, imp_path: Path, fast_systems: list[str], names: list[str], results, show_progress: bool,
    ) -> tuple[LoadedImpressions, dict[str, Any]]:  # fmt: skip
        """Read, clean and score every impression on the pool; append the missing fast records in input order."""
        from eval.harness import _progress

        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is on stderr below
        t = time.perf_counter()
        kind, ds = impressions_dataset(imp_path, limit=task.data.limit, blocks=max(self.workers * 4, 1))
        scored = ds.map_batches(
            FastActor, batch_format="pyarrow", batch_size=self.batch_size, concurrency=self.workers, num_cpus=actor_cpus(self.workers),
            fn_constructor_kwargs={
                "settings": self.settings, "env_args": self.env_args, "task": task, "fast_systems": fast_systems, "names": names, "kind": kind,
            },
        )  # fmt: skip
        out = ImpressionCollector()
        bar = _progress(0, "eval fast (ray)", show_progress)
        appended = 0
        first_s = None
        for row in scored.iter_rows():
            if first_s is None:
                first_s = time.perf_counter() - t  # the actors' start (each builds its Selector) and the first batch
            p = json.loads(row["payload"])
            iid = p["id"]
            item = None
            if p.get("item") is not None:
                it = p["item"]
                item = EvalImpression(iid, it["user_id"], it["history"], it["candidates"], frozenset(it["clicked"]), out.n_read + 1)
            kept = out.add(iid, None if iid in out.seen else Cleaned(item, p["skip"], p["unknown"]))
            if kept and iid not in results.done["fast"]:
                results.append(p["fast"])
                appended += 1
            bar.update(1)
        bar.close()
        secs = time.perf_counter() - t
        speed = {
            "impressions": appended,
            "seconds": round(secs, 3),
            "impressions_per_s": round(appended / secs, 1) if appended and secs > 0 else None,
            "workers": self.workers,
            "backend": "ray",
            "records_read": out.n_read,
            "first_result_s": round(first_s, 3) if first_s is not None else None,
        }
        return out.result(), speed

    def behaviour_counter(self):
        """How prepare_env counts the training histories when it learns behaviour: on `workers` actors."""
        from eval.distributed.behaviour import RayBehaviourCounter

        return RayBehaviourCounter(workers=self.workers)

    def tune_featurizer(self, *, settings: Settings, env_args: dict[str, Any], n_hard: int) -> dict[str, Any]:
        """eval.tune.build_training_set's `featurize_many` over `workers` TuneActors (eval tune --ray): each
        chunk of planned impressions split into slices for the actors, the results put back in input order."""
        import ray
        from ray.util import ActorPool

        remote = ray.remote(num_cpus=actor_cpus(self.workers))(TuneActor)
        pool = ActorPool([remote.remote(settings=settings, env_args=env_args, n_hard=n_hard) for _ in range(self.workers)])
        per = max(1, self.batch_size // 4)

        def many(planned: list) -> list:
            slices = [planned[i : i + per] for i in range(0, len(planned), per)]
            return [r for part in pool.map(lambda a, ps: a.run.remote(ps), slices) for r in part]  # map keeps the order

        return {"featurize_many": many, "chunk": self.batch_size * self.workers}

    def _llm_urls(self, task: EvalTask) -> list[str | None]:
        urls: list[str | None] = list(self.llm_urls) or [task.llm.url]
        n = max(self.workers, len(urls))
        return [urls[i % len(urls)] for i in range(n)]

    def llm_phase(self, task: EvalTask, env, sample: list[EvalImpression], *, results, metrics_of, show_progress: bool) -> dict:
        """The missing LLM records of the sample, chunk by chunk over the LLM actors, appended as chunks finish."""
        import ray
        from ray.util import ActorPool

        from eval.harness import _progress
        from eval.report import metric_names

        todo = [impression_dict(i) for i in sample if i.impression_id not in results.done["llm"]]
        urls = self._llm_urls(task)
        bar = _progress(len(todo), "eval llm (ray)", show_progress)
        names = metric_names(task.protocol.recall_ks)
        t = time.perf_counter()
        remote = ray.remote(num_cpus=0)(LLMWorker)  # waiting on an endpoint takes no core
        actors = [
            remote.remote(settings=self.settings, env_args=self.env_args, task=task, names=names, url=u, cache_path=self.llm_cache_path)
            for u in urls[: max(1, min(len(urls), len(todo)))]
        ]
        try:
            chunk = max(1, task.llm.concurrency * 2)
            pool = ActorPool(actors)
            for recs in pool.map_unordered(lambda a, items: a.run.remote(items), [todo[i : i + chunk] for i in range(0, len(todo), chunk)]):
                for rec in recs:
                    results.append(rec, flush=True)
                bar.update(len(recs))
            stats = ray.get([a.stats.remote() for a in actors])
            ray.get([a.close.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        bar.close()
        secs = time.perf_counter() - t
        if env is not None and getattr(env.services.selector, "reranker", None) is not None:
            _merge_cache_stats(env, stats)
        return {
            "impressions": len(todo),
            "seconds": round(secs, 3),
            "impressions_per_s": round(len(todo) / secs, 3) if todo and secs > 0 else None,
            "concurrency": task.llm.concurrency,
            "backend": "ray",
            "actors": len(actors),
            "endpoints": sorted({str(s["served_by"].get("url")) for s in stats}),
        }


def _merge_cache_stats(env, stats: list[dict[str, Any]]) -> None:
    """The actors' cache counters into the driver's (the report's `llm.cache` counts every call)."""
    llm = getattr(env.services.selector.reranker, "llm", None)
    counters = getattr(llm, "stats", None)
    if counters is None:
        return
    for s in stats:
        counters.hits += s["hits"]
        counters.misses += s["misses"]
        counters.errors += s["errors"]

