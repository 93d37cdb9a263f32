"""The limit primitives on their own: token buckets (with a fake clock), the in-flight gate, the body reader,
API key parsing and matching."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from kernel.settings import Settings
from server.limits import BodyTooLarge, ClientGone, InFlightGate, Tally, TokenBuckets, drain, read_body, replay
from server.security import ApiKeys, key_id, presented_key


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_spends_refills_and_names_the_wait():
    clock = Clock()
    b = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)  # one token takes 1/rate seconds
    assert b.take("b") == 0.0  # callers do not share a bucket
    clock.t += 0.5
    assert b.take("a") == 0.0
    assert b.take("a") > 0
    clock.t += 60  # refills up to the burst, not beyond
    assert [b.take("a") for _ in range(4)].count(0.0) == 3
    assert TokenBuckets.retry_after(0.01) == "1" and TokenBuckets.retry_after(2.2) == "3"


def test_token_buckets_forget_the_least_recent_caller_past_the_bound():
    b = TokenBuckets(rate=1.0, burst=1, max_callers=2, clock=Clock())
    for caller in ("a", "b", "c"):
        b.take(caller)
    assert list(b._buckets) == ["b", "c"]
    assert b.take("a") == 0.0  # a forgotten caller starts with a full bucket


def test_gate_admits_up_to_its_limit():
    g = InFlightGate(2)
    assert g.try_enter() and g.try_enter() and not g.try_enter()
    g.leave()
    assert g.try_enter()


def _receiver(*chunks: bytes, disconnect: bool = False):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect:
        messages = messages[:1] + [{"type": "http.disconnect"}]
    it = iter(messages)

    async def receive():
        return next(it)

    return receive


def test_read_body_counts_streamed_bytes_and_trusts_no_missing_length():
    assert asyncio.run(read_body(_receiver(b"ab", b"cd"), limit=4, declared=None)) == b"abcd"
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(_receiver(b"ab", b"cde"), limit=4, declared=None))
    with pytest.raises(BodyTooLarge):  # declared too large: refused before reading
        asyncio.run(read_body(_receiver(), limit=4, declared=5))
    with pytest.raises(ClientGone):
        asyncio.run(read_body(_receiver(b"a", b"b", disconnect=True), limit=4, declared=None))


def test_body_too_large_says_whether_the_body_ended():
    with pytest.raises(BodyTooLarge) as info:  # the oversized chunk was the last: nothing left to drain
        asyncio.run(read_body(_receiver(b"ab", b"cde"), limit=4, declared=None))
    assert info.value.ended
    with pytest.raises(BodyTooLarge) as info:
        asyncio.run(read_body(_receiver(b"abcde", b"f"), limit=4, declared=None))
    assert not info.value.ended


def test_drain_drops_at_most_its_limit():
    assert asyncio.run(drain(_receiver(b"ab", b"cd", b"ef"), limit=10)) is True
    assert asyncio.run(drain(_receiver(b"abcd", b"efgh", b"ij"), limit=5)) is False  # stops past the bound
    with pytest.raises(ClientGone):
        asyncio.run(drain(_receiver(b"a", b"b", disconnect=True), limit=10))


def test_tally_counts_what_is_held():
    t = Tally()
    with t.held():
        with t.held():
            assert t.n == 2
    assert t.n == 0
    with pytest.raises(KeyError), t.held():
        raise KeyError("x")
    assert t.n == 0


def test_replay_hands_over_the_body_once():
    async def later():
        return {"type": "http.disconnect"}

    async def go():
        r = replay(b"xyz", later)
        return [await r(), await r()]

    first, second = asyncio.run(go())
    assert first == {"type": "http.request", "body": b"xyz", "more_body": False} and second["type"] == "http.disconnect"


def test_api_keys_from_env_forms(monkeypatch):
    monkeypatch.setenv("ADSELECT_API_KEYS", " k1, k2 ,,")
    assert [k.get_secret_value() for k in Settings(_env_file=None).api_keys] == ["k1", "k2"]
    monkeypatch.setenv("ADSELECT_API_KEYS", '["k3", "k4"]')
    assert [k.get_secret_value() for k in Settings(_env_file=None).api_keys] == ["k3", "k4"]
    monkeypatch.setenv("ADSELECT_API_KEYS", "")
    assert Settings(_env_file=None).api_keys == []
    assert "k3" not in repr(Settings(_env_file=None, api_keys=["k3"]))


def test_key_matching_and_headers():
    keys = ApiKeys([SecretStr("alpha"), "beta"])
    assert keys.enabled and not ApiKeys([]).enabled
    assert keys.identify({"x-api-key": "beta"}) == key_id("beta") != key_id("alpha")
    assert keys.identify({"authorization": "Bearer alpha"}) == key_id("alpha")
    assert keys.identify({"x-api-key": "alph"}) is None and keys.identify({}) is None
    assert presented_key({"authorization": "Basic alpha"}) is None
    assert presented_key({"x-api-key": "  "}) is None
    assert len(key_id("alpha")) == 12 and "alpha" not in key_id("alpha")
