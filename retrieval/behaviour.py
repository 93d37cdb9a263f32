"""Behavioural priors learned from logged histories only (never from `clicked`).

- popularity: in how many distinct histories an ad appears (a plain count, once per history however
  often the ad repeats in it; no recency weighting);
- co-visitation: within a window of `window` steps, how often ad j follows ad i (`forward`) and how often
  the two appear close together in either order (`symmetric`), each pair weighted by decay**(gap-1);
- collaborative item vectors: positive PMI of "in the same history" co-occurrence, factorised by a
  truncated SVD (`cf`, L2-normalised rows): items bought by the same people land close together even
  when no single pair was co-visited often.

Learning streams the histories in chunks of events and works on whole arrays: per gap, every (i, j) pair
of a chunk comes out of one shifted comparison; each chunk is reduced to its distinct pairs at once and
merged into the running totals (`PairSum`). Time is linear in the history events (times the window, up
to a log factor in the merges) and memory is bounded by the distinct pairs kept, plus one chunk and the
de-duplication key of each distinct history (its bytes). Sums are float64; the tables are float32, each
value the exact sum rounded once (the loop this replaced summed in float32: up to a few ulp apart).
The counting (`BehaviourCounter`) can run on disjoint partitions of the histories, split by their
de-duplication key (`history_partition`), whose partial counts add up to the same tables (`merge_counts`,
then `BehaviourStats.from_counts`): `adselect ingest --ray` counts on Ray actors that way.

All tables are indexed by the catalog's row numbers and saved under the data dir: the data files first,
each under a new generation name, then the manifest `behaviour.json` that names them, each write a temp
file renamed into place. A crash at any point leaves the previous manifest and the files it names.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

import numpy as np
import scipy.sparse as sp

from kernel.errors import CatalogError

log = logging.getLogger(__name__)

CHUNK_EVENTS = 1 << 17  # history events per vectorised chunk: its pair arrays take ~16 B x window per event
MANIFEST = "behaviour.json"
_TABLE_PREFIXES = ("covisit_forward", "popularity", "cf")  # data files, legacy and generation-named
_TEMP_PREFIXES = tuple(f".{p}" for p in (*_TABLE_PREFIXES, MANIFEST))


class PairSum:
    """Sums sparse (n, n) matrices chunk by chunk into one canonical CSR matrix (float64).

    Each chunk is reduced to its distinct pairs when it arrives. Chunks wait in `pending` until they hold
    as many entries as the total; then they are added pairwise (a linear merge of sorted rows, no sort)
    and the result is added to the total. Each merge costs a small multiple of the entries that arrived
    since the last one, so the work is linear in the entries added (up to a log of the pending count),
    and memory stays within a small multiple of the distinct pairs kept.
    """

    def __init__(self, n: int):
        self.n = n
        self.total = sp.csr_matrix((n, n), dtype=np.float64)
        self.pending: list[sp.csr_matrix] = []
        self.pending_nnz = 0

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray | float) -> None:
        if len(rows) == 0:
            return
        data = np.full(len(rows), vals, dtype=np.float64) if np.isscalar(vals) else np.asarray(vals, dtype=np.float64)
        self.add_matrix(sp.csr_matrix((data, (rows, cols)), shape=(self.n, self.n)))

    def add_matrix(self, chunk: sp.spmatrix) -> None:
        chunk = sp.csr_matrix(chunk, dtype=np.float64)
        chunk.sum_duplicates()  # canonical: sorted rows without duplicates, what the linear merge needs
        if chunk.nnz == 0:
            return
        self.pending.append(chunk)
        self.pending_nnz += chunk.nnz
        if self.pending_nnz >= self.total.nnz:
            self._merge()

    def _merge(self) -> None:
        parts, self.pending, self.pending_nnz = self.pending, [], 0
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        if parts:
            self.total = self.total + parts[0] if self.total.nnz else parts[0]

    def result(self) -> sp.csr_matrix:
        self._merge()
        self.total.sum_duplicates()
        return self.total


@dataclass
class BehaviourCounts:
    """What learning counts before any rounding: float64 sums, the same for any chunking of the input."""

    popularity: np.ndarray  # (n,) float64: distinct histories holding the ad
    forward: sp.csr_matrix  # (n, n) float64: sum of decay**(gap-1) over "i, then j within the window"
    co: sp.csr_matrix  # (n, n) float64: distinct histories holding both i and j (i != j), symmetric
    n_histories: int  # distinct non-empty histories (after dropping ids outside the catalog)


class BehaviourCounter:
    """One streaming pass over histories, fed in any number of `add` calls: per chunk, ids become rows in one
    C-level map, and the only per-history Python left is the de-duplication key; every pair is counted by
    whole-array operations. `count_behaviour` runs one over an iterable; `adselect ingest --ray` runs one per
    actor over a partition (`history_partition`) and adds the partial counts up (`merge_counts`)."""

    def __init__(self, ids: Sequence[str], *, window: int, decay: float, chunk_events: int = CHUNK_EVENTS):
        self.row = {a: i for i, a in enumerate(ids)}
        self.n = len(ids)
        self.chunk_events = chunk_events
        self.pop = np.zeros(self.n, dtype=np.float64)
        self.fwd, self.co = PairSum(self.n), PairSum(self.n)
        self.weights = [decay ** (gap - 1) for gap in range(1, window + 1)]
        # Users appear in several logged impressions with the same history: each distinct history counts once
        # (compared after dropping ids outside the catalog, by its exact bytes).
        self.seen: set[bytes] = set()
        self.raw: list[str] = []
        self.raw_lens: list[int] = []
        self.used = 0

    def add(self, histories: Iterable[Sequence[str]]) -> None:
        raw, raw_lens = self.raw, self.raw_lens
        for hist in histories:
            raw.extend(hist)
            raw_lens.append(len(hist))
            if len(raw) >= self.chunk_events:
                self._flush()

    def result(self) -> BehaviourCounts:
        self._flush()
        return BehaviourCounts(self.pop, self.fwd.result(), self.co.result(), self.used)

    def _flush(self) -> None:
        raw, raw_lens, n, seen = self.raw, self.raw_lens, self.n, self.seen
        if not raw_lens:
            return
        codes = np.fromiter(map(self.row.get, raw, repeat(-1)), dtype=np.int32, count=len(raw))
        hid_raw = np.repeat(np.arange(len(raw_lens), dtype=np.int64), raw_lens)
        known = codes >= 0
        codes, hid_raw = codes[known], hid_raw[known]
        lens = np.bincount(hid_raw, minlength=len(raw_lens))
        ends = np.cumsum(lens)
        data = codes.tobytes()
        keep = np.zeros(len(lens), dtype=bool)
        for h, (e, L) in enumerate(zip(ends.tolist(), lens.tolist())):
            if L:
                key = data[(e - L) * 4 : e * 4]
                if key not in seen:
                    seen.add(key)
                    keep[h] = True
        raw.clear()
        raw_lens.clear()
        sel = keep[hid_raw]
        flat = codes[sel]
        _, hid = np.unique(hid_raw[sel], return_inverse=True)  # kept histories renumbered 0..H-1, in order
        self.used += int(keep.sum())
        if len(flat) == 0:
            return
        rows, cols, vals = [], [], []
        for gap, w in enumerate(self.weights, start=1):
            if gap >= len(flat):
                break
            a, b = flat[:-gap], flat[gap:]
            pair = (hid[gap:] == hid[:-gap]) & (a != b)  # same history, and never an ad with itself
            rows.append(a[pair])
            cols.append(b[pair])
            vals.append(np.full(len(rows[-1]), w))
        if rows:
            self.fwd.add(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals))
            del rows, cols, vals
        # The distinct ads of each history ("baskets"): popularity and same-history co-occurrence.
        order = np.lexsort((flat, hid))
        sf, sh = flat[order], hid[order]
        first = np.ones(len(sf), dtype=bool)
        first[1:] = (sf[1:] != sf[:-1]) | (sh[1:] != sh[:-1])
        items, owners = sf[first], sh[first]
        self.pop[:] += np.bincount(items, minlength=n)
        ui = sp.csr_matrix((np.ones(len(items), dtype=np.float64), (owners, items)), shape=(int(hid[-1]) + 1, n))
        both = (ui.T.tocsr() @ ui).tocoo()
        off = both.row != both.col
        self.co.add_matrix(sp.coo_matrix((both.data[off], (both.row[off], both.col[off])), shape=(n, n)))


def count_behaviour(
    histories: Iterable[Sequence[str]],
    ids: Sequence[str],
    *,
    window: int,
    decay: float,
    chunk_events: int = CHUNK_EVENTS,
) -> BehaviourCounts:
    """The counts of every history, in one streaming pass (BehaviourCounter)."""
    counter = BehaviourCounter(ids, window=window, decay=decay, chunk_events=chunk_events)
    counter.add(histories)
    return counter.result()


def history_partition(history: Sequence[str], row: dict[str, int], *, parts: int) -> int:
    """Which of `parts` counters a history goes to: a hash of its de-duplication key (its catalog rows, ids
    outside the catalog dropped), so every copy of a history meets the same counter and counts once."""
    codes = np.fromiter((row[a] for a in history if a in row), dtype=np.int32)
    return zlib.crc32(codes.tobytes()) % parts


def merge_counts(parts: Sequence[BehaviourCounts], n: int) -> BehaviourCounts:
    """The counts of disjoint partitions added up. Popularity and co-occurrence are whole numbers (exact in
    any order); the forward sums are float64, so they may differ from one pass's in the last bit (1e-16),
    far below the float32 rounding of the tables, which come out the same (the exact sums rounded once)."""
    pop = np.zeros(n, dtype=np.float64)
    fwd, co = PairSum(n), PairSum(n)
    used = 0
    for p in parts:
        pop += p.popularity
        fwd.add_matrix(p.forward)
        co.add_matrix(p.co)
        used += p.n_histories
    return BehaviourCounts(pop, fwd.result(), co.result(), used)


@dataclass
class BehaviourStats:
    ids: list[str]  # the catalog row order these tables were built for
    popularity: np.ndarray  # (n,) float32 counts of distinct histories
    forward: sp.csr_matrix  # (n, n): i then j
    symmetric: sp.csr_matrix  # (n, n): i and j close in either order
    n_histories: int
    window: int
    decay: float
    cf: np.ndarray | None = None  # (n, d) float32 collaborative item vectors, zero rows for unseen items

    @classmethod
    def empty(cls, ids: list[str], *, window: int = 5, decay: float = 0.8) -> "BehaviourStats":
        n = len(ids)
        z = sp.csr_matrix((n, n), dtype=np.float32)
        return cls(ids, np.zeros(n, dtype=np.float32), z, z.copy(), 0, window, decay)

    @classmethod
    def learn(
        cls,
        histories: Iterable[Sequence[str]],
        ids: list[str],
        *,
        window: int = 5,
        decay: float = 0.8,
        cf_dims: int = 64,
        chunk_events: int = CHUNK_EVENTS,
    ) -> "BehaviourStats":
        counts = count_behaviour(histories, ids, window=window, decay=decay, chunk_events=chunk_events)
        return cls.from_counts(counts, ids, window=window, decay=decay, cf_dims=cf_dims)

    @classmethod
    def from_counts(cls, counts: BehaviourCounts, ids: list[str], *, window: int, decay: float, cf_dims: int = 64) -> "BehaviourStats":
        """The tables from the counts (one pass's, or the merged partitions' of `adselect ingest --ray`)."""
        fwd = counts.forward.astype(np.float32)
        sym = (fwd + fwd.T).tocsr()
        cf = collaborative_vectors(counts, dims=cf_dims)
        log.info("behaviour learned", extra={"histories": counts.n_histories, "pairs": fwd.nnz})
        return cls(list(ids), counts.popularity.astype(np.float32), fwd, sym, counts.n_histories, window, decay, cf)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write a new generation of data files, then switch the manifest to it (see the module doc)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        previous = _manifest_files(directory)
        gen = secrets.token_hex(6)
        files = {"forward": f"covisit_forward.{gen}.npz", "popularity": f"popularity.{gen}.npy"}
        _write_atomic(directory / files["forward"], lambda fh: sp.save_npz(fh, self.forward))
        _write_atomic(directory / files["popularity"], lambda fh: np.save(fh, self.popularity))
        if self.cf is not None:
            files["cf"] = f"cf.{gen}.npy"
            _write_atomic(directory / files["cf"], lambda fh: np.save(fh, self.cf))
        meta = {"ids": self.ids, "n_histories": self.n_histories, "window": self.window, "decay": self.decay, "files": files}
        _write_atomic(directory / MANIFEST, lambda fh: fh.write(json.dumps(meta).encode()))
        _fsync_dir(directory)
        # Keep this generation and the one before (a reader may have read the old manifest just now).
        keep = set(files.values()) | set(previous.values()) | {MANIFEST}
        for p in directory.iterdir():
            stale_tmp = p.name.startswith(_TEMP_PREFIXES) and p.name.endswith(".tmp")  # from a killed save
            if p.name not in keep and (stale_tmp or p.name.startswith(_TABLE_PREFIXES)):
                p.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path, ids: list[str]) -> "BehaviourStats | None":
        directory = Path(directory)
        meta_path = directory / MANIFEST
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        files = _manifest_files(directory, meta)
        try:
            fwd = sp.load_npz(directory / files["forward"]).tocsr().astype(np.float32)
            pop = np.load(directory / files["popularity"]).astype(np.float32)
            cf = np.ascontiguousarray(np.load(directory / files["cf"]), dtype=np.float32) if "cf" in files else None
        except (OSError, ValueError) as e:  # a file the manifest names is missing or unreadable
            raise CatalogError(f"behaviour tables under {directory} are unreadable: {type(e).__name__}") from e
        stats = cls(meta["ids"], pop, fwd, (fwd + fwd.T).tocsr(), meta["n_histories"], meta["window"], meta["decay"], cf)
        return stats.aligned_to(ids)

    def aligned_to(self, ids: list[str]) -> "BehaviourStats":
        """Re-index onto another catalog row order (after a re-ingest changed the order or the ads)."""
        if ids == self.ids:
            return self
        old = {a: i for i, a in enumerate(self.ids)}
        n = len(ids)
        take = np.array([old.get(a, -1) for a in ids])
        have = take >= 0
        # P maps old rows -> new rows
        P = sp.csr_matrix((np.ones(int(have.sum()), dtype=np.float32), (np.nonzero(have)[0], take[have])), shape=(n, len(self.ids)))
        fwd = (P @ self.forward @ P.T).tocsr()
        pop = np.zeros(n, dtype=np.float32)
        pop[have] = self.popularity[take[have]]
        cf = None
        if self.cf is not None:
            cf = np.zeros((n, self.cf.shape[1]), dtype=np.float32)
            cf[have] = self.cf[take[have]]
        return BehaviourStats(ids, pop, fwd, (fwd + fwd.T).tocsr(), self.n_histories, self.window, self.decay, cf)

    def top_popular(self, n: int) -> np.ndarray:
        if n <= 0 or not self.popularity.any():
            return np.zeros(0, dtype=np.int64)
        k = min(n, len(self.popularity))
        part = np.argpartition(-self.popularity, k - 1)[:k]
        part = part[self.popularity[part] > 0]
        return part[np.argsort(-self.popularity[part], kind="stable")]


def collaborative_vectors(counts: BehaviourCounts, *, dims: int) -> np.ndarray | None:
    """Positive-PMI item co-occurrence (same history), truncated SVD, rows L2-normalised."""
    n = len(counts.popularity)
    if counts.n_histories == 0 or n < 3:
        return None
    co = counts.co  # canonical CSR, diagonal dropped: the (row, col) order the old COO build sorted into
    v = co.data
    if len(v) == 0:
        return None
    pop = counts.popularity
    r = np.repeat(np.arange(n, dtype=co.indices.dtype), np.diff(co.indptr))
    # PMI = log(v * sum(v) / (pop[r] * pop[c])), clipped at 0, evaluated in place in that order (the same
    # floats as before). Counts are whole numbers in float64: their sum is exact in any order.
    denom = pop[r]
    del r
    denom *= pop[co.indices]
    pmi = v * v.sum()
    pmi /= denom
    del denom
    np.log(pmi, out=pmi)
    np.maximum(pmi, 0.0, out=pmi)
    mat = sp.csr_matrix((pmi, co.indices.copy(), co.indptr.copy()), shape=(n, n))
    mat.eliminate_zeros()
    k = max(1, min(dims, n - 2, mat.nnz // 2 or 1))
    from scipy.sparse.linalg import svds

    u, s, _ = svds(mat, k=k, random_state=0)
    vecs = u * np.sqrt(s)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    vecs[pop == 0] = 0.0
    return np.ascontiguousarray(vecs, dtype=np.float32)


# ---- atomic files ------------------------------------------------------------------------------
def _manifest_files(directory: Path, meta: dict | None = None) -> dict[str, str]:
    """The data files a manifest names; manifests from before generations name the fixed legacy files."""
    if meta is None:
        try:
            meta = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
    if "files" in meta:
        return dict(meta["files"])
    legacy = {"forward": "covisit_forward.npz", "popularity": "popularity.npy"}
    if (directory / "cf.npy").exists():
        legacy["cf"] = "cf.npy"
    return legacy


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a hidden temp file beside `path`, flush it to disk, rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
