from __future__ import annotations

import hashlib
import hmac
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr

from kernel.hashing import load_or_create_secret, secret_from_settings, user_key
from kernel.settings import Settings

SECRET = b"0123456789abcdef-test"


def test_user_key_is_truncated_hmac_sha256_hex():
    key = user_key("user-42", secret=SECRET)
    assert key == hmac.new(SECRET, b"user-42", hashlib.sha256).hexdigest()[:32]
    assert len(key) == 32 and int(key, 16) >= 0


def test_user_key_is_stable_and_keyed():
    assert user_key("u", secret=SECRET) == user_key("u", secret=SECRET)
    assert user_key("u", secret=SECRET) != user_key("v", secret=SECRET)
    assert user_key("u", secret=SECRET) != user_key("u", secret=SECRET + b"!")
    assert user_key("u", secret=SECRET) != hashlib.sha256(b"u").hexdigest()[:32]


def test_user_key_handles_unicode():
    assert user_key("ユーザー", secret=SECRET) != user_key("ユーザ", secret=SECRET)


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        user_key("u", secret=b"short")


def test_secret_file_is_created_once_private_and_reused(tmp_path: Path):
    path = tmp_path / "state" / "user_key.secret"
    with ThreadPoolExecutor(max_workers=8) as pool:
        secrets = set(pool.map(lambda _: load_or_create_secret(path), range(16)))
    assert len(secrets) == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == secrets.pop()
    assert [p.name for p in path.parent.iterdir()] == ["user_key.secret"], "no temp files left behind"


def test_secret_from_settings(tmp_path: Path):
    configured = Settings(_env_file=None, data_dir=tmp_path, user_key_secret=SecretStr("x" * 20))
    assert secret_from_settings(configured) == b"x" * 20
    assert "x" * 20 not in repr(configured)
    generated = secret_from_settings(Settings(_env_file=None, data_dir=tmp_path))
    assert generated == (tmp_path / "user_key.secret").read_text().strip().encode()
    with pytest.raises(ValueError):
        secret_from_settings(Settings(_env_file=None, data_dir=tmp_path, user_key_secret=SecretStr("short")))
