"""Collapse identical concurrent work into one call (request coalescing).

Contract of ``SingleFlight.do(key, fn, then=None)``:
- the first caller for ``key`` (the leader) starts the flight as its OWN task; later callers
  for the same key, while the flight is registered, wait for its result instead of calling
  ``fn`` again;
- every waiter gets the same result or the same exception, as soon as ``fn`` finishes;
- ``then(result)`` (for example the cache write-back) runs after waiters are answered, and
  the flight stays registered until it is done: a caller arriving between "answered" and
  "written to the cache" joins the finished flight instead of calling ``fn`` again;
- nothing is remembered once the flight is done (errors are shared, never cached);
- a waiter that is cancelled (its client left) stops waiting but does not cancel the
  flight, so the leader's client leaving fails none of the followers.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # If every waiter left, nobody reads the outcome: retrieve it so asyncio does not log
    # "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class SingleFlight(Generic[T]):
    """``context`` makes the contextvars each flight runs in (default: a copy of the leader's).
    A host that links work to its caller through contextvars passes one that unlinks it."""

    def __init__(self, context: Callable[[], contextvars.Context] | None = None) -> None:
        self._inflight: dict[str, asyncio.Future[T]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._context = context

    def __len__(self) -> int:
        return len(self._inflight)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The flights running now (their write-backs included)."""
        return list(self._tasks)

    def in_flight(self, key: str) -> bool:
        """Whether a call for ``key`` would join a flight now."""
        return key in self._inflight

    async def do(
        self,
        key: str,
        fn: Callable[[], Awaitable[T]],
        then: Callable[[T], Awaitable[Any]] | None = None,
    ) -> tuple[T, bool]:
        """Return ``(result, shared)``; ``shared`` is True for followers."""
        fut = self._inflight.get(key)
        shared = fut is not None
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            fut.add_done_callback(_retrieve)
            self._inflight[key] = fut
            ctx = self._context() if self._context is not None else None
            task = loop.create_task(self._run(key, fn, then, fut), context=ctx)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # shield: cancelling this waiter must not cancel the shared future.
        return await asyncio.shield(fut), shared

    async def _run(
        self,
        key: str,
        fn: Callable[[], Awaitable[T]],
        then: Callable[[T], Awaitable[Any]] | None,
        fut: asyncio.Future[T],
    ) -> None:
        try:
            try:
                result = await fn()
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                fut.set_exception(exc)
                return
            fut.set_result(result)
            if then is not None:
                await then(result)
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
