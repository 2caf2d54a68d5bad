"""The router's directory of predictor deployments: each one's info and breaker health.

Contract of ``ModelDirectory``:
- ``get(name)`` returns the deployment's last known info (program version, fields, breaker),
  fetching it on first use; a predictor that does not answer is a retryable 503
  (``Overloaded``), never a 500.
- ``refresh_loop()`` refreshes every deployment every ``refresh_s`` and never raises (a failed
  refresh keeps the old info and is counted).
- ``unhealthy`` is the set of deployments whose breaker is open: learned from each refresh
  and at once from a ``CircuitOpen`` answer (``mark_open``), cleared by a success
  (``mark_ok``) or a refresh that finds the breaker closed. Variant choice steers around it.
- ``open_for(name)`` is how much longer that breaker stays open, by the predictor's own
  ``retry_after_s`` when it was learned (on this process's clock): while it is above 0 the
  router answers ``circuit_open`` for a miss itself, without a hop. When it runs out the
  request goes to the predictor again, whose breaker then lets its half-open probes through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from .errors import Overloaded
from .metrics import Counters
from .predictor import ModelInfoPayload

__all__ = ["ModelDirectory", "InfoSource"]


class InfoSource(Protocol):
    async def info(self) -> ModelInfoPayload: ...


class ModelDirectory:
    def __init__(
        self,
        predictors: Mapping[str, InfoSource],
        counters: Counters,
        *,
        refresh_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._predictors = predictors
        self._counters = counters
        self._refresh_s = refresh_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._info: dict[str, ModelInfoPayload] = {}
        self.unhealthy: set[str] = set()
        self._open_until: dict[str, float] = {}

    def known(self, name: str) -> ModelInfoPayload | None:
        return self._info.get(name)

    async def fetch(self, name: str) -> ModelInfoPayload:
        """Fetch one deployment's info and remember it; raises as it failed."""
        async with asyncio.timeout(self._timeout_s):
            info = await self._predictors[name].info()
        self._info[name] = info
        breaker: Any = info.get("breaker") or {}
        if str(breaker.get("state", "")).upper() == "OPEN":
            self.mark_open(name, breaker.get("retry_after_s"))
        else:
            self.mark_ok(name)
        return info

    async def refresh(self, name: str) -> ModelInfoPayload:
        """``fetch`` for the request path: any failure is a retryable 503."""
        try:
            return await self.fetch(name)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - starting, dead or unreachable: retry shortly
            raise Overloaded(f"model '{name}' is not answering yet", retry_after_s=1.0) from None

    async def get(self, name: str) -> ModelInfoPayload:
        info = self._info.get(name)
        return info if info is not None else await self.refresh(name)

    async def refresh_quietly(self, name: str) -> None:
        try:
            await self.refresh(name)
        except Exception:  # noqa: BLE001 - the refresh loop tries again
            self._counters.inc("info_refresh_errors", model=name)

    async def refresh_loop(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        while True:
            for name in self._predictors:
                try:
                    await self.refresh(name)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a predictor down now is retried next tick
                    self._counters.inc("info_refresh_errors", model=name)
            await sleep(self._refresh_s)

    def mark_open(self, name: str, retry_after_s: float | None = None) -> None:
        self.unhealthy.add(name)
        if isinstance(retry_after_s, int | float) and retry_after_s > 0:
            self._open_until[name] = self._clock() + float(retry_after_s)

    def mark_ok(self, name: str) -> None:
        self.unhealthy.discard(name)
        self._open_until.pop(name, None)

    def open_for(self, name: str) -> float:
        """Seconds this deployment's breaker stays open as last learned; 0 when not open."""
        until = self._open_until.get(name)
        return 0.0 if until is None else max(0.0, until - self._clock())
