"""The prediction cache: a memory tier, and the memory and Redis tiers together.

Keys and stored values are ``codec``'s; the Redis tier is ``redis_tier``'s (both re-exported
here). Contracts:
- ``TieredCache.get`` / ``set`` never raise: a failing or slow tier is a miss (or a skipped
  write) plus a counter. Redis calls carry their own short timeouts and no retries, and the
  Redis tier sits behind a circuit breaker so an outage is skipped instead of waited on,
  and comes back by itself once Redis answers again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .codec import SCHEMA_VERSION, cache_key, canonical_json, decode_envelope, decode_value, encode_value
from .config import CacheConfig
from .key_index import IndexSync, WriterRegistry, key_digest
from .metrics import Counters
from .redis_tier import RedisClient, RedisTier, redis_from_url

__all__ = [
    "cache_key",
    "canonical_json",
    "encode_value",
    "decode_value",
    "decode_envelope",
    "MemoryTier",
    "RedisClient",
    "RedisTier",
    "redis_from_url",
    "TieredCache",
    "CacheLookup",
    "SCHEMA_VERSION",
]

Tier = Literal["memory", "redis"]


class CacheLookup(dict):  # type: ignore[type-arg]
    """``{"value": {...}, "tier": "memory" | "redis"}`` (a dict: cheap across handles)."""


class MemoryTier:
    """An LRU with per-entry expiry. Not thread-safe: one event loop owns it."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._ttl = ttl_s
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> dict[str, Any] | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> bool:
        """Store for ``min(ttl_s, tier TTL)``; False when the tier is off or the TTL is spent."""
        ttl = self._ttl if ttl_s is None else min(ttl_s, self._ttl)
        if self._max <= 0 or ttl <= 0:
            return False
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)
        return True

    def live_keys(self) -> list[str]:
        now = self._clock()
        return [key for key, (expires, _) in self._data.items() if expires > now]

    def clear(self) -> None:
        self._data.clear()


class TieredCache:
    """Memory first, then Redis (a Redis hit is promoted to memory). Never raises."""

    def __init__(
        self,
        config: CacheConfig,
        memory: MemoryTier,
        redis: RedisTier | None,
        counters: Counters,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self.memory = memory
        self.redis = redis
        self.counters = counters
        self._wall = wall  # absolute expiries are shared across replicas: wall-clock time
        self._pending: set[asyncio.Task[Any]] = set()
        self.writers = WriterRegistry(clock=clock)  # routers syncing their key index (key_index)

    @classmethod
    def from_config(
        cls,
        config: CacheConfig,
        *,
        counters: Counters | None = None,
        redis_client: RedisClient | None = None,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> "TieredCache":
        import os

        counters = counters or Counters()
        memory = MemoryTier(config.memory_max_entries, config.memory_ttl_s, clock)
        redis_tier = None
        if config.redis is not None:
            if redis_client is None:
                env = os.environ if env is None else env
                url = config.redis.url or env.get(config.redis.url_env or "", "")
                if not url:
                    raise ValueError(f"cache.redis.url_env: environment variable {config.redis.url_env} is not set")
                redis_client = redis_from_url(url, config.redis.socket_timeout_s, config.redis.connect_timeout_s)
            redis_tier = RedisTier(
                redis_client, ttl_s=config.redis_ttl_s, call_timeout_s=config.timeout_s, counters=counters, clock=clock
            )
        return cls(config, memory, redis_tier, counters, wall, clock)

    async def get(self, key: str) -> CacheLookup | None:
        value = self.memory.get(key)
        if value is not None:
            self.counters.inc("cache_ops", tier="memory", op="get", result="hit")
            return CacheLookup(value=value, tier="memory")
        self.counters.inc("cache_ops", tier="memory", op="get", result="miss")
        if self.redis is None:
            return None
        found = await self.redis.get(key)
        if found is None:
            return None
        value, expires_at = found
        # Promote for no longer than the value has left in Redis.
        remaining = None if expires_at is None else expires_at - self._wall()
        self.memory.set(key, value, remaining)
        return CacheLookup(value=value, tier="redis")

    async def set(self, key: str, value: dict[str, Any], ttl_s: float | None = None) -> bool:
        """Store in memory now and in Redis in the background; False if not stored."""
        redis_ttl = None if self.redis is None else self.redis.ttl_for(ttl_s)
        expires_at = None if redis_ttl is None else self._wall() + redis_ttl
        payload = encode_value(value, expires_at)
        if len(payload) > self._config.max_value_bytes:
            self.counters.inc("cache_ops", tier="memory", op="set", result="too_large")
            return False
        if self.memory.set(key, value, ttl_s):
            self.counters.inc("cache_ops", tier="memory", op="set", result="ok")
        if self.redis is not None and redis_ttl is not None:
            task = asyncio.get_running_loop().create_task(self.redis.set(key, payload, redis_ttl))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return True

    async def get_many(self, keys: Sequence[str]) -> list[CacheLookup | None]:
        """``get`` for each key, in order: memory answers at once, Redis lookups run together."""
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    async def set_many(self, items: Sequence[tuple[str, dict[str, Any], float | None]]) -> list[bool]:
        """``set`` for each ``(key, value, ttl_s)``, in order."""
        return [await self.set(key, value, ttl_s) for key, value, ttl_s in items]

    def index_sync(self, writer: str, want_keys: bool) -> IndexSync | None:
        """A router's sync for its ``key_index.KeyIndex``: records ``writer`` and answers how
        many routers write here and, if asked, the digests of the memory tier's live keys.
        None with a Redis tier: it holds keys written by anyone, at any time, so no router can
        know them all."""
        if self.redis is not None:
            return None
        digests = [key_digest(key) for key in self.memory.live_keys()] if want_keys else None
        return IndexSync(writers=self.writers.touch(writer), digests=digests)

    async def drain(self) -> None:
        """Wait for background writes (tests and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "memory_entries": len(self.memory),
            "redis": None if self.redis is None else self.redis.breaker.snapshot(),
            "ops": self.counters.snapshot(),
        }

    async def close(self) -> None:
        await self.drain()
        if self.redis is not None:
            await self.redis.close()
