"""Spend budgets: windows, reserve/settle/release, soft limits, concurrency, outages."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pytest

from serve_app.budget import BudgetBook, BudgetScope, Reservation, window_bounds
from serve_app.config import BudgetConfig
from serve_app.errors import BudgetExceeded, to_http
from serve_app.metrics import Counters
from serve_app.policy_store import PolicyStore

from .conftest import FakeClock


def ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=timezone.utc).timestamp()


NOW = ts(2026, 11, 22, 10, 0, 0)
DAY_LEFT = 14 * 3600.0
QA_DAY = {"scope": "model", "name": "qa", "window": "day"}  # metric labels of scope("model:qa")


def scope(name: str = "model:qa", **cfg: Any) -> BudgetScope:
    return BudgetScope(name, BudgetConfig(**cfg))


def local_book(counters: Counters | None = None, wall: FakeClock | None = None, **store_kwargs: Any) -> BudgetBook:
    return BudgetBook(PolicyStore(None, "p", **store_kwargs), wall=wall or FakeClock(NOW), counters=counters or Counters())


async def reserve_until_refused(book: BudgetBook, scopes: list[BudgetScope], estimate: float,
                                most: int = 1000) -> list[Reservation]:
    out: list[Reservation] = []
    for _ in range(most):
        try:
            r = await book.reserve(scopes, estimate)
        except BudgetExceeded:
            return out
        assert r is not None
        out.append(r)
    return out


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize(("window", "now", "expected"), [
    ("day", ts(2026, 11, 22, 10, 0, 0), ("2026-11-22", 14 * 3600.0)),
    ("day", ts(2026, 11, 22, 23, 59, 59), ("2026-11-22", 1.0)),
    ("day", ts(2026, 11, 23, 0, 0, 0), ("2026-11-23", 86_400.0)),
    ("month", ts(2026, 11, 22, 0, 0, 0), ("2026-11", 9 * 86_400.0)),  # 30-day November
    ("month", ts(2024, 1, 31, 23, 59, 59), ("2024-01", 1.0)),
    ("month", ts(2024, 2, 28, 0, 0, 0), ("2024-02", 2 * 86_400.0)),  # leap February
    ("month", ts(2026, 12, 31, 12, 0, 0), ("2026-12", 12 * 3600.0)),  # into the next year
    ("month", ts(2026, 12, 1, 0, 0, 0), ("2026-12", 31 * 86_400.0)),
])
def test_window_bounds(window: str, now: float, expected: tuple[str, float]) -> None:
    window_id, left = window_bounds(window, now)
    assert (window_id, left) == (expected[0], pytest.approx(expected[1]))


# ----------------------------------------------------------------------------- local mode


async def test_hard_limit_stops_before_exceeding() -> None:
    counters = Counters()
    book = local_book(counters)
    scopes = [scope(hard_usd=1.0)]
    held = await reserve_until_refused(book, scopes, 0.05)
    assert 19 <= len(held) <= 20
    assert sum(r.amount for r in held) <= 1.0 + 1e-9
    for r in held:
        await book.settle(r, 0.05)
    with pytest.raises(BudgetExceeded) as info:
        await book.reserve(scopes, 0.05)
    assert info.value.status == 429 and info.value.code == "budget_exceeded"
    assert info.value.retry_after_s == pytest.approx(DAY_LEFT)
    status, headers, body = to_http(info.value, "rid")
    assert status == 429 and headers["Retry-After"] == "3600", "Retry-After is capped at an hour"
    assert "model:qa" in body["error"]["message"]
    assert counters.get("budget_exceeded", **QA_DAY) == 2


async def test_retry_after_is_the_month_end_for_a_monthly_budget() -> None:
    book = local_book(wall=FakeClock(ts(2024, 1, 31, 23, 0, 0)))
    scopes = [scope(window="month", hard_usd=0.5)]
    await book.reserve(scopes, 0.5)
    with pytest.raises(BudgetExceeded) as info:
        await book.reserve(scopes, 0.5)
    assert info.value.retry_after_s == pytest.approx(3600.0)


async def test_settle_with_more_than_the_estimate_counts_the_real_cost() -> None:
    book = local_book()
    scopes = [scope(hard_usd=1.0)]
    r = await book.reserve(scopes, 0.125)
    await book.settle(r, 0.5)
    held = await reserve_until_refused(book, scopes, 0.125)
    assert len(held) == 4  # 0.5 spent + 4 x 0.125 = 1.0


async def test_settle_with_less_than_the_estimate_gives_the_difference_back() -> None:
    book = local_book()
    scopes = [scope(hard_usd=1.0)]
    r = await book.reserve(scopes, 0.5)
    await book.settle(r, 0.125)
    assert len(await reserve_until_refused(book, scopes, 0.125)) == 7


async def test_release_gives_the_reservation_back() -> None:
    book = local_book()
    scopes = [scope(hard_usd=1.0)]
    a = await book.reserve(scopes, 0.5)
    await book.reserve(scopes, 0.5)
    with pytest.raises(BudgetExceeded):
        await book.reserve(scopes, 0.5)
    await book.release(a)
    assert await book.reserve(scopes, 0.5) is not None


async def test_settling_twice_books_once() -> None:
    book = local_book()
    scopes = [scope(hard_usd=1.0)]
    r = await book.reserve(scopes, 0.25)
    await book.settle(r, 0.25)
    await book.settle(r, 0.25)
    await book.release(r)  # after settle: no-op, not a refund
    assert len(await reserve_until_refused(book, scopes, 0.25)) == 3


async def test_no_scopes_no_reservation() -> None:
    book = local_book()
    assert await book.reserve([], 1.0) is None
    await book.settle(None, 1.0)
    await book.release(None)


async def test_soft_only_budget_never_refuses() -> None:
    book = local_book()
    scopes = [scope(soft_usd=0.5)]
    for _ in range(10):
        await book.settle(await book.reserve(scopes, 0.25), 0.25)


async def test_soft_limit_is_counted_once_and_sets_gauges() -> None:
    counters = Counters()
    book = local_book(counters)
    scopes = [scope(soft_usd=0.25, hard_usd=10.0)]
    for _ in range(5):
        await book.settle(await book.reserve(scopes, 0.125), 0.125)
    assert counters.get("budget_soft_exceeded", **QA_DAY) == 1
    assert counters.get("budget_spend_usd", **QA_DAY) == pytest.approx(0.625)
    assert counters.get("budget_spent_ratio", **QA_DAY) == pytest.approx(0.0625)  # of the hard limit
    assert counters.get("budget_soft_limit_ratio", **QA_DAY) == pytest.approx(0.025)


async def test_soft_limit_not_reached_is_not_counted() -> None:
    counters = Counters()
    book = local_book(counters)
    scopes = [scope(soft_usd=1.0)]
    await book.settle(await book.reserve(scopes, 0.25), 0.25)
    assert counters.get("budget_soft_exceeded", **QA_DAY) == 0
    assert counters.get("budget_spend_usd", **QA_DAY) == 0.25
    assert counters.get("budget_spent_ratio", **QA_DAY) == 0.25, "a soft-only budget is a ratio of the soft limit"


async def test_soft_limit_is_counted_again_in_the_next_window() -> None:
    counters = Counters()
    wall = FakeClock(NOW)
    book = local_book(counters, wall)
    scopes = [scope(soft_usd=0.25)]
    await book.settle(await book.reserve(scopes, 0.5), 0.5)
    wall.advance(86_400.0)
    await book.settle(await book.reserve(scopes, 0.5), 0.5)
    assert counters.get("budget_soft_exceeded", **QA_DAY) == 2


async def test_a_new_day_starts_from_zero() -> None:
    wall = FakeClock(NOW)
    book = local_book(wall=wall)
    scopes = [scope(hard_usd=0.5)]
    await book.settle(await book.reserve(scopes, 0.5), 0.5)
    with pytest.raises(BudgetExceeded):
        await book.reserve(scopes, 0.5)
    wall.advance(DAY_LEFT)
    assert await book.reserve(scopes, 0.5) is not None


async def test_all_or_nothing_over_scopes() -> None:
    book = local_book()
    model = scope("model:qa", hard_usd=10.0)
    key = scope("key:k1", hard_usd=0.5)
    await book.reserve([model, key], 0.5)
    with pytest.raises(BudgetExceeded):
        await book.reserve([model, key], 0.5)
    # The refused call reserved nothing under the model: 19 more 0.5 calls fit its $10.
    assert len(await reserve_until_refused(book, [model], 0.5)) == 19


async def test_local_share_divides_by_replicas() -> None:
    book = local_book(min_replicas=2)
    assert len(await reserve_until_refused(book, [scope(hard_usd=1.0)], 0.125)) == 4


async def test_fifty_concurrent_reservations_never_commit_more_than_the_limit() -> None:
    class YieldingDownStore:  # Redis down, and every call yields to the other tasks
        prefix, shared = "p", True

        def live_replicas(self) -> int:
            return 1

        async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
            await asyncio.sleep(0)
            return None

        async def attempt(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[None, bool]:
            await asyncio.sleep(0)
            return None, False

    book = BudgetBook(YieldingDownStore(), wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]

    async def call() -> float:
        r = await book.reserve(scopes, 0.05)
        await asyncio.sleep(0)
        await book.settle(r, 0.05)
        return 0.05

    results = await asyncio.gather(*(call() for _ in range(50)), return_exceptions=True)
    spent = sum(r for r in results if isinstance(r, float))
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert spent <= 1.0 + 1e-9
    assert len(refused) == 50 - round(spent / 0.05) >= 30


# ----------------------------------------------------------------------------- with a store


class ScriptStore:
    """A ``PolicyStore`` stand-in that runs the budget scripts' semantics in memory (atomic per
    call, yielding first like a network hop), can be 'down' (nothing applied) or lose replies
    (applied, but the caller hears nothing: a deadline passed), and records every call."""

    prefix = "p"
    shared = True

    def __init__(self, replicas: int = 1) -> None:
        self.hashes: dict[str, dict[str, float]] = {}
        self.tombstones: set[str] = set()
        self.calls: list[tuple[str, list[str], list[Any]]] = []
        self.down = False
        self.lose_replies = False
        self.replicas = replicas

    def live_replicas(self) -> int:
        return self.replicas

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[str] | None:
        return (await self.attempt(name, keys, args))[0]

    async def attempt(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[list[str] | None, bool]:
        await asyncio.sleep(0)
        self.calls.append((name, list(keys), list(args)))
        if self.down:
            return None, False
        out = self.apply(name, keys, args)
        return (None, True) if self.lose_replies else (out, True)

    def apply(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[str]:
        if name == "budget_reserve":
            amount, op, tomb, hards = float(args[0]), args[2], args[3], [float(h) for h in args[4:]]
            committed = [self.hashes.get(k, {}).get("committed", 0.0) for k in keys]
            ok = tomb not in self.tombstones and all(h < 0 or c + amount <= h for c, h in zip(committed, hards))
            out = ["1" if ok else "0"]
            for k, c in zip(keys, committed):
                if ok:
                    h = self.hashes.setdefault(k, {})
                    c = h["committed"] = h.get("committed", 0.0) + amount
                    h[f"r:{op}"] = amount
                out.append(repr(c))
            return out
        if name == "budget_settle":
            op, cost, tomb = args[0], float(args[1]), args[3]
            done = bool(tomb) and tomb in self.tombstones
            out = []
            for k in keys:
                h = self.hashes.setdefault(k, {})
                if not done:
                    held = h.pop(f"r:{op}", None)
                    if held is not None or tomb:
                        h["committed"] = h.get("committed", 0.0) + cost - (held or 0.0)
                        h["spent"] = h.get("spent", 0.0) + cost
                out += [repr(h.get("committed", 0.0)), repr(h.get("spent", 0.0))]
            if tomb and not done:
                self.tombstones.add(tomb)
            return out
        if name == "budget_add":
            out = []
            for k in keys:
                h = self.hashes.setdefault(k, {})
                h["committed"] = h.get("committed", 0.0) + float(args[0])
                h["spent"] = h.get("spent", 0.0) + float(args[1])
                out += [repr(h["committed"]), repr(h["spent"])]
            return out
        raise AssertionError(name)


KEY = "p:budget:model:qa:2026-11-22"


async def test_store_call_shapes() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    r = await book.reserve([scope(hard_usd=1.0), scope("key:k1", soft_usd=2.0)], 0.25)
    assert r is not None and not r.local
    name, keys, args = store.calls[0]
    assert name == "budget_reserve"
    assert keys == [KEY, "p:budget:key:k1:2026-11-22"]
    assert [float(a) for a in args[:2]] == [0.25, int(DAY_LEFT + 86_400)]
    assert args[2] == r.op_id and args[3] == f"p:budget:op:{r.op_id}"
    assert [float(a) for a in args[4:]] == [1.0, -1.0]
    assert store.hashes[KEY] == {"committed": 0.25, f"r:{r.op_id}": 0.25}
    await book.settle(r, 0.125)
    name, keys, args = store.calls[1]
    # Redis confirmed the reservation: no tombstone needed.
    assert name == "budget_settle" and args[:4] == [r.op_id, repr(0.125), int(DAY_LEFT + 86_400), ""]
    assert store.hashes[KEY] == {"committed": 0.125, "spent": 0.125}


@pytest.mark.parametrize("where", ["local", "store"])
async def test_refusal_names_the_exhausted_scope_and_its_window(where: str) -> None:
    """Locally (Redis unreachable) and through the store's script alike."""
    book = local_book() if where == "local" else BudgetBook(ScriptStore(), wall=FakeClock(NOW))  # type: ignore[arg-type]
    model = scope("model:qa", window="day", hard_usd=100.0)
    key = scope("key:k1", window="month", hard_usd=0.5)
    await book.reserve([model, key], 0.5)
    with pytest.raises(BudgetExceeded) as info:
        await book.reserve([model, key], 0.5)
    assert "key:k1" in info.value.message
    assert info.value.retry_after_s == pytest.approx(window_bounds("month", NOW)[1])


async def test_fifty_concurrent_reservations_through_the_store() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]

    async def call() -> bool:
        try:
            r = await book.reserve(scopes, 0.0625)
        except BudgetExceeded:
            return False
        await book.settle(r, 0.0625)
        return True

    results = await asyncio.gather(*(call() for _ in range(50)))
    assert sum(results) == 16
    assert store.hashes[KEY]["committed"] == store.hashes[KEY]["spent"] == 1.0


async def test_outage_allows_only_this_replicas_share_of_what_was_left() -> None:
    store = ScriptStore(replicas=2)
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]
    await book.settle(await book.reserve(scopes, 0.5), 0.5)  # the cluster has spent 0.5
    store.down = True
    held = await reserve_until_refused(book, scopes, 0.125)
    assert len(held) == 2 and all(r.local for r in held)  # (1.0 - 0.5) / 2 replicas = 0.25


async def test_pending_spend_is_flushed_when_the_store_answers_again() -> None:
    store = ScriptStore(replicas=2)
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]
    await book.settle(await book.reserve(scopes, 0.5), 0.5)
    store.down = True
    held = await reserve_until_refused(book, scopes, 0.125)
    for r in held:
        await book.settle(r, 0.125)
    store.down = False
    store.calls.clear()
    r = await book.reserve(scopes, 0.125)
    assert r is not None and not r.local
    *flush, reserve = store.calls
    # One settle per outage reservation, each with its id and a tombstone (Redis never
    # confirmed them), then the new reservation.
    assert [(c[0], c[1], c[2][0], c[2][3]) for c in flush] == [
        ("budget_settle", [KEY], h.op_id, f"p:budget:op:{h.op_id}") for h in held]
    assert reserve[0] == "budget_reserve"
    assert {k: v for k, v in store.hashes[KEY].items() if not k.startswith("r:")} == {"committed": 0.875, "spent": 0.75}
    # Flushed once: the next reservation sends no second flush.
    store.calls.clear()
    await book.reserve(scopes, 0.125)
    assert [c[0] for c in store.calls] == ["budget_reserve"]


async def test_settle_during_an_outage_is_pushed_later() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]
    r = await book.reserve(scopes, 0.25)  # reserved in the store
    store.down = True
    await book.settle(r, 0.5)  # the store missed the settle
    store.down = False
    await book.reserve(scopes, 0.125)
    assert counted(store) == {"committed": 0.625, "spent": 0.5}


# ----------------------------------------------------------------------------- lost replies


def counted(store: ScriptStore) -> dict[str, float]:
    return {k: v for k, v in store.hashes[KEY].items() if not k.startswith("r:")}


async def test_a_lost_settle_reply_is_sent_again_and_counted_once() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=1.0)]
    r = await book.reserve(scopes, 0.25)
    store.lose_replies = True
    await book.settle(r, 0.125)  # applied in Redis; the replica heard nothing
    assert store.hashes[KEY] == {"committed": 0.125, "spent": 0.125}
    store.lose_replies = False
    await book.settle(await book.reserve(scopes, 0.25), 0.25)  # the repeat goes first: a no-op
    assert [c[0] for c in store.calls].count("budget_settle") == 3
    assert store.hashes[KEY] == {"committed": 0.375, "spent": 0.375}


async def test_a_lost_reservation_reply_is_settled_once() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    store.lose_replies = True
    r = await book.reserve([scope(hard_usd=1.0)], 0.25)  # held in Redis; the replica heard nothing
    assert r is not None and r.local and store.hashes[KEY]["committed"] == 0.25
    store.lose_replies = False
    await book.settle(r, 0.125)
    assert store.hashes[KEY] == {"committed": 0.125, "spent": 0.125}  # the estimate replaced, not added to
    await book.settle(r, 0.125)  # a second settle of the same reservation does nothing
    store.apply(*store.calls[-1])  # ... nor a duplicate delivery of its script
    assert store.hashes[KEY] == {"committed": 0.125, "spent": 0.125}


async def test_a_reservation_arriving_after_its_settle_is_ignored() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    store.down = True
    r = await book.reserve([scope(hard_usd=1.0)], 0.25)  # never reached Redis (yet)
    reserve_call = store.calls[-1]
    store.down = False
    await book.settle(r, 0.125)  # charged directly, with a tombstone
    assert counted(store) == {"committed": 0.125, "spent": 0.125}
    assert store.apply(*reserve_call)[0] == "0"  # the delayed reservation lands: nothing held
    assert store.hashes[KEY] == {"committed": 0.125, "spent": 0.125}


async def test_releasing_a_lost_reservation_frees_what_redis_holds() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    store.lose_replies = True
    r = await book.reserve([scope(hard_usd=1.0)], 0.25)
    store.lose_replies = False
    await book.release(r)
    assert store.hashes[KEY] == {"committed": 0.0, "spent": 0.0}


async def test_unconfirmed_settles_beyond_max_pending_are_summed_and_counted() -> None:
    store = ScriptStore()
    counters = Counters()
    book = BudgetBook(store, wall=FakeClock(NOW), counters=counters, max_pending=2)  # type: ignore[arg-type]
    scopes = [scope(hard_usd=10.0)]
    held = [await book.reserve(scopes, 0.25) for _ in range(3)]
    store.down = True
    for r in held:
        await book.settle(r, 0.125)
    assert counters.get("budget_pending_overflow") == 1
    store.down = False
    await book.settle(await book.reserve(scopes, 0.25), 0.25)
    assert [c[0] for c in store.calls[-5:]] == ["budget_settle", "budget_settle", "budget_add", "budget_reserve",
                                                "budget_settle"]
    assert counted(store) == {"committed": 0.625, "spent": 0.625}


async def test_a_long_backlog_drains_a_bounded_number_per_reservation() -> None:
    store = ScriptStore()
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    scopes = [scope(hard_usd=100.0)]
    held = [await book.reserve(scopes, 0.25) for _ in range(40)]
    store.down = True
    for r in held:
        await book.settle(r, 0.125)
    store.down = False
    store.calls.clear()
    await book.reserve(scopes, 0.25)
    assert [c[0] for c in store.calls].count("budget_settle") == 32
    await book.reserve(scopes, 0.25)
    assert counted(store) == {"committed": 40 * 0.125 + 2 * 0.25, "spent": 40 * 0.125}


async def test_a_lost_reservation_refused_locally_is_given_back() -> None:
    """Redis booked the reservation but its reply was lost, and the local share then refused
    the request: nobody will settle it, so the refusal releases it (nothing stays held)."""
    store = ScriptStore(replicas=4)
    book = BudgetBook(store, wall=FakeClock(NOW))  # type: ignore[arg-type]
    store.lose_replies = True
    with pytest.raises(BudgetExceeded):
        await book.reserve([scope(hard_usd=1.0)], 0.5)  # share: 1.0 / 4 replicas < 0.5
    store.lose_replies = False
    await book.release(await book.reserve([scope(hard_usd=1.0)], 0.0))  # sends the release again first
    assert counted(store) == {"committed": 0.0, "spent": 0.0}
    assert not [k for k in store.hashes[KEY] if k.startswith("r:")]
