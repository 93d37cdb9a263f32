"""Catalog embedding on Ray actors (`adselect ingest --ray`): one sentence-transformers model per actor,
loaded once in its constructor; each batch of documents retrieval.ingest hands over is split into one
slice per actor and the vectors come back in document order. Chroma is written by the driver only.
"""
from __future__ import annotations

import numpy as np

from kernel.settings import Settings


class EmbedActor:
    def __init__(self, settings: Settings):
        import torch

        from selection.services import make_embedder

        torch.set_num_threads(1)
        # One core per actor (eval.distributed.backend.actor_cpus): the ONNX session's threads too, unless
        # ADSELECT_EMBED_THREADS says otherwise (0 would give every actor all the machine's cores).
        self.embedder = make_embedder(settings if settings.embed_threads else settings.model_copy(update={"embed_threads": 1}))

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(texts)


class RayEmbedder:
    """The Embedder interface retrieval.ingest.ingest_catalog uses (`encode`), computed by `workers` actors."""

    def __init__(self, settings: Settings, *, workers: int):
        import ray

        from eval.distributed.backend import actor_cpus

        remote = ray.remote(num_cpus=actor_cpus(workers))(EmbedActor)
        self.actors = [remote.remote(settings) for _ in range(workers)]
        self.dim = None

    def close(self) -> None:
        """Stop the actors (left to ray.shutdown, their processes outlived the local Ray)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        import ray

        per = -(-len(texts) // len(self.actors)) if texts else 1
        parts = [texts[i : i + per] for i in range(0, len(texts), per)]
        vecs = ray.get([a.encode.remote(p) for a, p in zip(self.actors, parts)])
        return np.concatenate(vecs) if vecs else np.zeros((0, self.dim or 0), dtype=np.float32)
