"""The prediction cache: its key, a memory tier, a Redis tier, and the two in tiers.

Contracts:
- ``cache_key`` covers everything that changes an answer: model, variant, program version,
  the LM settings that matter, and the canonical JSON of the inputs (key order and
  whitespace do not matter). Keys live under the configured prefix.
- Values are JSON envelopes ``{"v": 1, "value": {...}}``, never pickle; anything else found
  under a key (corrupt, foreign, pickled, other schema version) is a miss and is counted.
- ``TieredCache.get`` / ``set`` never raise: a failing or slow tier is a miss (or a skipped
  write) plus a counter. Redis calls carry their own short timeouts and no retries, and the
  Redis tier sits behind a circuit breaker so an outage is skipped instead of waited on,
  and comes back by itself once Redis answers again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

from .breaker import BreakerConfig, BreakerOpen, CircuitBreaker
from .config import CacheConfig
from .metrics import Counters

__all__ = [
    "cache_key",
    "canonical_json",
    "encode_value",
    "decode_value",
    "decode_envelope",
    "MemoryTier",
    "RedisTier",
    "TieredCache",
    "CacheLookup",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 1
Tier = Literal["memory", "redis"]

# The Redis tier's own breaker: skip Redis quickly during an outage (a few failed calls
# within a second trip it), probe again after a short open period, cap the wait at 5 s so
# the tier is back within seconds of Redis coming back.
REDIS_BREAKER = BreakerConfig(
    window_s=10.0,
    min_calls=3,
    failure_rate_threshold=0.5,
    slow_call_s=1.0,
    slow_call_rate_threshold=1.0,
    open_s=1.0,
    open_backoff=2.0,
    max_open_s=5.0,
    jitter_ratio=0.1,
    half_open_permits=1,
    max_half_open_s=2.0,
)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(
    prefix: str,
    model: str,
    variant: str,
    program_version: str,
    lm_settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
) -> str:
    """``<prefix>:p:<model>:<variant>:<version>:<sha256(lm settings + inputs)>``."""
    digest = hashlib.sha256(
        canonical_json({"lm": dict(lm_settings), "inputs": dict(inputs)}).encode()
    ).hexdigest()
    return f"{prefix}:p:{model}:{variant}:{program_version}:{digest}"


def encode_value(value: Mapping[str, Any], expires_at: float | None = None) -> bytes:
    """The stored envelope; ``exp`` (wall-clock seconds) lets another replica that promotes the
    value to its memory tier keep the original expiry instead of starting a fresh one."""
    envelope: dict[str, Any] = {"v": SCHEMA_VERSION, "value": dict(value)}
    if expires_at is not None:
        envelope["exp"] = round(expires_at, 3)
    return canonical_json(envelope).encode()


def decode_envelope(raw: bytes | str) -> tuple[dict[str, Any], float | None] | None:
    """``(value, expires_at)``, or None for anything that is not our current envelope."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION or not isinstance(obj.get("value"), dict):
        return None
    exp = obj.get("exp")
    return obj["value"], float(exp) if isinstance(exp, int | float) else None


def decode_value(raw: bytes | str) -> dict[str, Any] | None:
    """The stored value, or None for anything that is not our current envelope."""
    decoded = decode_envelope(raw)
    return None if decoded is None else decoded[0]


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

    def clear(self) -> None:
        self._data.clear()


class RedisClient(Protocol):
    """The slice of ``redis.asyncio.Redis`` the tier uses (fakes implement it in tests)."""

    async def get(self, name: str) -> bytes | None: ...
    async def set(self, name: str, value: bytes, px: int | None = None) -> Any: ...
    async def hgetall(self, name: str) -> dict[bytes, bytes]: ...
    def pipeline(self, transaction: bool = True) -> Any: ...
    async def aclose(self) -> None: ...


def redis_from_url(url: str, socket_timeout_s: float, connect_timeout_s: float) -> RedisClient:
    """A redis-py asyncio client with short timeouts and no retry of timeouts.

    redis-py's defaults (no socket timeout, retries with backoff) would hold a request for
    a minute on a hung server. Here a timeout is final (the breaker does the rest), and a
    connection error is retried once at once: after a Redis restart every pooled connection
    is stale, and one immediate reconnect turns that into a hit instead of a miss (against
    a dead server the reconnect is refused in microseconds). TLS (``rediss://``), passwords
    and ACL users come from the URL.
    """
    import redis.asyncio as aredis
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    return aredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=256,
    )


class RedisTier:
    """Redis behind a breaker and a per-call deadline. Raises nothing: returns None / False."""

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl_s: float,
        call_timeout_s: float,
        counters: Counters,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        ttl_jitter: float = 0.1,
    ) -> None:
        self._client = client
        self._ttl = ttl_s
        self._timeout = call_timeout_s
        self._counters = counters
        self._rand = rand
        self._jitter = ttl_jitter
        self.breaker = CircuitBreaker(REDIS_BREAKER, clock=clock, rand=rand)

    async def _call(self, op: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            permit = self.breaker.acquire()
        except BreakerOpen:
            self._counters.inc("cache_ops", tier="redis", op=op, result="skipped")
            return False, None
        with permit:
            try:
                async with asyncio.timeout(self._timeout):
                    result = await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - any Redis failure is a miss, by contract
                permit.failure()
                self._counters.inc("cache_ops", tier="redis", op=op, result="error")
                return False, None
            permit.success()
            return True, result

    async def get(self, key: str) -> tuple[dict[str, Any], float | None] | None:
        """``(value, expires_at)`` on a hit."""
        ok, raw = await self._call("get", lambda: self._client.get(key))
        if not ok:
            return None
        if raw is None:
            self._counters.inc("cache_ops", tier="redis", op="get", result="miss")
            return None
        decoded = decode_envelope(raw)
        if decoded is None:
            self._counters.inc("cache_ops", tier="redis", op="get", result="corrupt")
            return None
        self._counters.inc("cache_ops", tier="redis", op="get", result="hit")
        return decoded

    def ttl_for(self, ttl_s: float | None) -> float:
        """This write's TTL: the model's or the tier's, with up to ``ttl_jitter`` added so keys
        written together do not expire together (no synchronized stampede)."""
        return (self._ttl if ttl_s is None else ttl_s) * (1.0 + self._jitter * self._rand())

    async def set(self, key: str, payload: bytes, ttl_s: float) -> bool:
        px = max(1, int(ttl_s * 1000))
        ok, _ = await self._call("set", lambda: self._client.set(key, payload, px=px))
        if ok:
            self._counters.inc("cache_ops", tier="redis", op="set", result="ok")
        return ok

    async def hincr_many(self, increments: Mapping[str, Mapping[str, float]], ttl_s: Mapping[str, float]) -> bool:
        """Atomic float increments of hash fields in one round trip (the cost book's store)."""

        async def run() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for key, fields in increments.items():
                for field, value in fields.items():
                    if value:
                        pipe.hincrbyfloat(key, field, value)
            for key, ttl in ttl_s.items():
                pipe.expire(key, int(ttl))
            return await pipe.execute()

        ok, _ = await self._call("hincr", run)
        return ok

    async def hgetall(self, key: str) -> dict[str, float] | None:
        ok, raw = await self._call("hgetall", lambda: self._client.hgetall(key))
        if not ok:
            return None
        out: dict[str, float] = {}
        for k, v in (raw or {}).items():
            try:
                out[k.decode() if isinstance(k, bytes) else str(k)] = float(v)
            except (TypeError, ValueError, UnicodeDecodeError):
                continue  # a foreign field is skipped, never a failure
        return out

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection is not an error
            pass


class TieredCache:
    """Memory first, then Redis (a Redis hit is promoted to memory). Never raises."""

    def __init__(
        self,
        config: CacheConfig,
        memory: MemoryTier,
        redis: RedisTier | None,
        counters: Counters,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.memory = memory
        self.redis = redis
        self.counters = counters
        self._wall = wall  # absolute expiries are shared across replicas: wall-clock time
        self._pending: set[asyncio.Task[Any]] = set()

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
        return cls(config, memory, redis_tier, counters, wall)

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
