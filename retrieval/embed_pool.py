"""Embedding in worker processes: `processes` single-threaded ONNX embedders, one per core.

On the 2-core machine, 2 processes x 1 onnxruntime thread embed faster than 1 process x 2 threads (the
two threads synchronise at every op of a small-batch graph; bench/bench_ingest.py). A call's texts are
split into one contiguous slice per worker and the vectors come back in the texts' order. A worker that
raises, or dies (BrokenProcessPool), fails the call: ingest_catalog stops, the batches already written
stay, and a re-run embeds only what is missing (retrieval.ingest: resumable by content hash). The ONNX
vectors do not depend on how texts are batched (fp32: ~1e-7; int8: static scales, < 1e-6), so a split
gives the vectors one process would.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from retrieval.embedder import Embedder, EmbedderConfig

_WORKER: Embedder | None = None


def _init(config: EmbedderConfig) -> None:
    global _WORKER
    _WORKER = config.build(threads=1)


def _encode(texts: list[str]) -> np.ndarray:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.encode(texts)


class ProcessEmbedder:
    """The `encode` interface of Embedder over `processes` worker processes (spawned: no forked threads)."""

    def __init__(self, config: EmbedderConfig, *, processes: int):
        self.config = config
        self.key = config.key
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=_init, initargs=(config,))
        self.dim = int(self.pool.submit(_encode, ["warm up"]).result().shape[1])

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [p for p in np.array_split(np.arange(len(texts)), self.processes) if len(p)]
        futures = [self.pool.submit(_encode, [texts[i] for i in p]) for p in parts]
        return np.vstack([f.result() for f in futures])  # in order; a worker's error is raised here

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessEmbedder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
