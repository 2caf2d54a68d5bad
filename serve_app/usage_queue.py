"""The router's queue of LM usage for the cost book: one Cache call per batch, not per miss.

Contract of ``UsageQueue``:
- ``add(model, variant, usage, key_id)`` queues one LM-backed prediction's usage (never
  raises, never waits) and makes sure a flush runs within ``flush_s``;
- ``flush()`` sends the queue as one ``record_usage_many`` call within ``timeout_s``; a
  failed batch is counted (``cost_book_errors``, by records) and dropped, never retried (a
  retried batch whose first attempt landed would count twice), never a failed request.
The router flushes it on ``drain()`` and the Router deployment on graceful shutdown. The
profile (benchmarks/results/profile.md) put a handle call at ~5 ms of Serve/Ray CPU, so one
per miss for bookkeeping was worth batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from .metrics import Counters

__all__ = ["UsageQueue", "UsageLedger"]


class UsageLedger(Protocol):
    async def record_usage_many(self, records: list[dict[str, Any]]) -> None: ...


class UsageQueue:
    def __init__(self, ledger: UsageLedger | None, counters: Counters, *, flush_s: float, timeout_s: float) -> None:
        self._ledger = ledger
        self._counters = counters
        self._flush_s = flush_s
        self._timeout_s = timeout_s
        self._batch: list[dict[str, Any]] = []
        self._flusher: asyncio.Future[None] | None = None

    def add(self, model: str, variant: str, usage: Mapping[str, Any], key_id: str | None) -> None:
        if self._ledger is None:
            return
        self._batch.append({"model": model, "variant": variant, "usage": dict(usage), "key_id": key_id})
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_s)
        await self.flush()

    async def flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch or self._ledger is None:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._ledger.record_usage_many(batch)
        except Exception:  # noqa: BLE001 - an unbooked cost is counted, never a failure
            self._counters.inc("cost_book_errors", float(len(batch)))
