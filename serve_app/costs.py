"""The cost book behind ``GET /costs``: tokens and dollars by model, variant and module.

Contract:
- ``record(model, variant, usage, key_id)`` adds one LM-backed prediction (cache hits cost
  nothing and are never recorded), also under the API key's id when there is one;
  ``record_many(records)`` adds a batch in one store round trip (the router sends its queue
  every half second). Totals are kept since start and for the current UTC day.
- With Redis, every replica increments the same hashes atomically (``HINCRBYFLOAT`` in one
  pipeline per prediction), so ``report()`` is cluster-wide; day hashes expire after 8 days,
  the running totals after 400 days without a write (every key the app writes has a TTL).
  Without Redis, or while Redis is unreachable, the numbers are this replica's own since it
  started, and ``report()["scope"]`` says so. Never raises.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

__all__ = ["CostBook", "HashStore"]

DAY_TTL_S = 8 * 86_400
TOTAL_TTL_S = 400 * 86_400  # "since start" totals: refreshed on every write, gone after 400 idle days


class HashStore(Protocol):
    """Atomic hash increments in a shared store (the Redis tier implements it)."""

    async def hincr_many(self, increments: Mapping[str, Mapping[str, float]], ttl_s: Mapping[str, float]) -> bool: ...
    async def hgetall(self, key: str) -> dict[str, float] | None: ...


def _fields(model: str, variant: str, usage: Mapping[str, Any], key_id: str | None = None) -> dict[str, float]:
    base = f"{model}|{variant}"
    out = {
        f"{base}|requests": 1.0,
        f"{base}|input_tokens": float(usage.get("input_tokens") or 0),
        f"{base}|output_tokens": float(usage.get("output_tokens") or 0),
        f"{base}|cost_usd": float(usage.get("cost_usd") or 0.0),
    }
    for path, m in (usage.get("by_module") or {}).items():
        out[f"{base}|module:{path}|input_tokens"] = float(m.get("input_tokens") or 0)
        out[f"{base}|module:{path}|output_tokens"] = float(m.get("output_tokens") or 0)
        out[f"{base}|module:{path}|cost_usd"] = float(m.get("cost_usd") or 0.0)
    if key_id is not None:  # per API key totals: "@key|<id>|<field>"
        for field in ("requests", "input_tokens", "output_tokens", "cost_usd"):
            out[f"{_KEY}|{key_id}|{field}"] = out[f"{base}|{field}"]
    return out


_KEY = "@key"


def _by_key(flat: Mapping[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sorted(flat.items()):
        parts = key.split("|")
        if len(parts) == 3 and parts[0] == _KEY:
            out.setdefault(parts[1], {})[parts[2]] = round(value, 10) if parts[2] == "cost_usd" else int(value)
    return out


def _nest(flat: Mapping[str, float]) -> dict[str, Any]:
    """``{"model|variant|field": v}`` -> ``{model: {variant: {field: v, "modules": {...}}}}``."""
    out: dict[str, Any] = {}
    for key, value in sorted(flat.items()):
        parts = key.split("|")
        if len(parts) < 3:
            continue
        model, variant, rest = parts[0], parts[1], parts[2:]
        if model == _KEY:
            continue
        slot = out.setdefault(model, {}).setdefault(variant, {"modules": {}})
        if rest[0].startswith("module:") and len(rest) == 2:
            slot["modules"].setdefault(rest[0][len("module:"):], {})[rest[1]] = round(value, 10)
        elif len(rest) == 1:
            slot[rest[0]] = round(value, 10) if rest[0] == "cost_usd" else int(value)
    return out


class CostBook:
    def __init__(
        self,
        prefix: str,
        store: HashStore | None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._prefix = prefix
        self._store = store
        self._wall = wall
        self._started = wall()
        self._total: defaultdict[str, float] = defaultdict(float)
        self._days: dict[str, defaultdict[str, float]] = {}

    def _day(self) -> str:
        return datetime.fromtimestamp(self._wall(), tz=timezone.utc).strftime("%Y-%m-%d")

    def _keys(self, day: str) -> tuple[str, str]:
        return f"{self._prefix}:costs:total", f"{self._prefix}:costs:day:{day}"

    async def record(self, model: str, variant: str, usage: Mapping[str, Any], key_id: str | None = None) -> None:
        await self._add(_fields(model, variant, usage, key_id))

    async def record_many(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Several predictions at once (``{model, variant, usage, key_id}`` each): one store
        round trip for the batch."""
        total: defaultdict[str, float] = defaultdict(float)
        for r in records:
            for k, v in _fields(r["model"], r["variant"], r["usage"], r.get("key_id")).items():
                total[k] += v
        if total:
            await self._add(dict(total))

    async def _add(self, fields: dict[str, float]) -> None:
        day = self._day()
        today = self._days.setdefault(day, defaultdict(float))
        for days in list(self._days):  # keep only today's local day book
            if days != day:
                del self._days[days]
        for k, v in fields.items():
            self._total[k] += v
            today[k] += v
        if self._store is not None:
            total_key, day_key = self._keys(day)
            await self._store.hincr_many(
                {total_key: fields, day_key: fields}, {day_key: DAY_TTL_S, total_key: TOTAL_TTL_S}
            )

    async def report(self) -> dict[str, Any]:
        day = self._day()
        scope, total, today = "replica", dict(self._total), dict(self._days.get(day, {}))
        if self._store is not None:
            total_key, day_key = self._keys(day)
            shared_total = await self._store.hgetall(total_key)
            shared_today = await self._store.hgetall(day_key)
            if shared_total is not None and shared_today is not None:
                scope, total, today = "cluster", shared_total, shared_today
            else:
                scope = "replica (shared store unavailable)"
        return {
            "scope": scope,
            "since": None if scope == "cluster" else datetime.fromtimestamp(self._started, tz=timezone.utc).isoformat(),
            "day": day,
            "total": _nest(total),
            "today": _nest(today),
            "by_key": {"total": _by_key(total), "today": _by_key(today)},
        }
