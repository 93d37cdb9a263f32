"""SIGKILL a process while it writes caps: the SQLite cap store stays intact and keeps what it confirmed.

Two writer processes reserve impressions in one `caps.sqlite` (the store as the service opens it,
`selection.caps.open_cap_store` over a data dir) and print each reservation the store confirmed; one is
killed with SIGKILL mid-writes, the other finishes. Afterwards the file passes `PRAGMA integrity_check`,
every confirmed reservation is in it, no cap is exceeded, and a new process can reserve again.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

from kernel.settings import REPO_ROOT, Settings
from selection.caps import open_cap_store

MAX_PER_AD, MAX_PER_ADVERTISER = 2, 5
WRITES = 4000  # the writer that is not killed finishes these

WRITER = textwrap.dedent(
    """
    import sys
    from kernel.settings import Settings
    from selection.caps import open_cap_store

    import time
    data_dir, n = sys.argv[1], int(sys.argv[2])
    store = open_cap_store(Settings(_env_file=None, data_dir=data_dir, redis_url=None, cap_max_per_ad={ad}, cap_max_per_advertiser={adv}))
    stop = time.monotonic() + 120  # bounded either way
    for i in range(n):
        if time.monotonic() > stop:
            break
        user, ad, adv = f"u{{i % 5000}}", f"ad{{i % 7}}", f"adv{{i % 3}}"  # enough users that reservations keep succeeding
        if store.try_reserve(user, ad, adv):
            print(f"{{user}} {{ad}} {{adv}}", flush=True)
    store.close()
    """
).format(ad=MAX_PER_AD, adv=MAX_PER_ADVERTISER)


def _writer(data_dir: Path, n: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSELECT_")}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), str(n)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_cap_store_survives_a_writer_killed_mid_writes(tmp_path: Path) -> None:
    killed, other = _writer(tmp_path, 10**7), _writer(tmp_path, WRITES)  # the first runs until it is killed
    confirmed: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 60
    while len(confirmed) < 40 and time.monotonic() < deadline:  # the killed writer is in the middle of its writes
        line = killed.stdout.readline()
        if not line:
            break
        confirmed.append(tuple(line.split()))
    os.kill(killed.pid, signal.SIGKILL)
    rest, killed_err = killed.communicate(timeout=30)
    confirmed += [tuple(x.split()) for x in rest.splitlines() if x.strip()]  # printed before the kill
    assert killed.returncode == -signal.SIGKILL and len(confirmed) >= 40, killed_err[-2000:]  # why it ended on its own, if it did
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    confirmed += [tuple(x.split()) for x in out.splitlines()]

    db = tmp_path / "caps.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT user_key, ad_id, advertiser FROM impressions").fetchall()
    # Every confirmed reservation is stored (rows are not keyed by writer, so compare as multisets).
    stored, said = Counter(rows), Counter(confirmed)
    assert all(stored[k] >= n for k, n in said.items())
    per_ad, per_adv = Counter((u, a) for u, a, _ in rows), Counter((u, v) for u, _, v in rows)
    assert max(per_ad.values()) <= MAX_PER_AD and max(per_adv.values()) <= MAX_PER_ADVERTISER

    store = open_cap_store(Settings(_env_file=None, data_dir=tmp_path, redis_url=None, cap_max_per_ad=MAX_PER_AD, cap_max_per_advertiser=MAX_PER_ADVERTISER))
    try:
        assert store.try_reserve("fresh-user", "ad0", "adv0") is True
        assert store.count("fresh-user", ad_id="ad0") == 1
    finally:
        store.close()
