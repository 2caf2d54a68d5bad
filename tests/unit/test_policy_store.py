"""The policy store: script calls behind a deadline and a breaker, never raising; heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from serve_app.metrics import Counters
from serve_app.policy_store import SCRIPTS, PolicyStore

from .conftest import FakeClock

NAMES = {src: name for name, src in SCRIPTS.items()}


class FakeScripts:
    """A ``ScriptClient``: ``register_script`` returns an async callable that records calls and
    answers from ``replies[name]`` (a value or a callable), or raises / hangs on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[Any]]] = []
        self.replies: dict[str, Any] = {}
        self.fail_with: BaseException | None = None
        self.hang: asyncio.Event | None = None
        self.closed = False

    def register_script(self, script: str) -> Any:
        name = NAMES[script]

        async def call(keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
            self.calls.append((name, list(keys), list(args)))
            if self.hang is not None:
                await self.hang.wait()
            if self.fail_with is not None:
                raise self.fail_with
            reply = self.replies.get(name)
            return reply(keys, args) if callable(reply) else reply

        return call

    async def aclose(self) -> None:
        self.closed = True


def store_with(client: FakeScripts | None, **kwargs: Any) -> PolicyStore:
    return PolicyStore(client, "p", clock=FakeClock(), counters=Counters(), **kwargs)


async def test_no_client_is_local_mode() -> None:
    store = store_with(None)
    assert not store.shared
    assert await store.run("rl_check", ["k"], [1]) is None
    assert store.live_replicas() == 1


async def test_every_script_is_registered() -> None:
    client = FakeScripts()
    store = store_with(client)
    assert store.shared
    for name in SCRIPTS:
        client.replies[name] = ["1"]
        assert await store.run(name, ["k"], []) == ["1"]
    assert [c[0] for c in client.calls] == list(SCRIPTS)


async def test_bytes_replies_are_decoded_and_args_passed_through() -> None:
    client = FakeScripts()
    client.replies["rl_check"] = [1, b"6030000", b"3.5"]
    store = store_with(client)
    assert await store.run("rl_check", ["p:rl:req:key:a"], [60_000, "m", "log", 60, 1]) == [1, "6030000", "3.5"]
    assert client.calls == [("rl_check", ["p:rl:req:key:a"], [60_000, "m", "log", 60, 1])]


async def test_scalar_reply_is_wrapped() -> None:
    client = FakeScripts()
    client.replies["heartbeat"] = 4
    assert await store_with(client).run("heartbeat", ["p:routers"], ["id", 20]) == [4]


async def test_failure_is_none_and_counted_never_raised() -> None:
    client = FakeScripts()
    client.fail_with = ConnectionError("redis down")
    store = store_with(client)
    assert await store.run("budget_reserve", ["k"], []) is None
    assert store._counters.get("policy_store_ops", op="budget_reserve", result="error") == 1


async def test_slow_store_is_bounded_by_the_call_timeout() -> None:
    client = FakeScripts()
    client.hang = asyncio.Event()
    store = store_with(client, call_timeout_s=0.01)
    assert await asyncio.wait_for(store.run("rl_check", ["k"], []), 1.0) is None


async def test_repeated_failures_open_the_breaker_and_skip_the_store() -> None:
    client = FakeScripts()
    client.fail_with = ConnectionError("redis down")
    store = store_with(client)
    for _ in range(5):
        assert await store.run("rl_check", ["k"], []) is None
    calls = len(client.calls)
    assert calls < 5, "the breaker should stop calling a failing store"
    assert store._counters.get("policy_store_ops", op="rl_check", result="skipped") == 5 - calls


async def test_heartbeat_learns_the_live_replica_count() -> None:
    client = FakeScripts()
    client.replies["heartbeat"] = 3
    store = store_with(client, replica_id="me")
    await store.heartbeat()
    assert client.calls == [("heartbeat", ["p:routers"], ["me", 20])]
    assert store.live_replicas() == 3


async def test_heartbeat_failure_keeps_the_last_count_and_min_replicas_is_a_floor() -> None:
    client = FakeScripts()
    client.replies["heartbeat"] = 1
    store = store_with(client, min_replicas=4)
    await store.heartbeat()
    assert store.live_replicas() == 4
    client.replies["heartbeat"] = 6
    await store.heartbeat()
    client.fail_with = ConnectionError("down")
    await store.heartbeat()
    assert store.live_replicas() == 6


@pytest.mark.parametrize("reply", [[b"x"], [None]])
async def test_garbled_heartbeat_is_ignored(reply: Any) -> None:
    client = FakeScripts()
    client.replies["heartbeat"] = reply
    store = store_with(client, min_replicas=2)
    await store.heartbeat()
    assert store.live_replicas() == 2


async def test_close_closes_the_client_and_never_raises() -> None:
    client = FakeScripts()
    store = store_with(client)
    await store.close()
    assert client.closed
    await store_with(None).close()


def test_the_routers_policy_client_waits_the_policy_deadline_not_the_caches() -> None:
    """A 50 ms socket timeout (the cache's) under a 0.5 s policy deadline failed slow-but-
    applied script calls on a busy router: A1 admitted 65 of a limit of 60 that way."""
    from serve_app.deployments import _policy_redis

    from .conftest import app_args

    args = app_args(cache={"redis": {"url": "redis://127.0.0.1:1/0", "socket_timeout_s": 0.05}},
                    policy={"store_timeout_s": 0.5})
    client = _policy_redis(args)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    assert client.connection_pool.connection_kwargs["socket_connect_timeout"] == 0.1
