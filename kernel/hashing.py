"""Keyed user hashing: the only form of a user id that reaches logs and cap storage.

`user_key()` is HMAC-SHA256(secret, user_id), hex, truncated to 32 characters (128 bits). Without the
secret the key cannot be reversed by hashing a list of candidate ids, unlike a plain SHA-256.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

KEY_CHARS = 32
MIN_SECRET_BYTES = 16
SECRET_FILENAME = "user_key.secret"


def user_key(user_id: str, *, secret: bytes) -> str:
    """Stable pseudonymous key for `user_id`: HMAC-SHA256 hex, first 32 chars."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"user key secret must be at least {MIN_SECRET_BYTES} bytes")
    return hmac.new(secret, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_CHARS]


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret at `path`, creating a random one (mode 0600) if absent.

    Creation is atomic across processes: the secret is written to a private temp file and published
    with a hard link, which fails if another process published first; the loser reads the winner's.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)
                log.info("created user key secret", extra={"path": str(path)})
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_text().strip().encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path}: user key secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def secret_from_settings(settings) -> bytes:
    """`settings.user_key_secret` if set, else the secret file under `settings.data_dir`."""
    configured = settings.user_key_secret
    if configured is not None:
        secret = configured.get_secret_value().encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"ADSELECT_USER_KEY_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return secret
    return load_or_create_secret(Path(settings.data_dir) / SECRET_FILENAME)
