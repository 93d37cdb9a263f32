"""The content hash of an ad: what its LLM-derived data (rewrites, understanding) is cached under.

Only the fields the model reads or that change what an ad says are hashed (title, text, category,
subcategory, advertiser, landing URL); the bid and metadata are not, so a bid change keeps the cache.
"""
from __future__ import annotations

import hashlib
import json

from kernel.types import Ad

CONTENT_FIELDS = ("title", "text", "category", "subcategory", "advertiser", "landing_url")


def ad_content_hash(ad: Ad) -> str:
    """sha256 hex of the ad's content fields (stable across processes and Python versions)."""
    payload = json.dumps([getattr(ad, f) for f in CONTENT_FIELDS], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
