"""Requests and LM tokens per minute, per subject, cluster-wide.

A subject is an API key's id, or a client address when keys are off. Contract of
``RateLimiter``:

- ``check(subject, limits)`` admits one request or raises ``RateLimited`` (429 with
  ``Retry-After``). The request limit counts this request; the token limit admits while the
  subject's tokens in the sliding minute are below it (tokens are known only after the LM
  call, so the call that crosses the limit finishes, and the next ones wait).
- ``add_tokens(subject, limits, n)`` books an LM call's tokens (hits and coalesced
  followers book none).
- With Redis, one script call per check makes the counts exact across replicas: requests
  are an exact sliding log over the last 60 s (no double burst at a window edge); tokens a
  sliding-window counter (O(1) memory; approximate by the older window's weighting).
  Without Redis, or while it is unreachable, each replica enforces ``limit / live
  replicas`` locally with the same algorithms; nothing raises.
- ``Decision`` gives the ``X-RateLimit-*`` headers: the tightest limit, what remains of it,
  and ``Reset``: seconds until one more unit is free (requests: the oldest admission
  leaves the window; tokens: the current fixed window ends).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import RateLimitConfig
from .errors import RateLimited
from .metrics import Counters
from .policy_store import PolicyStore

__all__ = ["RateLimiter", "Decision", "LocalWindows", "WINDOW_S"]

WINDOW_S = 60.0


@dataclass(frozen=True)
class Decision:
    """The tightest limit that applied to a request, for ``X-RateLimit-*``."""

    limit: int
    remaining: int
    reset_s: float
    scope: str  # "cluster" or "local"

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(max(1, math.ceil(self.reset_s))),
        }


@dataclass
class _Row:
    """One limit's state after a check: ``count`` (log: admissions in the window, after this
    one if admitted; counter: the sliding estimate), the counter's windows, the log's oldest
    admission time (seconds)."""

    kind: str
    count: float
    cur: float = 0.0
    prev: float = 0.0
    oldest_s: float = 0.0

    def refuses(self, limit: float, cost: float) -> bool:
        return self.count + cost > limit if self.kind == "log" else self.count >= limit


def _retry_after_s(row: _Row, limit: float, now_s: float, window_s: float) -> float:
    """Seconds until the limit admits one more request."""
    frac = now_s / window_s - math.floor(now_s / window_s)
    if row.kind == "log":
        # Exact: the oldest admission in the window leaves it (enough of them, when many
        # were admitted in the same millisecond, is approximated by the oldest).
        return max(0.001, row.oldest_s + window_s - now_s)
    need = row.count - limit + 1.0  # how much of the older window has to slide out
    if row.prev > 0 and need <= row.prev * (1.0 - frac):
        return max(0.001, need / row.prev * window_s)
    # The current window alone is over: wait for it to become the older one and drain.
    after = row.cur - limit + 1.0
    return (1.0 - frac) * window_s + (after / row.cur * window_s if row.cur > 0 else 0.0)


class LocalWindows:
    """The same two algorithms in process memory (the outage fallback)."""

    MAX_SUBJECTS = 10_000  # past this many, idle subjects are dropped on the next check

    def __init__(self, clock: Callable[[], float], window_s: float = WINDOW_S) -> None:
        self._clock = clock
        self._w = window_s
        self._logs: dict[str, deque[float]] = {}
        self._counts: dict[str, dict[int, float]] = {}

    def now(self) -> float:
        return self._clock()

    def _windows(self, key: str, now: float) -> tuple[dict[int, float], int, float]:
        idx = math.floor(now / self._w)
        windows = self._counts.setdefault(key, {})
        for old in [i for i in windows if i < idx - 1]:
            del windows[old]
        return windows, idx, now / self._w - idx

    def _prune(self, now: float) -> None:
        """Forget subjects with nothing in the window (bounded memory under many addresses)."""
        for key in [k for k, log in self._logs.items() if not log or log[-1] <= now - self._w]:
            del self._logs[key]
        idx = math.floor(now / self._w)
        for key in [k for k, w in self._counts.items() if not w or max(w) < idx - 1]:
            del self._counts[key]

    def check(self, items: list[tuple[str, str, float, float]]) -> tuple[bool, float, list[_Row]]:
        """``items``: (key, kind, limit, cost) as in the Redis script; ``(ok, now, rows)``."""
        now = self._clock()
        if len(self._logs) + len(self._counts) > self.MAX_SUBJECTS:
            self._prune(now)
        rows: list[_Row] = []
        for key, kind, limit, cost in items:
            if kind == "log":
                log = self._logs.setdefault(key, deque())
                while log and log[0] <= now - self._w:
                    log.popleft()
                rows.append(_Row(kind, float(len(log)), oldest_s=log[0] if log else now))
            else:
                windows, idx, frac = self._windows(key, now)
                cur, prev = windows.get(idx, 0.0), windows.get(idx - 1, 0.0)
                rows.append(_Row(kind, prev * (1 - frac) + cur, cur, prev))
        ok = not any(row.refuses(limit, cost) for row, (_, _, limit, cost) in zip(rows, items))
        if ok:
            for row, (key, kind, _, cost) in zip(rows, items):
                if kind == "log" and cost > 0:
                    self._logs[key].append(now)
                    row.count += cost
        return ok, now, rows

    def add(self, key: str, amount: float) -> None:
        windows, idx, _ = self._windows(key, self._clock())
        windows[idx] = windows.get(idx, 0.0) + amount


class RateLimiter:
    def __init__(
        self,
        store: PolicyStore,
        *,
        clock: Callable[[], float] = time.time,
        counters: Counters | None = None,
        window_s: float = WINDOW_S,
    ) -> None:
        self._store = store
        self._w = window_s
        self._local = LocalWindows(clock, window_s)
        self._counters = counters or Counters()

    def _key(self, subject: str, metric: str) -> str:
        return f"{self._store.prefix}:rl:{metric}:{subject}"

    @staticmethod
    def _items(limits: RateLimitConfig) -> list[tuple[str, str, float, float]]:
        """(metric, kind, limit, cost) per configured limit."""
        items: list[tuple[str, str, float, float]] = []
        if limits.requests_per_minute is not None:
            items.append(("req", "log", float(limits.requests_per_minute), 1.0))
        if limits.tokens_per_minute is not None:
            items.append(("tok", "counter", float(limits.tokens_per_minute), 0.0))
        return items

    async def check(self, subject: str, limits: RateLimitConfig) -> Decision | None:
        """Admit one request for ``subject`` or raise ``RateLimited``; ``None`` = no limits."""
        items = self._items(limits)
        if not items:
            return None
        keys = [self._key(subject, metric) for metric, _, _, _ in items]
        args: list[Any] = [int(self._w * 1000), uuid.uuid4().hex]
        for _, kind, limit, cost in items:
            args += [kind, int(limit), int(cost)]
        reply = await self._store.run("rl_check", keys, args)
        if reply is not None and len(reply) == 2 + 4 * len(items):
            ok = int(reply[0]) == 1
            now_s = float(reply[1]) / 1000.0
            rows = [
                _Row(kind, float(reply[2 + 4 * i]), float(reply[3 + 4 * i]), float(reply[4 + 4 * i]),
                     float(reply[5 + 4 * i]) / 1000.0)
                for i, (_, kind, _, _) in enumerate(items)
            ]
            scope, limits_used = "cluster", [limit for _, _, limit, _ in items]
        else:
            # Redis unreachable: this replica enforces its share of each limit.
            share = self._store.live_replicas()
            local_items = [(k, kind, max(1.0, math.floor(limit / share)), cost)
                           for k, (_, kind, limit, cost) in zip(keys, items)]
            ok, now_s, rows = self._local.check(local_items)
            scope, limits_used = "local", [limit for _, _, limit, _ in local_items]
            self._counters.inc("ratelimit_checks", scope="local")
        if not ok:
            # The refusing limit with the longest wait decides Retry-After and the headers.
            wait, limit, metric = max(
                (_retry_after_s(row, lim, now_s, self._w), lim, m)
                for row, lim, (m, _, _, cost) in zip(rows, limits_used, items) if row.refuses(lim, cost)
            )
            self._counters.inc("rate_limited", kind=metric)
            error = RateLimited(f"rate limit exceeded for '{subject}'; retry later", retry_after_s=wait)
            # For the 429's X-RateLimit-* headers (local to this process, never pickled).
            error.rate_headers = Decision(int(limit), 0, wait, scope).headers()
            raise error
        # The headers show the tightest limit: the one with the least room left.
        tight = min(range(len(items)), key=lambda i: (limits_used[i] - rows[i].count) / limits_used[i])
        row = rows[tight]
        reset_s = (row.oldest_s + self._w - now_s) if row.kind == "log" else (
            (1.0 - (now_s / self._w - math.floor(now_s / self._w))) * self._w)
        return Decision(int(limits_used[tight]), math.floor(limits_used[tight] - row.count), reset_s, scope)

    async def add_tokens(self, subject: str, limits: RateLimitConfig, tokens: int) -> None:
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        key = self._key(subject, "tok")
        reply = await self._store.run("rl_add", [key], [int(self._w * 1000), int(tokens)])
        if reply is None:
            self._local.add(key, float(tokens))
