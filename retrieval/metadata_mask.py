"""Chroma `where` filters evaluated in memory: one boolean mask over the catalog rows, vectorised.

The exact in-memory search (retrieval.candidates) uses it so a filtered nearest-neighbour query needs
no Chroma round trip. It evaluates the subset of Chroma's filter language the service writes
(selection.rules.chroma_where): `$and`/`$or`, `$eq`/`$ne`/`$in`/`$nin` and `$gt`/`$gte`/`$lt`/`$lte`,
over the stored metadata fields bid (number) and category, subcategory, advertiser (exact-case
strings), with Chroma's semantics. Anything else answers None: the caller then asks Chroma.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernel.types import Ad

STRING_FIELDS = ("category", "subcategory", "advertiser")
_COMPARE = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


@dataclass(frozen=True)
class MetadataColumns:
    """Per-row metadata as arrays: bids as float64, each string field as integer codes plus its vocabulary."""

    bid: np.ndarray
    codes: dict[str, np.ndarray]
    vocab: dict[str, dict[str, int]]

    @classmethod
    def from_ads(cls, ads: Sequence[Ad]) -> MetadataColumns:
        codes: dict[str, np.ndarray] = {}
        vocab: dict[str, dict[str, int]] = {}
        for name in STRING_FIELDS:
            v: dict[str, int] = {}
            codes[name] = np.fromiter((v.setdefault(getattr(a, name), len(v)) for a in ads), dtype=np.int32, count=len(ads))
            vocab[name] = v
        return cls(np.fromiter((float(a.bid) for a in ads), dtype=np.float64, count=len(ads)), codes, vocab)

    def mask(self, where: dict | None) -> np.ndarray | None:
        """Rows matching `where` (all rows for None), or None when the filter is outside the supported subset."""
        if where is None:
            return np.ones(len(self.bid), dtype=bool)
        try:
            return self._eval(where)
        except _Unsupported:
            return None

    def _eval(self, where: dict) -> np.ndarray:
        if not isinstance(where, dict) or len(where) != 1:
            raise _Unsupported
        (key, value), = where.items()
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise _Unsupported
            parts = [self._eval(w) for w in value]
            return np.logical_and.reduce(parts) if key == "$and" else np.logical_or.reduce(parts)
        return self._field(key, value)

    def _field(self, name: str, cond) -> np.ndarray:
        if not isinstance(cond, dict):
            cond = {"$eq": cond}
        if len(cond) != 1:
            raise _Unsupported
        (op, arg), = cond.items()
        if name == "bid":
            return self._number(op, arg)
        if name in self.codes:
            return self._string(name, op, arg)
        raise _Unsupported

    def _number(self, op: str, arg) -> np.ndarray:
        if isinstance(arg, bool):
            raise _Unsupported
        if op in _COMPARE and isinstance(arg, (int, float)):
            return _COMPARE[op](self.bid, float(arg))
        if op in ("$eq", "$ne") and isinstance(arg, (int, float)):
            return (self.bid == float(arg)) if op == "$eq" else (self.bid != float(arg))
        if op in ("$in", "$nin") and isinstance(arg, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg):
            hit = np.isin(self.bid, np.asarray(arg, dtype=np.float64))
            return hit if op == "$in" else ~hit
        raise _Unsupported

    def _string(self, name: str, op: str, arg) -> np.ndarray:
        col, vocab = self.codes[name], self.vocab[name]
        if op in ("$eq", "$ne") and isinstance(arg, str):
            hit = col == vocab.get(arg, -1)
            return hit if op == "$eq" else ~hit
        if op in ("$in", "$nin") and isinstance(arg, list) and all(isinstance(x, str) for x in arg):
            wanted = [vocab[x] for x in arg if x in vocab]
            hit = np.isin(col, np.asarray(wanted, dtype=np.int32)) if wanted else np.zeros(len(col), dtype=bool)
            return hit if op == "$in" else ~hit
        raise _Unsupported


class _Unsupported(Exception):
    """The filter uses something this module does not evaluate (the caller falls back to Chroma)."""
