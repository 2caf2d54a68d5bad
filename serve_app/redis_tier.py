"""The Redis tier of the prediction cache: short timeouts, no retry of timeouts, its own breaker.

Contract: ``RedisTier.get`` / ``set`` / ``hincr_many`` / ``hgetall`` never raise. A failing,
slow or skipped call is ``None`` / ``False`` plus a counter (``cache_ops{tier="redis"}``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .breaker import BreakerConfig, BreakerOpen, CircuitBreaker
from .codec import decode_envelope
from .metrics import Counters

__all__ = ["RedisClient", "RedisTier", "redis_from_url", "REDIS_BREAKER"]

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
