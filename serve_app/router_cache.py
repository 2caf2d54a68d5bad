"""The router's side of the cache: its near cache, its key index and the batched Cache hops.

Contract of ``RouterCache`` (one per router replica, over a ``CacheClient``: the Cache
deployment's handle in production, a fake in unit tests):
- ``near`` is a small LRU with a short TTL (``cache.near_max_entries``, ``cache.near_ttl_s``)
  that answers repeated hits without a hop. Keys carry the program version, so a hot swap never
  serves an old answer from it either.
- ``lookup(key, ttl_s, timing)`` asks the Cache deployment for a near-cache miss and returns
  ``(value, status)``. The value is a prediction payload (then it also fills the near cache)
  or None. The lookup is skipped, and counted as ``cache_ops{tier="index", result="skip"}``,
  when the key index says the Cache cannot hold the key (``serve_app.key_index``). Otherwise
  it is one batched ``get_many`` bounded by ``cache.hop_timeout_s``, timed in
  ``timing["cache"]``. A slow or failing Cache, or a value that is not a prediction, is a
  miss plus a counter. It never raises, except on cancellation.
- ``write_back(key, value, ttl_s)`` fills the near cache and the key index before the write
  leaves (a later lookup must not be skipped), then joins a batched ``set_many``. A failed
  write is a counter, never an error.
- ``index_loop()`` keeps the key index honest (see there); ``flush()`` sends queued writes now.

Lookups made in the same event-loop turn travel as one ``get_many`` call, and write-backs
gathered for ``cache.write_batch_s`` as one ``set_many`` call (``serve_app.hop_batch``): under
load a hop per request cost more CPU than the rest of the router.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from .cache import CacheLookup, MemoryTier
from .config import CacheConfig
from .hop_batch import HopBatcher
from .key_index import IndexSync, KeyIndex
from .metrics import Counters

__all__ = ["CacheClient", "CacheWrite", "RouterCache"]

CacheWrite = tuple[str, dict[str, Any], "float | None"]


class CacheClient(Protocol):
    async def get_many(self, keys: list[str]) -> list[CacheLookup | None]: ...
    async def set_many(self, items: list[CacheWrite]) -> list[bool]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def index_sync(self, writer: str, want_keys: bool) -> IndexSync | None: ...
    async def record_usage_many(self, records: list[dict[str, Any]]) -> None: ...
    async def cost_report(self) -> dict[str, Any]: ...


def _is_payload(value: Any) -> bool:
    """A cached value we wrote: anything else under our key is a miss, never a 500."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("program_version"), str)
        and isinstance(value.get("outputs"), dict)
        and isinstance(value.get("usage"), dict)
    )


class RouterCache:
    def __init__(
        self,
        config: CacheConfig,
        cache: CacheClient,
        counters: Counters,
        clock: Callable[[], float],
        flight_context: Callable[[], contextvars.Context] | None = None,
    ) -> None:
        self._config = config
        self._cache = cache
        self._counters = counters
        self._clock = clock
        self.near = MemoryTier(config.near_max_entries, config.near_ttl_s, clock)
        # One Cache hop carries many lookups (same event-loop turn) or write-backs (a short
        # window): the hop's fixed CPU cost, not its payload, dominated a miss under load.
        batch_max, inflight = config.hop_batch_max, config.hop_max_inflight
        self._reads: HopBatcher[str, CacheLookup | None] = HopBatcher(
            cache.get_many, max_batch=batch_max, timeout_s=config.hop_timeout_s, context=flight_context,
            on_batch=self._batch_counter("get"), max_inflight=inflight)
        self._writes: HopBatcher[CacheWrite, bool] = HopBatcher(
            cache.set_many, window_s=config.write_batch_s, max_batch=batch_max, timeout_s=config.hop_timeout_s,
            context=flight_context, on_batch=self._batch_counter("set"), max_inflight=inflight)
        # Keys the Cache deployment can hold, while this router is its only writer and there
        # is no Redis tier: a near-cache miss for any other key skips the lookup hop.
        self.index: KeyIndex | None = None
        if config.redis is None and config.lookup_index:
            self.index = KeyIndex(2 * config.memory_max_entries, config.memory_ttl_s, clock)
        self.writer_id = uuid.uuid4().hex

    @property
    def index_state(self) -> Literal["off", "on", "syncing"]:
        return "off" if self.index is None else "on" if self.index.ready else "syncing"

    def _batch_counter(self, op: str) -> Callable[[int], None]:
        def count(size: int) -> None:
            self._counters.inc("cache_hops", op=op)
            self._counters.inc("cache_hop_items", float(size), op=op)
        return count

    async def lookup(self, key: str, ttl_s: float | None, timing: dict[str, float]
                     ) -> tuple[dict[str, Any] | None, Literal["HIT-MEMORY", "HIT-REDIS"] | None]:
        """``(payload, X-Cache status)`` from the Cache deployment, or ``(None, None)``; a hit
        enters the near cache for ``ttl_s`` (the model's)."""
        if self.index is not None and not self.index.may_hold(key):
            # Never written by this router, the Cache's only writer: a certain miss there.
            self._counters.inc("cache_ops", tier="index", op="get", result="skip")
            return None, None
        t0 = self._clock()
        try:
            hit = await self._reads.call(key)  # the batch is bounded by cache.hop_timeout_s
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a cache failure is a miss plus a counter
            self._counters.inc("cache_client_errors", op="get")
            hit = None
        timing["cache"] = (self._clock() - t0) * 1000.0
        if hit is None:
            return None, None
        value: Any = hit.get("value")
        if not _is_payload(value):
            self._counters.inc("cache_client_errors", op="foreign_value")
            return None, None
        self.near.set(key, value, ttl_s)
        return value, "HIT-MEMORY" if hit["tier"] == "memory" else "HIT-REDIS"

    async def write_back(self, key: str, value: dict[str, Any], ttl_s: float | None) -> None:
        self.near.set(key, value, ttl_s)
        if self.index is not None:
            self.index.add(key)  # before the write leaves: a later lookup must not be skipped
        try:
            # At most the batch window, then the hop (bounded by cache.hop_timeout_s).
            await self._writes.call((key, value, ttl_s))
        except Exception:  # noqa: BLE001 - a failed write is only a future miss
            self._counters.inc("cache_client_errors", op="set")

    async def flush(self) -> None:
        """Send queued write-backs now (graceful shutdown, tests)."""
        await self._writes.flush()

    async def index_loop(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                         interval_s: float = 2.0) -> None:
        """Keep the key index honest; never raises. Every ``interval_s`` this router tells
        the Cache deployment it writes there; with another writer (or none answering) the
        index is off, and once it is the only writer again the Cache's keys re-seed it."""
        index = self.index
        if index is None:
            return
        while True:
            try:
                async with asyncio.timeout(self._config.hop_timeout_s):
                    sync = await self._cache.index_sync(self.writer_id, not index.ready)
                if sync is None:  # the Cache has a Redis tier after all
                    self.index = None
                    return
                if sync["writers"] > 1:
                    index.disable()
                elif sync["digests"] is not None:
                    index.seed(sync["digests"])
            except Exception:  # noqa: BLE001 - a Cache we cannot reach: look everything up
                index.disable()
                self._counters.inc("cache_client_errors", op="index_sync")
            await sleep(interval_s)
