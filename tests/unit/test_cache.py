# mypy: disable-error-code="comparison-overlap"
# (mypy narrows the `breaker.state` property across calls that change it.)
"""The prediction cache: key, envelope, memory tier, Redis tier behind its breaker (C1-C3, C5, C7)."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Any

import pytest

from serve_app.breaker import State
from serve_app.cache import (
    SCHEMA_VERSION,
    CacheLookup,
    MemoryTier,
    RedisTier,
    TieredCache,
    cache_key,
    canonical_json,
    decode_value,
    encode_value,
)
from serve_app.config import CacheConfig
from serve_app.metrics import Counters

from .conftest import FakeClock, FakeRedis

LM = {"model": "openai/sim-qa", "temperature": 0.0, "max_tokens": 512}
INPUTS = {"question": "What is Ray Serve?", "context": {"a": 1, "b": [1, 2, {"c": "d"}]}}
VALUE: dict[str, Any] = {
    "model": "qa",
    "program_version": "abc123",
    "outputs": {"answer": "a framework"},
    "usage": {"input_tokens": 10, "output_tokens": 3},
    "latency_ms": 5.0,
}


def key(**changes: Any) -> str:
    args: dict[str, Any] = {
        "prefix": "svc",
        "model": "qa",
        "variant": "default",
        "program_version": "v1",
        "lm_settings": LM,
        "inputs": INPUTS,
    }
    args.update(changes)
    return cache_key(**args)


# ----------------------------------------------------------------------------- cache_key


def test_key_ignores_key_order_and_whitespace() -> None:
    reordered = json.loads('{"context": {"b": [1, 2, {"c": "d"}], "a": 1},   "question": "What is Ray Serve?"}')
    assert list(reordered) != list(INPUTS)
    assert key(inputs=reordered) == key()
    assert key(lm_settings=dict(reversed(list(LM.items())))) == key()


def test_key_lives_under_the_prefix_and_names_its_parts() -> None:
    k = key()
    assert k.startswith("svc:p:qa:default:v1:")
    assert len(k.rsplit(":", 1)[1]) == 64  # sha256 hex


@pytest.mark.parametrize(
    "change",
    [
        {"model": "classify"},
        {"variant": "b"},
        {"program_version": "v2"},
        {"lm_settings": {**LM, "temperature": 0.7}},
        {"lm_settings": {**LM, "max_tokens": 256}},
        {"lm_settings": {**LM, "model": "openai/other"}},
        {"inputs": {**INPUTS, "question": "What is Ray Serve? "}},
        {"inputs": {**INPUTS, "context": {"a": 2, "b": [1, 2, {"c": "d"}]}}},
        {"inputs": {"question": "What is Ray Serve?"}},
        {"inputs": {**INPUTS, "extra": None}},
        {"prefix": "other"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_key_changes_with_anything_that_changes_an_answer(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_key_distinguishes_types_that_compare_equal_in_python() -> None:
    assert key(inputs={"n": 1}) != key(inputs={"n": "1"})
    assert key(inputs={"n": True}) != key(inputs={"n": 1})


@pytest.mark.parametrize("inputs", [
    {"question": "What is Ray?"},
    {"b": "é", "a": [1, {"d": 1, "c": 2.5}], "n": None, "t": True},
    {"z": {"y": {"x": ["ü", "\u2028", "日本"]}}, "": 0},
])
def test_keys_are_the_digest_of_the_canonical_lm_and_inputs(inputs: dict[str, Any]) -> None:
    """The key formula is unchanged by encoding the LM settings once (``cache_key_with``):
    caches written by earlier versions stay readable."""
    import hashlib

    from serve_app.codec import cache_key_with

    lm = {"model": "openai/sim-qa", "temperature": 0.0, "max_tokens": 512}
    digest = hashlib.sha256(json.dumps({"lm": lm, "inputs": inputs}, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode()).hexdigest()
    expected = f"pfx:p:qa:default:v1:{digest}"
    assert cache_key("pfx", "qa", "default", "v1", lm, inputs) == expected
    assert cache_key_with("pfx", "qa", "default", "v1", canonical_json(lm), inputs) == expected


def test_canonical_json_keeps_unicode_and_sorts() -> None:
    assert canonical_json({"b": "é", "a": [1, {"d": 1, "c": 2}]}) == '{"a":[1,{"c":2,"d":1}],"b":"é"}'


# ----------------------------------------------------------------------------- envelope


def test_encode_decode_round_trip() -> None:
    raw = encode_value(VALUE)
    assert json.loads(raw) == {"v": SCHEMA_VERSION, "value": VALUE}
    assert decode_value(raw) == VALUE
    assert decode_value(raw.decode()) == VALUE


def test_a_value_keeps_its_key_order_through_the_envelope() -> None:
    """An answer read back from Redis lists its output fields as the miss that produced it did."""
    value = {"outputs": {"reasoning": "r", "answer": "a", "confidence": 0.5}, "program_version": "v"}
    decoded = decode_value(encode_value(value, expires_at=123.0))
    assert decoded is not None
    assert list(decoded) == ["outputs", "program_version"]
    assert list(decoded["outputs"]) == ["reasoning", "answer", "confidence"]


class _Bomb:
    """A pickle whose loading would call ``_detonate`` (observable), like a planted payload."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_detonate, ("planted",))


DETONATIONS: list[str] = []


def _detonate(tag: str) -> dict[str, Any]:
    DETONATIONS.append(tag)
    return {"v": SCHEMA_VERSION, "value": {"pwned": True}}


def test_the_bomb_would_go_off_if_unpickled() -> None:
    DETONATIONS.clear()
    pickle.loads(pickle.dumps(_Bomb()))
    assert DETONATIONS == ["planted"]
    DETONATIONS.clear()


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff\xfe not json",
        b"",
        b"{truncated",
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        json.dumps(VALUE).encode(),  # a foreign JSON value: no envelope
        json.dumps({"v": SCHEMA_VERSION + 1, "value": VALUE}).encode(),
        json.dumps({"v": str(SCHEMA_VERSION), "value": VALUE}).encode(),
        json.dumps({"v": SCHEMA_VERSION, "value": [1, 2]}).encode(),
        json.dumps({"v": SCHEMA_VERSION}).encode(),
        pickle.dumps({"v": SCHEMA_VERSION, "value": VALUE}),
        pickle.dumps(_Bomb()),
        pickle.dumps(_Bomb(), protocol=0),
    ],
    ids=[
        "binary",
        "empty",
        "truncated",
        "list",
        "string",
        "null",
        "foreign",
        "newer-schema",
        "string-version",
        "value-not-object",
        "no-value",
        "pickle",
        "pickle-bomb",
        "pickle-bomb-protocol0",
    ],
)
def test_anything_but_our_envelope_decodes_to_none_and_is_never_unpickled(raw: bytes) -> None:
    DETONATIONS.clear()
    assert decode_value(raw) is None
    assert DETONATIONS == []


def test_deeply_nested_value_decodes_to_none() -> None:
    assert decode_value(b"[" * 100_000) is None


# ----------------------------------------------------------------------------- memory tier


def test_memory_lru_evicts_the_least_recently_used(clock: FakeClock) -> None:
    tier = MemoryTier(max_entries=2, ttl_s=60, clock=clock)
    tier.set("a", {"n": 1})
    tier.set("b", {"n": 2})
    assert tier.get("a") == {"n": 1}  # a is now the most recent
    tier.set("c", {"n": 3})
    assert len(tier) == 2
    assert tier.get("b") is None
    assert tier.get("a") == {"n": 1}
    assert tier.get("c") == {"n": 3}


def test_memory_overwrite_does_not_grow(clock: FakeClock) -> None:
    tier = MemoryTier(max_entries=2, ttl_s=60, clock=clock)
    for i in range(5):
        tier.set("a", {"n": i})
    assert len(tier) == 1
    assert tier.get("a") == {"n": 4}


def test_memory_ttl_expiry(clock: FakeClock) -> None:
    tier = MemoryTier(max_entries=10, ttl_s=10, clock=clock)
    tier.set("a", {"n": 1})
    tier.set("short", {"n": 2}, ttl_s=2)
    tier.set("long", {"n": 3}, ttl_s=1_000)  # capped at the tier TTL
    clock.advance(1.999)
    assert tier.get("short") == {"n": 2}
    clock.advance(0.001)
    assert tier.get("short") is None
    clock.advance(7.999)
    assert tier.get("a") == {"n": 1}
    assert tier.get("long") == {"n": 3}
    clock.advance(0.001)
    assert tier.get("a") is None
    assert tier.get("long") is None
    assert len(tier) == 0  # expired entries are dropped when seen


def test_memory_max_entries_zero_disables(clock: FakeClock) -> None:
    tier = MemoryTier(max_entries=0, ttl_s=10, clock=clock)
    tier.set("a", {"n": 1})
    assert len(tier) == 0
    assert tier.get("a") is None


def test_memory_clear(clock: FakeClock) -> None:
    tier = MemoryTier(max_entries=3, ttl_s=10, clock=clock)
    tier.set("a", {})
    tier.clear()
    assert len(tier) == 0


# ----------------------------------------------------------------------------- tiered cache


def config(**overrides: Any) -> CacheConfig:
    raw: dict[str, Any] = {
        "key_prefix": "svc",
        "memory_max_entries": 100,
        "memory_ttl_s": 300,
        "redis": {"url": "redis://fake:6379/0"},
        "redis_ttl_s": 1_000,
        "max_value_bytes": 1024,
        "timeout_s": 0.02,
    }
    raw.update(overrides)
    return CacheConfig.model_validate(raw)


def tiered(redis: FakeRedis, clock: FakeClock, counters: Counters | None = None, **overrides: Any) -> TieredCache:
    return TieredCache.from_config(
        config(**overrides), counters=counters or Counters(), redis_client=redis, clock=clock
    )


def ops(cache: TieredCache, **labels: str) -> float:
    return cache.counters.total("cache_ops", **labels)


async def test_memory_hit(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    assert await cache.set("svc:k", VALUE) is True
    await cache.drain()
    fake_redis.get_calls.clear()
    hit = await cache.get("svc:k")
    assert isinstance(hit, CacheLookup)
    assert hit == {"value": VALUE, "tier": "memory"}
    assert fake_redis.get_calls == []  # memory answered
    assert ops(cache, tier="memory", op="get", result="hit") == 1


async def test_miss_in_both_tiers(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    assert await cache.get("svc:nothing") is None
    assert ops(cache, tier="memory", result="miss") == 1
    assert ops(cache, tier="redis", result="miss") == 1


async def test_set_writes_both_tiers_with_our_envelope(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    await cache.set("svc:k", VALUE)
    await cache.drain()
    raw, _ = fake_redis.store["svc:k"]
    assert decode_value(raw) == VALUE
    assert ops(cache, tier="redis", op="set", result="ok") == 1


async def test_redis_hit_is_promoted_to_memory(fake_redis: FakeRedis, clock: FakeClock) -> None:
    fake_redis.plant("svc:k", encode_value(VALUE))  # written by another Cache replica
    cache = tiered(fake_redis, clock)
    first = await cache.get("svc:k")
    assert first == {"value": VALUE, "tier": "redis"}
    second = await cache.get("svc:k")
    assert second == {"value": VALUE, "tier": "memory"}
    assert fake_redis.get_calls == ["svc:k"]


async def test_many_at_once_answers_each_key_in_order_from_its_tier(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    other = {**VALUE, "program_version": "other"}
    assert await cache.set_many([("svc:mem", VALUE, None), ("svc:big", {"x": "y" * 300_000}, None)]) == [True, False]
    fake_redis.plant("svc:red", encode_value(other))
    found = await cache.get_many(["svc:red", "svc:none", "svc:mem"])
    assert found == [{"value": other, "tier": "redis"}, None, {"value": VALUE, "tier": "memory"}]
    assert await cache.get_many([]) == []


async def test_too_large_value_is_not_stored(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    big = {**VALUE, "outputs": {"answer": "x" * 2_000}}
    assert await cache.set("svc:big", big) is False
    await cache.drain()
    assert fake_redis.set_calls == []
    assert len(cache.memory) == 0
    assert await cache.get("svc:big") is None
    assert ops(cache, op="set", result="too_large") == 1


async def test_redis_error_is_a_miss_and_a_counter(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    fake_redis.fail_with = ConnectionError("Connection refused")
    assert await cache.get("svc:k") is None
    assert cache.counters.total("cache_ops", tier="redis", result="error") == 1
    # A write still lands in memory; the Redis part fails quietly in the background.
    assert await cache.set("svc:k", VALUE) is True
    await cache.drain()
    assert cache.counters.total("cache_ops", tier="redis", op="set", result="error") == 1
    assert await cache.get("svc:k") == {"value": VALUE, "tier": "memory"}


async def test_hung_redis_returns_within_the_call_timeout(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock, timeout_s=0.02)
    fake_redis.hang = asyncio.Event()  # like SIGSTOP: the socket never answers
    started = time.perf_counter()
    assert await cache.get("svc:k") is None
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"waited {elapsed:.3f}s on a hung Redis"
    assert cache.counters.total("cache_ops", tier="redis", result="error") == 1
    fake_redis.hang.set()


async def test_outage_trips_the_redis_breaker_and_recovers(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    assert cache.redis is not None
    fake_redis.fail_with = ConnectionError("down")
    for _ in range(3):  # REDIS_BREAKER: min_calls=3, 50 % failures
        assert await cache.get("svc:k") is None
    assert cache.redis.breaker.state is State.OPEN
    calls_when_open = len(fake_redis.get_calls)

    assert await cache.get("svc:k") is None
    assert len(fake_redis.get_calls) == calls_when_open, "an open tier must not be called"
    assert cache.counters.total("cache_ops", tier="redis", result="skipped") == 1
    stats = cache.stats()
    assert stats["redis"]["state"] == "OPEN"

    # Redis comes back; after the open period (1 s + jitter <= 1.1 s) one probe goes through.
    fake_redis.fail_with = None
    fake_redis.plant("svc:k", encode_value(VALUE))
    clock.advance(1.2)
    assert await cache.get("svc:k") == {"value": VALUE, "tier": "redis"}
    assert cache.redis.breaker.state is State.CLOSED
    assert len(fake_redis.get_calls) == calls_when_open + 1


async def test_open_breaker_skips_writes_too(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    fake_redis.fail_with = ConnectionError("down")
    for _ in range(3):
        await cache.get("svc:x")
    fake_redis.fail_with = None
    assert await cache.set("svc:k", VALUE) is True  # memory still works
    await cache.drain()
    assert fake_redis.set_calls == []
    assert cache.counters.total("cache_ops", tier="redis", op="set", result="skipped") == 1


@pytest.mark.parametrize(
    "raw",
    [b"\x80\x04garbage", json.dumps({"answer": "foreign"}).encode(), pickle.dumps(_Bomb())],
    ids=["corrupt", "foreign", "pickle-bomb"],
)
async def test_planted_value_in_redis_is_a_counted_miss(fake_redis: FakeRedis, clock: FakeClock, raw: bytes) -> None:
    DETONATIONS.clear()
    fake_redis.plant("svc:k", raw)
    cache = tiered(fake_redis, clock)
    assert await cache.get("svc:k") is None
    assert cache.counters.total("cache_ops", tier="redis", result="corrupt") == 1
    assert len(cache.memory) == 0, "a corrupt value must not be promoted"
    assert DETONATIONS == []
    assert cache.redis is not None and cache.redis.breaker.state is State.CLOSED


async def test_redis_ttl_has_jitter_within_ten_percent(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock, redis_ttl_s=100)
    for i in range(50):
        await cache.set(f"svc:{i}", VALUE)
    await cache.set("svc:model-ttl", VALUE, ttl_s=10)  # a model's cache_ttl_s override
    await cache.drain()
    pxs = [px for _, _, px in fake_redis.set_calls[:50]]
    assert all(px is not None and 100_000 <= px <= 110_000 for px in pxs), pxs
    assert len(set(pxs)) > 1, "no jitter at all"
    override = fake_redis.set_calls[-1][2]
    assert override is not None and 10_000 <= override <= 11_000


@pytest.mark.parametrize(("rand", "px"), [(0.0, 100_000), (0.5, 105_000), (0.999999, 109_999)])
async def test_redis_tier_jitter_bounds(fake_redis: FakeRedis, clock: FakeClock, rand: float, px: int) -> None:
    tier = RedisTier(fake_redis, ttl_s=100, call_timeout_s=0.1, counters=Counters(), clock=clock, rand=lambda: rand)
    assert await tier.set("svc:k", b"x", tier.ttl_for(None)) is True
    assert fake_redis.set_calls[-1][2] == px


async def test_entries_expire_in_redis_with_their_ttl(fake_redis: FakeRedis, clock: FakeClock) -> None:
    writer = tiered(fake_redis, clock, redis_ttl_s=100)
    await writer.set("svc:k", VALUE)
    await writer.drain()
    reader = tiered(fake_redis, clock)  # another replica, cold memory
    clock.advance(99)
    assert await reader.get("svc:k") is not None
    cold = tiered(fake_redis, clock)
    clock.advance(12)  # past ttl x 1.1
    assert await cold.get("svc:k") is None


async def test_promoted_entry_does_not_outlive_its_ttl(fake_redis: FakeRedis, clock: FakeClock) -> None:
    writer = tiered(fake_redis, clock)
    await writer.set("svc:k", VALUE, ttl_s=10)  # model cache_ttl_s = 10 s
    await writer.drain()
    reader = tiered(fake_redis, clock)  # another Cache replica
    clock.advance(5)
    assert await reader.get("svc:k") == {"value": VALUE, "tier": "redis"}
    clock.advance(20)  # 25 s after the write: expired everywhere
    assert await reader.get("svc:k") is None


async def test_drain_completes_background_writes(fake_redis: FakeRedis, clock: FakeClock) -> None:
    gate = asyncio.Event()
    fake_redis.hang = gate
    cache = tiered(fake_redis, clock, timeout_s=5)
    for i in range(5):
        await cache.set(f"svc:{i}", VALUE)
    await asyncio.sleep(0)  # let the background writes start
    assert len(fake_redis.set_calls) == 5 and fake_redis.store == {}
    gate.set()
    await cache.drain()
    assert sorted(fake_redis.store) == [f"svc:{i}" for i in range(5)]
    assert cache.counters.total("cache_ops", tier="redis", op="set", result="ok") == 5


async def test_memory_only_cache(clock: FakeClock) -> None:
    cache = TieredCache.from_config(config(redis=None), clock=clock)
    assert cache.redis is None
    assert await cache.get("svc:k") is None
    await cache.set("svc:k", VALUE)
    assert await cache.get("svc:k") == {"value": VALUE, "tier": "memory"}
    assert cache.stats()["redis"] is None
    await cache.close()


def test_url_env_must_be_set(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="REDIS_URL_FOR_TEST is not set"):
        TieredCache.from_config(config(redis={"url_env": "REDIS_URL_FOR_TEST"}), env={}, clock=clock)


async def test_close_drains_and_closes_the_client(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    await cache.set("svc:k", VALUE)
    await cache.close()
    assert "svc:k" in fake_redis.store
    assert fake_redis.closed


async def test_stats_shape(fake_redis: FakeRedis, clock: FakeClock) -> None:
    cache = tiered(fake_redis, clock)
    await cache.set("svc:k", VALUE)
    await cache.drain()
    stats = cache.stats()
    assert stats["memory_entries"] == 1
    assert stats["redis"]["state"] == "CLOSED"
    assert {"name": "cache_ops", "labels": {"op": "set", "result": "ok", "tier": "redis"}, "value": 1.0} in stats["ops"]


async def test_planted_deeply_nested_value_is_a_counted_miss(fake_redis: FakeRedis, clock: FakeClock) -> None:
    fake_redis.plant("svc:k", b"[" * 100_000)
    cache = tiered(fake_redis, clock)
    assert await cache.get("svc:k") is None  # "never raises"
    assert cache.counters.total("cache_ops", tier="redis", result="corrupt") == 1
