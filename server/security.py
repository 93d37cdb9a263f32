"""API keys: who may call the service.

A key arrives in `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are kept only as SHA-256
digests and compared in constant time against every configured digest, so neither a key's length nor
the position of a mismatch leaks through timing. A caller is then known by a short key id (the first
12 hex characters of the digest): that id, never the key, names the caller's rate-limit bucket.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from pydantic import SecretStr

KEY_HEADER = "x-api-key"
AUTH_HEADER = "authorization"
KEY_ID_CHARS = 12


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(key: str) -> str:
    """The name a key goes by in limits and logs (not reversible to the key)."""
    return _digest(key).hex()[:KEY_ID_CHARS]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries, from X-API-Key or a Bearer Authorization header; None if neither."""
    key = headers.get(KEY_HEADER)
    if key:
        return key.strip() or None
    auth = headers.get(AUTH_HEADER, "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class ApiKeys:
    """The configured keys. Empty: authentication is off and `identify` is never consulted."""

    def __init__(self, keys: Iterable[SecretStr | str]):
        values = [k.get_secret_value() if isinstance(k, SecretStr) else k for k in keys]
        self._digests = [_digest(v) for v in values if v]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, headers: Mapping[str, str]) -> str | None:
        """The key id of a valid presented key, else None."""
        key = presented_key(headers)
        if key is None:
            return None
        d = _digest(key)
        ok = False
        for known in self._digests:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(d, known)
        return d.hex()[:KEY_ID_CHARS] if ok else None
