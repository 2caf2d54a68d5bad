"""Micro-batching of one caller's hops: single calls made close together travel as one call.

A Serve handle call costs the caller and the callee a fixed ~0.5 ms of CPU each whatever it
carries (benchmarks/results/fast_mode_profile), so under load the router's per-miss cache
lookups and write-backs are cheaper as a few ``get_many`` / ``set_many`` calls than as one
hop each.

Contract of ``HopBatcher(send_many, window_s=..., max_batch=...)``:
- ``await call(item)`` returns ``send_many``'s result for ``item`` (results come back in
  order, one per item) or raises what the batch raised;
- items are sent together when they were queued in the same event-loop turn
  (``window_s == 0``: no added latency; a lone call is a batch of one) or within
  ``window_s`` of the batch's first item; a batch never exceeds ``max_batch`` items;
- with ``max_inflight = N > 0``, at most N batches are out at once (a full ``max_batch``
  is sent regardless): items arriving while N are out wait for the first of them to answer
  and then leave together. A lone caller on an idle batcher is sent at once, as before;
  under load the batches grow by themselves to what one hop's round trip gathers, which is
  where the CPU of a hop goes furthest (group commit, as databases batch log flushes);
- a batch gets ``timeout_s`` to answer (None: no bound), so a hung callee holds no task
  forever; with ``max_inflight`` a caller's whole wait, queueing behind batches in flight
  included, is bounded by ``timeout_s`` from its call (``TimeoutError``); a failed batch
  fails each of its callers with the batch's exception;
- a caller that stops waiting (timeout, cancellation) does not cancel the batch, so it fails
  none of the others; the batch runs in the context ``context()`` gives (the router passes
  one unlinked from the first caller's request, as for coalesced flights);
- ``flush()`` sends what is queued now and waits for every batch in flight (shutdown, tests).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["HopBatcher"]

T = TypeVar("T")
R = TypeVar("R")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A caller that gave up never reads its outcome: retrieve it so asyncio does not log
    # "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class HopBatcher(Generic[T, R]):
    def __init__(
        self,
        send_many: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        window_s: float = 0.0,
        max_batch: int = 64,
        timeout_s: float | None = None,
        context: Callable[[], contextvars.Context] | None = None,
        on_batch: Callable[[int], None] | None = None,
        max_inflight: int = 0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_inflight < 0:
            raise ValueError("max_inflight must be >= 0 (0: no bound)")
        self._send_many = send_many
        self._window_s = window_s
        self._max = max_batch
        self._timeout_s = timeout_s
        self._context = context
        self._on_batch = on_batch
        self._max_inflight = max_inflight
        self._first_at = 0.0  # loop time the oldest queued item arrived
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._timer: asyncio.Handle | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    async def call(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        fut.add_done_callback(_retrieve)
        if not self._queue:
            self._first_at = loop.time()
        self._queue.append((item, fut))
        if len(self._queue) >= self._max:
            self._send_queued()
        elif self._timer is None and not self._held():
            self._timer = (loop.call_soon(self._send_queued) if self._window_s <= 0
                           else loop.call_later(self._window_s, self._send_queued))
        # shield: one caller's timeout must not cancel the others' results.
        if self._max_inflight and self._timeout_s is not None:
            # Queued behind batches in flight, the batch's own timeout has not started yet.
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(fut)
        return await asyncio.shield(fut)

    def _held(self) -> bool:
        """Whether new items must wait for a batch in flight to answer."""
        return 0 < self._max_inflight <= len(self._inflight)

    def _send_queued(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        ctx = self._context() if self._context is not None else None
        task = asyncio.get_running_loop().create_task(self._send(batch), context=ctx)
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        # Items held back while this batch was out leave when their window (counted from the
        # oldest of them) is over: at once if it already is. A running timer keeps its schedule.
        if self._queue and self._timer is None and not self._held():
            loop = asyncio.get_running_loop()
            wait = self._first_at + self._window_s - loop.time()
            if wait <= 0:
                self._send_queued()
            else:
                self._timer = loop.call_later(wait, self._send_queued)

    async def _send(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                results = await self._send_many([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} answered with {len(results)} results")
        except BaseException as exc:
            # A cancelled batch is a failed hop for its callers, not their own cancellation.
            err = ConnectionError("batched call cancelled") if isinstance(exc, asyncio.CancelledError) else exc
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)

    async def flush(self) -> None:
        """Send what is queued and wait for every batch in flight; never raises."""
        self._send_queued()
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    def __len__(self) -> int:
        """Items queued, not yet sent."""
        return len(self._queue)
