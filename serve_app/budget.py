"""Spend budgets per model and per API key, over a UTC day or calendar month.

Contract of ``BudgetBook``:

- ``reserve(scopes, estimate_usd)`` before an LM call: all-or-nothing over the request's
  scopes (its model's budget and its key's). A scope whose ``committed`` (spent + reserved)
  plus the estimate would pass its hard limit raises ``BudgetExceeded`` (429, Retry-After =
  seconds until that window ends). Returns a ``Reservation``.
- ``settle(reservation, cost_usd)`` after the call replaces the estimate by the real cost
  (``release`` returns it when the call failed). Concurrent requests therefore overshoot a
  hard limit by at most the in-flight calls' cost above their estimates.
- Crossing a soft limit is counted (``budget_soft_exceeded``), logged once per window per
  replica, and visible as the ``budget_spent_ratio`` / ``budget_soft_limit_ratio`` gauges
  (labels scope = model|key, name, window) that the ``DSPyBudgetSoftLimitReached`` alert
  compares; ``budget_spend_usd`` is the spend in dollars.
- With Redis, the counts are cluster-wide (one script call each). While Redis is
  unreachable, each replica may spend its share of what was left when it last saw the
  cluster's number (``remaining / live replicas``); what it spends meanwhile is added to
  Redis once Redis answers again. Nothing here raises anything but ``BudgetExceeded``.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from .config import BudgetConfig
from .errors import BudgetExceeded
from .metrics import Counters
from .policy_store import PolicyStore

__all__ = ["BudgetBook", "BudgetScope", "Reservation", "window_bounds"]

logger = logging.getLogger("ray.serve")


def window_bounds(window: str, now: float) -> tuple[str, float]:
    """``(window id, seconds until it ends)`` for a UTC day or calendar month."""
    t = datetime.fromtimestamp(now, tz=timezone.utc)
    if window == "day":
        start = datetime(t.year, t.month, t.day, tzinfo=timezone.utc).timestamp()
        return t.strftime("%Y-%m-%d"), start + 86_400 - now
    days = calendar.monthrange(t.year, t.month)[1]
    start = datetime(t.year, t.month, 1, tzinfo=timezone.utc).timestamp()
    return t.strftime("%Y-%m"), start + days * 86_400 - now


@dataclass(frozen=True)
class BudgetScope:
    """One budget a request falls under: ``model:<name>`` or ``key:<id>``."""

    name: str
    config: BudgetConfig


@dataclass
class Reservation:
    keys: list[str]
    scopes: list[BudgetScope]
    amount: float
    local: bool
    ttl_s: float  # of the window's keys, fixed at reservation: settling keeps the same window
    done: bool = False


@dataclass
class _Seen:
    committed: float = 0.0  # the cluster's number when last seen
    local: float = 0.0  # committed here since then (Redis unreachable)
    pending_committed: float = 0.0  # what Redis missed while unreachable, pushed later
    pending_spent: float = 0.0
    soft_logged: bool = False  # one log line per window (the key names the window)


class BudgetBook:
    def __init__(
        self,
        store: PolicyStore,
        *,
        wall: Callable[[], float] = time.time,
        counters: Counters | None = None,
    ) -> None:
        self._store = store
        self._wall = wall
        self._counters = counters or Counters()
        self._seen: dict[str, _Seen] = {}

    def _key(self, scope: BudgetScope) -> tuple[str, float, float]:
        window_id, left_s = window_bounds(scope.config.window, self._wall())
        ttl = left_s + 86_400  # kept a day past the window for /costs-style inspection
        return f"{self._store.prefix}:budget:{scope.name}:{window_id}", left_s, ttl

    async def reserve(self, scopes: Sequence[BudgetScope], estimate_usd: float) -> Reservation | None:
        """Reserve ``estimate_usd`` under every scope or raise ``BudgetExceeded``."""
        scopes = [s for s in scopes if s.config.hard_usd is not None or s.config.soft_usd is not None]
        if not scopes:
            return None
        keyed = [self._key(s) for s in scopes]
        keys = [k for k, _, _ in keyed]
        ttl = max(t for _, _, t in keyed)
        await self._flush_pending(keys, ttl)
        hards = [s.config.hard_usd if s.config.hard_usd is not None else -1 for s in scopes]
        reply = await self._store.run(
            "budget_reserve", keys, [repr(estimate_usd), int(ttl)] + [repr(h) for h in hards]
        )
        if reply is not None and len(reply) == 1 + len(keys):
            committed = [float(c) for c in reply[1:]]
            for k, c in zip(keys, committed):
                seen = self._seen.setdefault(k, _Seen())
                seen.committed, seen.local = c, 0.0
            if int(reply[0]) == 1:
                return Reservation(keys, list(scopes), estimate_usd, local=False, ttl_s=ttl)
            self._refuse(scopes, keyed, committed, estimate_usd)
        # Redis unreachable: spend this replica's share of what was left.
        share = self._store.live_replicas()
        for k in keys:
            self._seen.setdefault(k, _Seen())
        for i, (k, h) in enumerate(zip(keys, hards)):
            share_usd = max(0.0, h - self._seen[k].committed) / share
            if h >= 0 and self._seen[k].local + estimate_usd > share_usd + 1e-9:
                self._refuse([scopes[i]], [keyed[i]], [h], estimate_usd)
        for k in keys:
            self._seen[k].local += estimate_usd
        self._counters.inc("budget_checks", scope="local")
        return Reservation(keys, list(scopes), estimate_usd, local=True, ttl_s=ttl)

    def _refuse(self, scopes: Sequence[BudgetScope], keyed: Sequence[tuple[str, float, float]],
                committed: Sequence[float], estimate: float) -> None:
        for s, (_, left_s, _), c in zip(scopes, keyed, committed):
            if s.config.hard_usd is not None and c + estimate > s.config.hard_usd - 1e-9:
                kind, _, name = s.name.partition(":")
                self._counters.inc("budget_exceeded", scope=kind, name=name, window=s.config.window)
                raise BudgetExceeded(
                    f"budget of {s.name} exhausted for this {s.config.window}", retry_after_s=left_s
                )
        # The cluster refused on rounding we cannot see: refuse with the first window's end.
        raise BudgetExceeded(f"budget of {scopes[0].name} exhausted", retry_after_s=keyed[0][1])

    async def settle(self, reservation: Reservation | None, cost_usd: float) -> None:
        """Replace the reservation by the real cost (never raises)."""
        if reservation is None or reservation.done:
            return
        reservation.done = True
        delta = cost_usd - reservation.amount
        ttl = reservation.ttl_s
        reply = None
        if not reservation.local:
            reply = await self._store.run("budget_settle", reservation.keys, [repr(delta), repr(cost_usd), int(ttl)])
        if reply is not None and len(reply) == 2 * len(reservation.keys):
            for i, (k, s) in enumerate(zip(reservation.keys, reservation.scopes)):
                seen = self._seen.setdefault(k, _Seen())
                seen.committed = float(reply[2 * i])
                self._observe(k, s, float(reply[2 * i + 1]))
            return
        for k, s in zip(reservation.keys, reservation.scopes):
            seen = self._seen.setdefault(k, _Seen())
            seen.local += delta
            # A local reservation never reached Redis; a Redis one holds the estimate there.
            seen.pending_committed += cost_usd if reservation.local else delta
            seen.pending_spent += cost_usd
            self._observe(k, s, seen.committed + seen.local)

    async def release(self, reservation: Reservation | None) -> None:
        """The call failed: give the reservation back (no cost)."""
        await self.settle(reservation, 0.0)

    async def _flush_pending(self, keys: Sequence[str], ttl: float) -> None:
        """Push what this replica spent during an outage once Redis answers again."""
        for k in keys:
            seen = self._seen.get(k)
            if seen is None or not (seen.pending_committed or seen.pending_spent) or not self._store.shared:
                continue
            reply = await self._store.run(
                "budget_settle", [k], [repr(seen.pending_committed), repr(seen.pending_spent), int(ttl)]
            )
            if reply is not None:
                seen.pending_committed = seen.pending_spent = 0.0
                seen.committed, seen.local = float(reply[0]), 0.0

    def _observe(self, key: str, scope: BudgetScope, spent: float) -> None:
        """Gauges for the ``DSPyBudgetSoftLimitReached`` alert, and the soft-limit signal."""
        cfg = scope.config
        kind, _, name = scope.name.partition(":")
        labels = {"scope": kind, "name": name, "window": cfg.window}
        limit = cfg.hard_usd if cfg.hard_usd is not None else cfg.soft_usd
        assert limit is not None  # BudgetConfig requires one of them
        self._counters.set_gauge("budget_spend_usd", spent, **labels)
        self._counters.set_gauge("budget_spent_ratio", spent / limit, **labels)
        if cfg.soft_usd is not None:
            self._counters.set_gauge("budget_soft_limit_ratio", cfg.soft_usd / limit, **labels)
        if cfg.soft_usd is not None and spent >= cfg.soft_usd:
            seen = self._seen.setdefault(key, _Seen())
            if not seen.soft_logged:
                seen.soft_logged = True
                self._counters.inc("budget_soft_exceeded", **labels)
                logger.warning("budget soft limit reached: %s spent %.4f of soft %.4f USD this %s",
                               scope.name, spent, cfg.soft_usd, cfg.window)
