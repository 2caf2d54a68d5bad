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
- Settling is idempotent, so a lost reply never counts a call twice. Every reservation has an
  operation id; Redis holds the reserved amount under it (``r:<id>`` in the scope's hash), and
  a settle replaces exactly that amount by the cost, once. A settle whose reply was lost is
  sent again later with the same id (a repeat finds nothing left to replace: a no-op). A
  reservation whose own reply was lost (so the replica cannot know whether Redis holds it)
  is settled with a tombstone (``<prefix>:budget:op:<id>``, kept a day): the settle adds the
  cost if the reservation never arrived, and a copy of it arriving later is ignored. Up to
  ``max_pending`` settles wait for Redis per replica; beyond that, amounts are summed per
  scope and added once (counted as ``budget_pending_overflow``: that sum is not idempotent).
"""

from __future__ import annotations

import calendar
import logging
import time
import uuid
from collections import deque
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


TOMBSTONE_TTL_S = 86_400  # how long a settled uncertain reservation stays settled


@dataclass
class Reservation:
    keys: list[str]
    scopes: list[BudgetScope]
    amount: float
    local: bool  # True: Redis did not confirm it (unreachable, or the reply was lost)
    ttl_s: float  # of the window's keys, fixed at reservation: settling keeps the same window
    op_id: str  # names the amount Redis holds for it (r:<op_id>)
    done: bool = False


@dataclass
class _PendingSettle:
    """A settle Redis has not confirmed: sent again, with the same id, when it answers."""

    op_id: str
    keys: list[str]
    cost: float
    tombstone: str  # "" when Redis confirmed the reservation
    ttl_s: float


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
        max_pending: int = 10_000,
    ) -> None:
        self._store = store
        self._wall = wall
        self._counters = counters or Counters()
        self._seen: dict[str, _Seen] = {}
        self._pending: deque[_PendingSettle] = deque()
        self._max_pending = max_pending

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
        op_id = uuid.uuid4().hex
        reply, sent = await self._store.attempt(
            "budget_reserve", keys,
            [repr(estimate_usd), int(ttl), op_id, self._tombstone(op_id)] + [repr(h) for h in hards],
        )
        if reply is not None and len(reply) == 1 + len(keys):
            committed = [float(c) for c in reply[1:]]
            for k, c in zip(keys, committed):
                seen = self._seen.setdefault(k, _Seen())
                seen.committed, seen.local = c, 0.0
            if int(reply[0]) == 1:
                return Reservation(keys, list(scopes), estimate_usd, local=False, ttl_s=ttl, op_id=op_id)
            self._refuse(scopes, keyed, committed, estimate_usd)
        # Redis unreachable: spend this replica's share of what was left.
        share = self._store.live_replicas()
        for k in keys:
            self._seen.setdefault(k, _Seen())
        for i, (k, h) in enumerate(zip(keys, hards)):
            share_usd = max(0.0, h - self._seen[k].committed) / share
            if h >= 0 and self._seen[k].local + estimate_usd > share_usd + 1e-9:
                if sent:  # Redis may hold this reservation (its reply was lost): give it back
                    await self._settle_pending(_PendingSettle(op_id, keys, 0.0, self._tombstone(op_id), ttl))
                self._refuse([scopes[i]], [keyed[i]], [h], estimate_usd)
        for k in keys:
            self._seen[k].local += estimate_usd
        self._counters.inc("budget_checks", scope="local")
        # Redis may still hold it (a lost reply): settled with a tombstone, it counts once.
        return Reservation(keys, list(scopes), estimate_usd, local=True, ttl_s=ttl, op_id=op_id)

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
        pending = _PendingSettle(reservation.op_id, reservation.keys, cost_usd,
                                 self._tombstone(reservation.op_id) if reservation.local else "", reservation.ttl_s)
        reply = await self._send_settle(pending)
        if reply is not None:
            for i, (k, s) in enumerate(zip(reservation.keys, reservation.scopes)):
                seen = self._seen.setdefault(k, _Seen())
                seen.committed = float(reply[2 * i])
                self._observe(k, s, float(reply[2 * i + 1]))
            return
        for k, s in zip(reservation.keys, reservation.scopes):
            seen = self._seen.setdefault(k, _Seen())
            seen.local += delta
            self._observe(k, s, seen.committed + seen.local)
        self._keep(pending, delta)

    async def _settle_pending(self, pending: _PendingSettle) -> None:
        """Send one settle now, or keep it for later (never raises)."""
        if await self._send_settle(pending) is None:
            self._keep(pending, 0.0)

    def _keep(self, pending: _PendingSettle, delta: float) -> None:
        """Keep an unconfirmed settle to send again; ``delta`` is cost - reserved amount."""
        if not self._store.shared:
            return  # no Redis configured: the local book is the book
        if len(self._pending) < self._max_pending:
            self._pending.append(pending)
            return
        # Too many unconfirmed settles: sum the rest per scope (not idempotent, but bounded).
        self._counters.inc("budget_pending_overflow")
        for k in pending.keys:
            seen = self._seen.setdefault(k, _Seen())
            seen.pending_committed += pending.cost if pending.tombstone else delta
            seen.pending_spent += pending.cost

    async def release(self, reservation: Reservation | None) -> None:
        """The call failed: give the reservation back (no cost)."""
        await self.settle(reservation, 0.0)

    def _tombstone(self, op_id: str) -> str:
        return f"{self._store.prefix}:budget:op:{op_id}"

    async def _send_settle(self, pending: _PendingSettle) -> list[str] | None:
        if not self._store.shared:
            return None
        reply = await self._store.run(
            "budget_settle", pending.keys,
            [pending.op_id, repr(pending.cost), int(pending.ttl_s), pending.tombstone, TOMBSTONE_TTL_S],
        )
        return reply if reply is not None and len(reply) == 2 * len(pending.keys) else None

    async def _flush_pending(self, keys: Sequence[str], ttl: float, most: int = 32) -> None:
        """Push what this replica spent during an outage once Redis answers again: up to
        ``most`` unconfirmed settles per reservation (a long outage drains over several
        requests), then the overflow sums of ``keys``. Stops at the first failure."""
        if self._pending and self._store.shared:
            sent = 0
            while self._pending and sent < most:
                if await self._send_settle(self._pending[0]) is None:
                    return
                self._pending.popleft()
                sent += 1
        for k in keys:
            seen = self._seen.get(k)
            if seen is None or not (seen.pending_committed or seen.pending_spent) or not self._store.shared:
                continue
            reply = await self._store.run(
                "budget_add", [k], [repr(seen.pending_committed), repr(seen.pending_spent), int(ttl)]
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
