"""Behaviour learning on Ray (`adselect ingest --ray`): the histories counted by actors, the tables in the driver.

The driver streams the histories and sends each to the actor its de-duplication key names
(retrieval.behaviour.history_partition), in chunks of CHUNK_EVENTS events, so every copy of a history
meets the same actor and counts once. Each actor holds one retrieval.behaviour.BehaviourCounter (the
code a single-process run counts with) and returns its partial counts at the end; the driver adds them
up exactly (merge_counts) and computes the tables and the collaborative vectors from the merged counts
as a single-process run does (BehaviourStats.from_counts): the same tables, array for array.
Ray must be initialised by the caller (eval.distributed.cluster.ray_session).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from retrieval.behaviour import CHUNK_EVENTS, BehaviourCounter, BehaviourCounts, history_partition, merge_counts

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # chunks queued per actor before the driver waits: bounds the histories held in memory


class CountActor:
    """One partition's counts: a BehaviourCounter fed chunk by chunk (an actor runs its calls in order)."""

    def __init__(self, ids: Sequence[str], *, window: int, decay: float, chunk_events: int):
        self.counter = BehaviourCounter(ids, window=window, decay=decay, chunk_events=chunk_events)

    def add(self, histories: list[list[str]]) -> int:
        self.counter.add(histories)
        return len(histories)

    def result(self) -> BehaviourCounts:
        return self.counter.result()


class RayBehaviourCounter:
    """retrieval.ingest.learn_behaviour's `count` on `workers` actors: same arguments, same counts."""

    def __init__(self, *, workers: int, chunk_events: int = CHUNK_EVENTS):
        self.workers = workers
        self.chunk_events = chunk_events

    def __call__(self, histories: Iterable[Sequence[str]], ids: Sequence[str], *, window: int, decay: float) -> BehaviourCounts:
        import ray

        from eval.distributed.backend import actor_cpus

        remote = ray.remote(num_cpus=actor_cpus(self.workers))(CountActor)
        actors = [remote.remote(list(ids), window=window, decay=decay, chunk_events=self.chunk_events) for _ in range(self.workers)]
        row = {a: i for i, a in enumerate(ids)}
        try:
            buffers: list[list[list[str]]] = [[] for _ in actors]
            sizes = [0] * len(actors)
            queued: list[list] = [[] for _ in actors]

            def send(p: int) -> None:
                while len(queued[p]) >= IN_FLIGHT:
                    ray.get(queued[p].pop(0))
                queued[p].append(actors[p].add.remote(buffers[p]))
                buffers[p], sizes[p] = [], 0

            n = 0
            for hist in histories:
                p = history_partition(hist, row, parts=len(actors))
                buffers[p].append(list(hist))
                sizes[p] += len(hist) + 1
                n += 1
                if sizes[p] >= self.chunk_events:
                    send(p)
            for p in range(len(actors)):
                if buffers[p]:
                    send(p)
            ray.get([ref for refs in queued for ref in refs])
            parts = ray.get([a.result.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        log.info("behaviour counted on ray", extra={"histories_read": n, "actors": len(actors)})
        return merge_counts(parts, len(ids))
