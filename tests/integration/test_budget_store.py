"""Budget scripts in a real redis-server (no Ray): a reply lost after Redis applied a script
never counts a call twice, and a reservation arriving after its settle holds nothing.

This is the A4 drift of a loaded router (RELIABILITY A4): a budget script's reply came back
after the caller's deadline, so the replica took the outage path for a call Redis had
already booked. Here the scripts run for real and the client loses replies on purpose.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from typing import Any

from serve_app.budget import BudgetBook, BudgetScope
from serve_app.config import BudgetConfig
from serve_app.errors import BudgetExceeded
from serve_app.policy_store import PolicyStore
from serve_app.redis_tier import redis_from_url

from .harness import RedisProcess

PREFIX = "bstore"


class LossyClient:
    """A ``ScriptClient`` over a real redis client. ``lose``: the script runs in Redis but the
    caller hears a timeout; ``drop``: the script never reaches Redis; ``loss_rate``: a share
    of replies lost at random."""

    def __init__(self, client: Any, rng: random.Random | None = None) -> None:
        self._client = client
        self.lose = False
        self.drop = False
        self.loss_rate = 0.0
        self._rng = rng or random.Random(7)
        self.sent: list[tuple[str, list[str], list[Any]]] = []

    def register_script(self, script: str) -> Any:
        real = self._client.register_script(script)

        async def call(keys: Sequence[str], args: Sequence[Any]) -> Any:
            if self.drop:
                self.sent.append((script, list(keys), list(args)))
                raise TimeoutError("never arrived")
            reply = await real(keys=list(keys), args=list(args))
            if self.lose or self._rng.random() < self.loss_rate:
                raise TimeoutError("reply lost")
            return reply

        return call

    async def replay(self, index: int) -> Any:
        """Deliver a dropped script now (a copy that arrives late)."""
        script, keys, args = self.sent[index]
        return await self._client.register_script(script)(keys=keys, args=args)

    async def aclose(self) -> None:
        await self._client.aclose()


def book_on(redis_srv: RedisProcess) -> tuple[BudgetBook, LossyClient]:
    client = LossyClient(redis_from_url(redis_srv.url, 0.5, 0.5))
    store = PolicyStore(client, PREFIX, call_timeout_s=0.5)
    return BudgetBook(store), client


def scopes(hard: float = 100.0) -> list[BudgetScope]:
    return [BudgetScope("model:qa", BudgetConfig(window="day", hard_usd=hard))]


def stored(redis_srv: RedisProcess) -> dict[str, float]:
    day = time.strftime("%Y-%m-%d", time.gmtime())
    raw = redis_srv.client().hgetall(f"{PREFIX}:budget:model:qa:{day}")
    return {k.decode(): float(v) for k, v in raw.items()}


def test_a_lost_settle_reply_is_counted_once(redis_srv: RedisProcess) -> None:
    async def go() -> None:
        book, client = book_on(redis_srv)
        r = await book.reserve(scopes(), 0.25)
        client.lose = True
        await book.settle(r, 0.125)  # applied in Redis, the replica heard a timeout
        client.lose = False
        await book.settle(await book.reserve(scopes(), 0.25), 0.25)  # sends the repeat first
        await client.aclose()

    asyncio.run(go())
    assert stored(redis_srv) == {"committed": 0.375, "spent": 0.375}


def test_a_lost_reservation_reply_is_settled_once(redis_srv: RedisProcess) -> None:
    async def go() -> None:
        book, client = book_on(redis_srv)
        client.lose = True
        r = await book.reserve(scopes(), 0.25)  # held in Redis; the replica saw nothing
        assert r is not None and r.local
        client.lose = False
        await book.settle(r, 0.125)
        await client.aclose()

    asyncio.run(go())
    assert stored(redis_srv) == {"committed": 0.125, "spent": 0.125}


def test_a_reservation_arriving_after_its_settle_holds_nothing(redis_srv: RedisProcess) -> None:
    async def go() -> list[Any]:
        book, client = book_on(redis_srv)
        client.drop = True
        r = await book.reserve(scopes(), 0.25)  # never arrived (yet)
        client.drop = False
        await book.settle(r, 0.125)  # charged directly, tombstoned
        late = await client.replay(0)  # now the reservation arrives
        await client.aclose()
        return late

    late = asyncio.run(go())
    assert int(late[0]) == 0
    assert stored(redis_srv) == {"committed": 0.125, "spent": 0.125}


def test_a_raced_budget_with_lost_replies_ends_exact(redis_srv: RedisProcess) -> None:
    """200 concurrent calls, a fifth of all replies lost: Redis ends with exactly what the
    admitted calls cost, and no reservation left held."""
    charged: list[float] = []

    async def go() -> None:
        book, client = book_on(redis_srv)
        client.loss_rate = 0.2

        async def call(i: int) -> None:
            try:
                r = await book.reserve(scopes(hard=3.0), 0.02)
            except BudgetExceeded:
                return
            await asyncio.sleep(random.random() * 0.01)  # the LM call
            cost = 0.01 + (i % 5) * 0.002
            charged.append(cost)
            await book.settle(r, cost)

        await asyncio.gather(*(call(i) for i in range(200)))
        client.loss_rate = 0.0
        # Later reservations drain what waits to be sent again (once the store's breaker,
        # if the losses opened it, lets a probe through).
        deadline = time.monotonic() + 10
        while book._pending and time.monotonic() < deadline:
            try:
                await book.release(await book.reserve(scopes(hard=3.0), 0.0))
            except BudgetExceeded:
                pass  # the drain ran before the refusal
            await asyncio.sleep(0.05)
        assert not book._pending
        await client.aclose()

    asyncio.run(go())
    got = stored(redis_srv)
    print(f"FIGURE budget lost replies: {len(charged)} calls charged ${sum(charged):.4f}; Redis {got}")
    assert abs(got["spent"] - sum(charged)) < 1e-9, (got, sum(charged))
    assert abs(got["committed"] - got["spent"]) < 1e-9, got
    assert not [k for k in got if k.startswith("r:")], got
