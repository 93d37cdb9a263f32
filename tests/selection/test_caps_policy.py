"""What the pipeline does when the cap store fails part-way through a response (caps_on_error), and when
anything else fails after some ads were reserved (the reservations are given back, an audit line is
written). The store underneath is a real SQLite cap store; only the failure is injected."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from kernel.types import SelectRequest
from selection.caps import CapConfig, CapStoreError, Reservation, SQLiteCapStore

HISTORY = ["run-001", "run-004", "run-009", "run-012"]


@dataclass
class FakeDyingCapStore:
    """A real SQLite cap store that fails with `error` on every reservation after the first `healthy` ones."""

    inner: SQLiteCapStore
    healthy: int
    error: type[BaseException] = CapStoreError
    reserved: list[Reservation] = field(default_factory=list)

    @property
    def config(self) -> CapConfig:
        return self.inner.config

    def reserve(self, user_key: str, ad_id: str, advertiser: str, *, now: float | None = None) -> Reservation | None:
        if len(self.reserved) >= self.healthy:
            raise self.error("the cap store went away")
        r = self.inner.reserve(user_key, ad_id, advertiser, now=now)
        if r is not None:
            self.reserved.append(r)
        return r

    def release(self, reservation: Reservation) -> None:
        self.inner.release(reservation)

    def count(self, user_key: str, **kw) -> int:
        return self.inner.count(user_key, **kw)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def sqlite_caps(tmp_path: Path) -> SQLiteCapStore:
    store = SQLiteCapStore(tmp_path / "caps.sqlite", config=CapConfig(max_per_ad=5, max_per_advertiser=None, window_s=3600))
    yield store
    store.close()


def run(sel, user: str):
    return asyncio.run(sel.aselect(SelectRequest(user_id=user, history=HISTORY, k=3, use_llm=False)))


def test_closed_serves_only_the_ads_whose_cap_was_checked(demo_services, sqlite_caps):
    caps = FakeDyingCapStore(sqlite_caps, healthy=1)
    sel = replace(demo_services.selector, caps=caps, caps_on_error="closed")
    user = f"u-{uuid.uuid4().hex}"
    d = run(sel, user)
    served = [a.ad.ad_id for a in d.ads]
    assert len(served) == 1 and served == [r.ad_id for r in caps.reserved]
    assert len(d.caps_unknown) == 2 and not set(d.caps_unknown) & set(served)
    assert sqlite_caps.count(sel.user_key(user), ad_id=served[0]) == 1


def test_open_serves_unrecorded_and_flags_it(demo_services, sqlite_caps):
    caps = FakeDyingCapStore(sqlite_caps, healthy=1)
    sel = replace(demo_services.selector, caps=caps, caps_on_error="open")
    user = f"u-{uuid.uuid4().hex}"
    d = run(sel, user)
    served = [a.ad.ad_id for a in d.ads]
    assert len(served) == 3 and d.caps_unknown == served[1:]
    key = sel.user_key(user)
    assert [sqlite_caps.count(key, ad_id=a) for a in served] == [1, 0, 0]


def test_a_failure_after_reserving_gives_the_reservations_back_and_is_audited(demo_services, sqlite_caps):
    lines: list[dict] = []
    caps = FakeDyingCapStore(sqlite_caps, healthy=2, error=RuntimeError)  # not a store outage: a bug
    sel = replace(demo_services.selector, caps=caps, audit=lines.append)
    user = f"u-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError):
        run(sel, user)
    assert len(caps.reserved) == 2
    key = sel.user_key(user)
    assert [sqlite_caps.count(key, ad_id=r.ad_id) for r in caps.reserved] == [0, 0]
    assert len(lines) == 1
    assert (lines[0]["chosen"], lines[0]["error"], lines[0]["released"], lines[0]["user"]) == ([], "RuntimeError", 2, key)
