"""Collapse identical concurrent work into one call (request coalescing).

Contract of ``SingleFlight.do(key, fn)``:
- the first caller for ``key`` (the leader) starts ``fn()`` as its OWN task; later callers
  for the same key, while it runs, wait for that task instead of calling ``fn`` again;
- every waiter gets the same result or the same exception; nothing is remembered once the
  task is done (errors are shared, never cached);
- a waiter that is cancelled (its client left) stops waiting but does not cancel the
  task, so the leader's client leaving fails none of the followers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Return ``(result, shared)``; ``shared`` is True for followers."""
        task = self._inflight.get(key)
        shared = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(key, fn))
            self._inflight[key] = task
            # If every waiter left, nobody reads the outcome: retrieve it so asyncio does
            # not log "exception was never retrieved".
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        # shield: cancelling this waiter must not cancel the shared task.
        return await asyncio.shield(task), shared

    async def _run(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        finally:
            self._inflight.pop(key, None)
