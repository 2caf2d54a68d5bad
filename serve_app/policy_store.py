"""The router's shared store for traffic policy: Redis scripts behind a breaker, never raising.

Rate limits and budgets must hold across every router replica and node, so their counters
live in Redis and each check is one atomic script call (``EVALSHA``) that reads Redis's own
clock (``TIME``), so replicas with skewed clocks still agree on windows. Contract:

- ``run(name, keys, args)`` returns the script's reply, or ``None`` when Redis is slow,
  down or skipped by the breaker (the caller then enforces its local share). It never raises.
- ``live_replicas()`` is the number of router replicas that sent a heartbeat in the last
  ``HEARTBEAT_TTL_S`` (at least 1): the divisor of the local share during an outage.
- Every key written carries a TTL. Keys are ``<prefix>:rl:...`` and ``<prefix>:budget:...``
  with one key per subject and limit; each script touches only the keys it is given. The
  client is a single-server client: Redis Cluster (which would also need hash tags, since a
  check spans several keys) is not supported.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .breaker import BreakerOpen, CircuitBreaker
from .metrics import Counters
from .redis_tier import REDIS_BREAKER

__all__ = ["PolicyStore", "ScriptClient", "SCRIPTS", "HEARTBEAT_TTL_S"]

HEARTBEAT_TTL_S = 20.0

# Rate-limit check. KEYS: one per limit. ARGV[1]: window ms, ARGV[2]: a unique member id for
# this request, then per key: kind, limit, cost.
# - kind "log" (requests): an exact sliding log, a sorted set of admission times; the
#   request is admitted when fewer than ``limit`` were admitted in the last window.
# - kind "counter" (tokens): a sliding-window counter (two fixed windows in a hash, the older
#   weighted by its overlap), O(1) memory; admitted while the estimate is below the limit
#   (tokens are known only after the call and are added with ``rl_add``).
# All-or-nothing: the request is recorded only when every limit admits it. Time is Redis's
# own (TIME), so replicas with skewed clocks agree. Reply: ok, now_ms, then per key: the
# count/estimate after this request, the current and previous windows' counts (counter) and
# the oldest admission time in ms (log). Strings: Lua would truncate numbers to integers.
_RL_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local idx = math.floor(now / w)
local frac = (now - idx * w) / w
local ok = 1
local rows = {}
for i, key in ipairs(KEYS) do
  local kind = ARGV[3 * i]
  local limit = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  if kind == 'log' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - w)
    local n = redis.call('ZCARD', key)
    if n + cost > limit then ok = 0 end
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    rows[i] = {kind, n, 0, 0, oldest[2] or now, cost}
  else
    local cur = tonumber(redis.call('HGET', key, tostring(idx)) or '0')
    local prev = tonumber(redis.call('HGET', key, tostring(idx - 1)) or '0')
    local est = prev * (1 - frac) + cur
    if est >= limit then ok = 0 end
    rows[i] = {kind, est, cur, prev, 0, cost}
    for _, f in ipairs(redis.call('HKEYS', key)) do
      local n = tonumber(f)
      if n == nil or n < idx - 1 then redis.call('HDEL', key, f) end
    end
  end
end
local out = {ok, tostring(now)}
for i, key in ipairs(KEYS) do
  local r = rows[i]
  if r[1] == 'log' and ok == 1 and r[6] > 0 then
    redis.call('ZADD', key, now, ARGV[2])
    r[2] = r[2] + r[6]
  end
  redis.call('PEXPIRE', key, 2 * w + 1000)
  out[#out + 1] = tostring(r[2])
  out[#out + 1] = tostring(r[3])
  out[#out + 1] = tostring(r[4])
  out[#out + 1] = tostring(r[5])
end
return out
"""

# Add a known amount (tokens after an LM call) to the current window. ARGV: window ms, amount.
_RL_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = tonumber(ARGV[1])
local idx = math.floor(now / w)
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, tostring(idx), tonumber(ARGV[2]))
  redis.call('PEXPIRE', key, 2 * w + 1000)
end
return 1
"""

# Budget reservation. KEYS: one hash per budget scope and window (fields committed = spent +
# reserved, spent, and r:<op id> = the amount each open reservation holds). ARGV[1]: the
# amount to reserve, ARGV[2]: TTL s, ARGV[3]: the operation id, ARGV[4]: its tombstone key,
# then one hard limit per key (-1: none). All-or-nothing: reserves on every key only if every
# key stays within its limit. A reservation already settled (its tombstone exists: this copy
# arrived late) reserves nothing. Reply: ok, then per key its committed total after the call.
_BUDGET_RESERVE = """
local amount = tonumber(ARGV[1])
local ok = 1
if redis.call('EXISTS', ARGV[4]) == 1 then ok = 0 end
local committed = {}
for i, key in ipairs(KEYS) do
  local c = tonumber(redis.call('HGET', key, 'committed') or '0')
  local hard = tonumber(ARGV[4 + i])
  if hard >= 0 and c + amount > hard then ok = 0 end
  committed[i] = c
end
local out = {ok}
for i, key in ipairs(KEYS) do
  local c = committed[i]
  if ok == 1 then
    c = tonumber(redis.call('HINCRBYFLOAT', key, 'committed', amount))
    redis.call('HSET', key, 'r:' .. ARGV[3], ARGV[1])
    redis.call('EXPIRE', key, tonumber(ARGV[2]))
  end
  out[#out + 1] = tostring(c)
end
return out
"""

# Settle (or release, cost 0) a reservation, idempotently. ARGV[1]: operation id, ARGV[2]:
# the real cost, ARGV[3]: TTL s, ARGV[4]: tombstone key ('' when the reservation is known to
# be held here), ARGV[5]: tombstone TTL s. Per key: the amount held under r:<id> is replaced by
# the cost, once. With a tombstone (the replica never learned whether its reservation
# arrived): a reservation not held here is charged the cost directly, and the tombstone makes
# a repeat of this settle, or a late copy of the reservation, a no-op.
# Reply: per key committed and spent after the call.
_BUDGET_SETTLE = """
local field = 'r:' .. ARGV[1]
local cost = tonumber(ARGV[2])
local tomb = ARGV[4]
local done = tomb ~= '' and redis.call('EXISTS', tomb) == 1
local out = {}
for _, key in ipairs(KEYS) do
  if not done then
    local held = redis.call('HGET', key, field)
    if held then
      redis.call('HDEL', key, field)
      redis.call('HINCRBYFLOAT', key, 'committed', cost - tonumber(held))
      redis.call('HINCRBYFLOAT', key, 'spent', cost)
    elseif tomb ~= '' then
      redis.call('HINCRBYFLOAT', key, 'committed', cost)
      redis.call('HINCRBYFLOAT', key, 'spent', cost)
    end
    redis.call('EXPIRE', key, tonumber(ARGV[3]))
  end
  out[#out + 1] = tostring(tonumber(redis.call('HGET', key, 'committed') or '0'))
  out[#out + 1] = tostring(tonumber(redis.call('HGET', key, 'spent') or '0'))
end
if tomb ~= '' and not done then redis.call('SET', tomb, '1', 'EX', tonumber(ARGV[5])) end
return out
"""

# Add summed amounts (a replica's overflow of unconfirmed settles). ARGV: delta to committed,
# amount spent, TTL s. Reply: per key committed and spent after the call.
_BUDGET_ADD = """
local out = {}
for _, key in ipairs(KEYS) do
  local c = redis.call('HINCRBYFLOAT', key, 'committed', tonumber(ARGV[1]))
  local s = redis.call('HINCRBYFLOAT', key, 'spent', tonumber(ARGV[2]))
  redis.call('EXPIRE', key, tonumber(ARGV[3]))
  out[#out + 1] = tostring(c)
  out[#out + 1] = tostring(s)
end
return out
"""

# Router heartbeat: this replica's id scored by Redis time; stale ids dropped; reply: count.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 3)
return redis.call('ZCARD', KEYS[1])
"""

SCRIPTS: dict[str, str] = {
    "rl_check": _RL_CHECK,
    "rl_add": _RL_ADD,
    "budget_reserve": _BUDGET_RESERVE,
    "budget_settle": _BUDGET_SETTLE,
    "budget_add": _BUDGET_ADD,
    "heartbeat": _HEARTBEAT,
}


class ScriptClient(Protocol):
    """The slice of ``redis.asyncio.Redis`` the store uses."""

    def register_script(self, script: str) -> Any: ...
    async def aclose(self) -> None: ...


class PolicyStore:
    """Redis scripts for limits and budgets, behind a per-call deadline and a breaker."""

    def __init__(
        self,
        client: ScriptClient | None,
        prefix: str,
        *,
        call_timeout_s: float = 0.1,
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
        replica_id: str | None = None,
        min_replicas: int = 1,
    ) -> None:
        self.prefix = prefix
        self._client = client
        self._timeout = call_timeout_s
        self._counters = counters or Counters()
        self.breaker = CircuitBreaker(REDIS_BREAKER, clock=clock)
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()} if client else {}
        self.replica_id = replica_id or uuid.uuid4().hex
        self._min_replicas = min_replicas
        self._live = min_replicas

    @property
    def shared(self) -> bool:
        """Whether a shared store is configured at all."""
        return self._client is not None

    def live_replicas(self) -> int:
        return max(self._min_replicas, self._live)

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[Any] | None:
        """The script's reply, or None when there is none (no store, breaker open, error)."""
        return (await self.attempt(name, keys, args))[0]

    async def attempt(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[list[Any] | None, bool]:
        """``(reply, sent)``: ``sent`` is False only when the script surely did not run (no
        store, breaker open); a call that failed after sending may have run in Redis."""
        if self._client is None:
            return None, False
        try:
            permit = self.breaker.acquire()
        except BreakerOpen:
            self._counters.inc("policy_store_ops", op=name, result="skipped")
            return None, False
        with permit:
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._scripts[name](keys=list(keys), args=list(args))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis trouble: the caller falls back to its local share
                permit.failure()
                self._counters.inc("policy_store_ops", op=name, result="error")
                return None, True
            permit.success()
        out = [r.decode() if isinstance(r, bytes) else r for r in reply] if isinstance(reply, list) else [reply]
        return out, True

    async def heartbeat(self) -> None:
        """Announce this replica and learn how many are live (kept on failure)."""
        reply = await self.run("heartbeat", [f"{self.prefix}:routers"], [self.replica_id, int(HEARTBEAT_TTL_S)])
        if reply:
            try:
                self._live = max(1, int(reply[0]))
            except (TypeError, ValueError):
                pass

    async def heartbeat_loop(self, every_s: float = 5.0) -> None:
        while True:
            await self.heartbeat()
            await asyncio.sleep(every_s)

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # noqa: BLE001
                pass
