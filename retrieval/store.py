"""The ad store: the catalog in a Chroma collection, plus an in-memory index loaded once at start-up.

Chroma is the system of record (documents, metadata, embeddings, HNSW for nearest neighbours); the
in-memory index holds the embedding matrix so a user profile is pooled from stored vectors without an
encoder call per impression, and so features for any candidate list are one matrix product.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kernel.errors import CatalogError
from kernel.types import Ad
from retrieval.metadata_mask import MetadataColumns

log = logging.getLogger(__name__)

_META_FIELDS = ("title", "text", "category", "subcategory", "advertiser", "landing_url")
# Per-ad hashes stored beside each ad's metadata, written in the same upsert as its vector, so the
# collection itself says which ads are current: an interrupted ingest resumes from them.
CONTENT_KEY = "content_sha256"  # everything stored for the ad: a change means the ad must be rewritten
DOCUMENT_KEY = "document_sha256"  # the embedded text: unchanged means the stored vector is still right
EMBEDDER_KEY = "embedder"  # collection metadata: the embedder key every stored vector came from


def ad_to_metadata(ad: Ad) -> dict[str, str | float]:
    meta: dict[str, str | float] = {f: getattr(ad, f) for f in _META_FIELDS}
    meta["bid"] = float(ad.bid)
    meta["extra"] = json.dumps(ad.metadata, ensure_ascii=False, sort_keys=True, default=str)
    return meta


def ad_from_metadata(ad_id: str, meta: dict) -> Ad:
    extra = meta.get("extra") or "{}"
    return Ad(
        ad_id=ad_id,
        title=str(meta.get("title", "")),
        text=str(meta.get("text", "")),
        category=str(meta.get("category", "")),
        subcategory=str(meta.get("subcategory", "")),
        advertiser=str(meta.get("advertiser", "")),
        bid=float(meta.get("bid", 1.0)),
        landing_url=str(meta.get("landing_url", "")),
        metadata=json.loads(extra),
    )


@dataclass
class CatalogIndex:
    """Everything about the catalog the hot path needs, in memory."""

    ids: list[str]
    row: dict[str, int]
    ads: list[Ad]
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    content_hash: str

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def id_array(self) -> np.ndarray:
        """`ids` as an object array: ids of many rows in one fancy-indexing step."""
        return np.array(self.ids, dtype=object)

    @cached_property
    def columns(self) -> MetadataColumns:
        """Metadata as arrays, for Chroma `where` filters evaluated in memory (exact search)."""
        return MetadataColumns.from_ads(self.ads)

    def rows(self, ids: Iterable[str]) -> tuple[list[int], list[str]]:
        """Known rows in input order, and the unknown ids."""
        ids = ids if isinstance(ids, (list, tuple, dict)) else list(ids)
        found = list(map(self.row.get, ids))
        if None not in found:  # the common case: every id known, one C-level pass
            return found, []
        return [r for r in found if r is not None], [i for i, r in zip(ids, found) if r is None]


def _ad_blob(ad: Ad) -> bytes:
    return json.dumps(ad_to_metadata(ad) | {"ad_id": ad.ad_id}, sort_keys=True).encode()


def ad_content_hash(ad: Ad) -> str:
    return hashlib.sha256(_ad_blob(ad)).hexdigest()


def document_hash(ad: Ad) -> str:
    return hashlib.sha256(ad.document().encode()).hexdigest()


def catalog_hash(ads: Sequence[Ad]) -> str:
    h = hashlib.sha256()
    for ad in sorted(ads, key=lambda a: a.ad_id):
        h.update(_ad_blob(ad))
    return h.hexdigest()


def _stored_metadata(ad: Ad) -> dict[str, str | float]:
    return ad_to_metadata(ad) | {CONTENT_KEY: ad_content_hash(ad), DOCUMENT_KEY: document_hash(ad)}


class AdStore:
    def __init__(self, client, collection: str):
        self.client = client
        self.collection_name = collection
        self._collection = None

    @property
    def collection(self):
        if self._collection is None:
            self._collection = self.client.get_or_create_collection(
                name=self.collection_name,
                embedding_function=None,  # we always pass our own sentence-transformers vectors
                metadata={"hnsw:space": "cosine"},
            )
        return self._collection

    def count(self) -> int:
        return self.collection.count()

    def stored_hash(self) -> str | None:
        meta = self.collection.metadata or {}
        return meta.get("content_hash")

    def stored_hashes(self, *, page: int = 5000) -> dict[str, tuple[str | None, str | None]]:
        """ad_id -> (content hash, document hash) of every stored ad; (None, None) for ads written
        before per-ad hashes existed (they count as changed, so the next ingest rewrites them)."""
        out: dict[str, tuple[str | None, str | None]] = {}
        n = self.count()
        for offset in range(0, n, page):
            got = self.collection.get(limit=page, offset=offset, include=["metadatas"])
            for ad_id, meta in zip(got["ids"], got["metadatas"]):
                meta = meta or {}
                out[ad_id] = (meta.get(CONTENT_KEY), meta.get(DOCUMENT_KEY))
        return out

    def upsert(
        self,
        ads: Sequence[Ad],
        vectors: np.ndarray,
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Each ad with its vector, document, metadata and hashes, in one write per batch."""
        if len(ads) != len(vectors):
            raise ValueError("ads and vectors differ in length")
        col = self.collection
        for start in range(0, len(ads), batch_size):
            chunk = ads[start : start + batch_size]
            col.upsert(
                ids=[a.ad_id for a in chunk],
                embeddings=vectors[start : start + batch_size].tolist(),
                metadatas=[_stored_metadata(a) for a in chunk],
                documents=[a.document() for a in chunk],
            )
            if progress:
                progress(len(chunk))

    def update_metadata(self, ads: Sequence[Ad], *, batch_size: int = 1000) -> None:
        """New metadata (and hashes) for ads whose embedded document is unchanged: their vectors stay."""
        for start in range(0, len(ads), batch_size):
            chunk = ads[start : start + batch_size]
            self.collection.update(ids=[a.ad_id for a in chunk], metadatas=[_stored_metadata(a) for a in chunk])

    def delete(self, ids: Sequence[str], *, batch_size: int = 5000) -> None:
        for start in range(0, len(ids), batch_size):
            self.collection.delete(ids=list(ids[start : start + batch_size]))

    def stored_embedder(self) -> str | None:
        """The key (retrieval.embedder.embedder_key) of the embedder that wrote the stored vectors."""
        return (self.collection.metadata or {}).get(EMBEDDER_KEY)

    def set_content_hash(self, content_hash: str, *, embedder_key: str | None = None) -> None:
        meta = dict(self.collection.metadata or {})
        meta.pop("hnsw:space", None)  # immutable after creation; modify() rejects it
        meta["content_hash"] = content_hash
        if embedder_key is not None:
            meta[EMBEDDER_KEY] = embedder_key
        self.collection.modify(metadata=meta)

    def load_index(self, *, page: int = 5000) -> CatalogIndex:
        t0 = time.perf_counter()
        n = self.count()
        if n == 0:
            raise CatalogError(f"collection {self.collection_name!r} is empty: run `adselect ingest --ads PATH` first")
        ids: list[str] = []
        ads: list[Ad] = []
        vecs: list[np.ndarray] = []
        for offset in range(0, n, page):
            got = self.collection.get(limit=page, offset=offset, include=["embeddings", "metadatas"])
            for ad_id, meta, emb in zip(got["ids"], got["metadatas"], got["embeddings"]):
                ids.append(ad_id)
                ads.append(ad_from_metadata(ad_id, meta or {}))
                vecs.append(np.asarray(emb, dtype=np.float32))
        matrix = np.vstack(vecs).astype(np.float32)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        index = CatalogIndex(
            ids=ids,
            row={a: i for i, a in enumerate(ids)},
            ads=ads,
            vectors=matrix,
            content_hash=self.stored_hash() or catalog_hash(ads),
        )
        log.info("catalog index loaded", extra={"ads": len(ids), "ms": round((time.perf_counter() - t0) * 1000, 1)})
        return index

    def nearest(self, vector: np.ndarray, n: int, *, where: dict | None = None) -> list[tuple[str, float]]:
        """Chroma HNSW nearest neighbours: (ad_id, cosine similarity)."""
        if n <= 0:
            return []
        res = self.collection.query(query_embeddings=[vector.tolist()], n_results=n, where=where, include=["distances"])
        return [(i, 1.0 - float(d)) for i, d in zip(res["ids"][0], res["distances"][0])]
