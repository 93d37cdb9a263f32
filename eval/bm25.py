"""BM25 over the ad documents (bm25s, Lucene variant), as a sparse (ads × terms) weight matrix.

bm25s builds the index; its precomputed per-(document, term) scores are kept as a CSR matrix, so
scoring a query against logged candidates is one row slice and one product, and against the whole
catalog one sparse mat-vec. The query is the user's history titles (each a catalog document, already
tokenised) plus any free-text events: term counts, as bm25s sums repeated query tokens.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from kernel.types import Ad

log = logging.getLogger(__name__)


class BM25Index:
    def __init__(self, ads: Sequence[Ad], *, k1: float = 1.5, b: float = 0.75):
        import bm25s

        docs = [a.document() for a in ads]
        tok = bm25s.tokenize(docs, stopwords="en", show_progress=False)
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index(tok, show_progress=False)
        s = retriever.scores
        n_terms = len(s["indptr"]) - 1
        csc = sp.csc_matrix((s["data"], s["indices"], s["indptr"]), shape=(int(s["num_docs"]), n_terms))
        self.weights: sp.csr_matrix = csc.tocsr().astype(np.float32)
        self._indptr = self.weights.indptr.astype(np.int64)
        self._indices = self.weights.indices
        self._data = self.weights.data.astype(np.float64)
        self.vocab: dict[str, int] = dict(tok.vocab)
        self.doc_terms: list[np.ndarray] = [np.asarray(ids, dtype=np.int64) for ids in tok.ids]
        self._tokenize = lambda texts: bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        log.info("bm25 index built", extra={"docs": len(docs), "terms": n_terms})

    def query_vector(self, history_rows: Sequence[int], events: Sequence[str] = ()) -> np.ndarray:
        """Term counts of the query (history documents + events) as a dense float32 vector over the vocabulary."""
        parts = [self.doc_terms[r] for r in history_rows]
        if events:
            toks = [t for doc in self._tokenize(list(events)) for t in doc]
            parts.append(np.array([self.vocab[t] for t in toks if t in self.vocab], dtype=np.int64))
        n_terms = self.weights.shape[1]
        terms = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        # counts (exact integers, so the float32 values np.add.at gave), without add.at's per-element cost
        return np.bincount(terms, minlength=n_terms).astype(np.float32)

    def score_rows(self, q: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """q · W[r] for each row r: a gather over the rows' CSR segments (no sparse-matrix slicing)."""
        r = np.asarray(rows, dtype=np.int64)
        starts, ends = self._indptr[r], self._indptr[r + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(len(r), dtype=np.float64)
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        contrib = self._data[offsets] * q[self._indices[offsets]]
        return np.bincount(np.repeat(np.arange(len(r)), lengths), weights=contrib, minlength=len(r))

    def score_all(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(self.weights @ q).ravel()
