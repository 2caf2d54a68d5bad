"""The key index: which lookups a router may skip, and the sync that keeps it honest."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.cache import MemoryTier, TieredCache
from serve_app.config import CacheConfig
from serve_app.key_index import KeyIndex, WriterRegistry, key_digest
from serve_app.metrics import Counters
from serve_app.router import RouterCore

from .conftest import FakeCache, FakeClock, FakePredictor, FakeRedis, app_args

Q = {"question": "What is Ray Serve?"}
NO_NEAR = {"near_max_entries": 0}  # every near-cache miss is a lookup decision


class Stop(BaseException):
    """Ends an ``index_loop`` at its first sleep (it swallows ``Exception``, not this)."""


async def stop(_: float) -> None:
    raise Stop


async def sync_once(core: RouterCore) -> None:
    with pytest.raises(Stop):
        await core.index_loop(sleep=stop)


def build(cache: FakeCache, **cache_cfg: Any) -> tuple[RouterCore, FakePredictor]:
    predictor = FakePredictor()
    core = RouterCore(app_args(cache={**NO_NEAR, **cache_cfg}), {"qa": predictor}, cache, clock=FakeClock(),
                      counters=Counters())
    return core, predictor


async def ask(core: RouterCore, question: str) -> str:
    from serve_app.schemas import PredictRequest

    out = await core.predict(PredictRequest(model="qa", inputs={"question": question}), "rid")
    await core.drain()
    return out.headers["X-Cache"]


# ----------------------------------------------------------------------------- KeyIndex


def test_an_index_not_ready_may_hold_anything() -> None:
    index = KeyIndex(10, 60.0, FakeClock())
    assert index.may_hold("never written")
    index.add("k1")
    assert index.may_hold("k2"), "not ready: no key is ruled out"


def test_a_seeded_index_rules_out_what_was_neither_seeded_nor_written() -> None:
    clock = FakeClock()
    index = KeyIndex(10, 60.0, clock)
    index.add("written before the seed")
    index.seed([key_digest("in the Cache")])
    assert index.ready
    assert index.may_hold("in the Cache") and index.may_hold("written before the seed")
    assert not index.may_hold("new input")
    index.add("new input")
    assert index.may_hold("new input")
    index.disable()
    assert index.may_hold("anything at all")


def test_entries_expire_with_the_cache_ttl_and_the_oldest_leave_first() -> None:
    clock = FakeClock()
    index = KeyIndex(3, 60.0, clock)
    index.seed([])
    index.add("a")
    clock.advance(30)
    index.add("b")
    clock.advance(31)
    assert not index.may_hold("a"), "the Cache dropped it at its TTL"
    assert index.may_hold("b")
    for key in ("c", "d", "e"):
        index.add(key)
    assert len(index) == 3 and not index.may_hold("b"), "over the cap the oldest goes first"
    assert all(index.may_hold(k) for k in ("c", "d", "e"))


def test_writers_are_forgotten_when_they_stop_syncing() -> None:
    clock = FakeClock()
    reg = WriterRegistry(ttl_s=10.0, clock=clock)
    assert reg.touch("a") == 1
    assert reg.touch("b") == 2 and reg.touch("a") == 2
    clock.advance(11)
    assert reg.touch("a") == 1


def test_key_digests_are_stable_64_bit_ints() -> None:
    assert key_digest("x") == key_digest("x") != key_digest("y")
    assert 0 <= key_digest("x") < 2**64


# ----------------------------------------------------------------------------- the Cache side


async def test_the_cache_answers_its_live_keys_and_counts_writers(fake_redis: FakeRedis) -> None:
    clock = FakeClock()
    cache = TieredCache(CacheConfig(), MemoryTier(100, 60.0, clock), None, Counters(), clock=clock)
    await cache.set("k1", {"v": 1})
    clock.advance(30)
    await cache.set("k2", {"v": 2})
    clock.advance(31)
    assert cache.index_sync("router-a", True) == {"writers": 1, "digests": [key_digest("k2")]}
    assert cache.index_sync("router-b", False) == {"writers": 2, "digests": None}
    with_redis = TieredCache.from_config(CacheConfig(redis={"url": "redis://x"}), redis_client=fake_redis)
    assert with_redis.index_sync("router-a", True) is None, "Redis holds keys no router can know"


# ----------------------------------------------------------------------------- the router


async def test_a_sole_writer_skips_the_lookup_of_a_first_time_input_and_looks_up_what_it_wrote() -> None:
    cache = FakeCache()
    core, predictor = build(cache)
    assert (await core.ready())[1]["router"]["lookup_index"] == "syncing"
    await sync_once(core)
    assert cache.index_syncs == [(core.cache.writer_id, True)]
    assert (await core.ready())[1]["router"]["lookup_index"] == "on"

    assert await ask(core, "first time") == "MISS"
    assert cache.get_calls == [], "a certain miss: no hop"
    assert len(cache.set_calls) == 1
    assert core.counters.get("cache_ops", tier="index", op="get", result="skip") == 1

    assert await ask(core, "first time") == "HIT-MEMORY"
    assert len(cache.get_calls) == 1 and len(predictor.predict_calls) == 1


async def test_keys_already_in_the_cache_at_the_sync_are_looked_up() -> None:
    cache = FakeCache()
    writer, _ = build(cache, lookup_index=False)
    assert await ask(writer, "from an earlier router") == "MISS"
    core, predictor = build(cache)
    await sync_once(core)
    assert await ask(core, "from an earlier router") == "HIT-MEMORY"
    assert predictor.predict_calls == []


async def test_another_writer_turns_skipping_off_until_it_is_gone() -> None:
    cache = FakeCache()
    core, _ = build(cache)
    await sync_once(core)
    cache.other_writers = 1
    await sync_once(core)
    await ask(core, "q1")
    assert cache.get_calls != [], "with two writers every near-cache miss is looked up"
    cache.other_writers = 0
    await sync_once(core)
    assert cache.index_syncs[-1] == (core.cache.writer_id, True), "re-seeded: the other may have written"
    looked = len(cache.get_calls)
    await ask(core, "q2")
    assert len(cache.get_calls) == looked


async def test_a_redis_tier_or_the_switch_means_every_lookup_is_made() -> None:
    shared = FakeCache()
    shared.shared = True
    core, _ = build(shared)
    await asyncio.wait_for(core.index_loop(sleep=stop), 1)  # returns: nothing to keep
    await ask(core, "q")
    assert shared.get_calls != []

    off = FakeCache()
    core, _ = build(off, lookup_index=False)
    await asyncio.wait_for(core.index_loop(sleep=stop), 1)
    await ask(core, "q")
    assert off.index_syncs == [] and off.get_calls != []
    assert (await core.ready())[1]["router"]["lookup_index"] == "off"


async def test_a_failing_sync_turns_skipping_off_and_is_counted() -> None:
    cache = FakeCache()
    core, _ = build(cache)
    await sync_once(core)
    cache.fail_with = ConnectionError("cache replica gone")
    await sync_once(core)
    assert core.counters.get("cache_client_errors", op="index_sync") == 1
    cache.fail_with = None
    await ask(core, "q")
    assert cache.get_calls != []
