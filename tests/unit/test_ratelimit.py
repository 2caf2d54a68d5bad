"""Rate limits: the sliding-window counter, local shares, Retry-After, headers, and the cluster path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from serve_app.config import RateLimitConfig
from serve_app.errors import RateLimited, to_http
from serve_app.metrics import Counters
from serve_app.policy_store import PolicyStore
from serve_app.ratelimit import Decision, RateLimiter

from .conftest import FakeClock

T0 = 6_000.0  # a window boundary (100 * 60 s)
PER_MIN = RateLimitConfig(requests_per_minute=60)


def limiter(clock: FakeClock, **store_kwargs: Any) -> RateLimiter:
    return RateLimiter(PolicyStore(None, "p", **store_kwargs), clock=clock, counters=Counters())


async def admit_all(rl: RateLimiter, limits: RateLimitConfig = PER_MIN, subject: str = "key:a", most: int = 1000) -> int:
    """How many requests are admitted in a row right now."""
    for n in range(most):
        try:
            await rl.check(subject, limits)
        except RateLimited:
            return n
    return most


# ----------------------------------------------------------------------------- local windows


async def test_sixty_per_minute_admits_sixty_then_429() -> None:
    clock = FakeClock(T0 + 10)
    rl = limiter(clock)
    remaining = [(await rl.check("key:a", PER_MIN)).remaining for _ in range(60)]
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", PER_MIN)
    err = info.value
    assert err.status == 429 and err.retry_after_s is not None and err.retry_after_s > 0
    assert err.rate_headers is not None
    assert err.rate_headers["X-RateLimit-Remaining"] == "0"
    assert err.rate_headers["X-RateLimit-Limit"] == "60"
    assert remaining == list(range(59, -1, -1)), "Remaining falls by one per request"
    status, headers, _ = to_http(err, "rid")
    assert status == 429 and int(headers["Retry-After"]) >= 1


async def test_subjects_are_counted_separately() -> None:
    rl = limiter(FakeClock(T0))
    assert await admit_all(rl, subject="key:a") == 60
    assert await admit_all(rl, subject="key:b") == 60


async def test_no_limits_means_no_decision() -> None:
    rl = limiter(FakeClock(T0))
    assert await rl.check("key:a", RateLimitConfig()) is None


async def test_no_double_burst_across_the_window_edge() -> None:
    clock = FakeClock(T0 + 59.9)
    rl = limiter(clock)
    assert await admit_all(rl) == 60
    clock.advance(0.2)  # into the next fixed window: the previous one still weighs ~99.7 %
    assert await admit_all(rl) <= 1


async def test_a_burst_leaves_the_window_exactly_a_minute_later() -> None:
    clock = FakeClock(T0 + 59.9)
    rl = limiter(clock)
    assert await admit_all(rl) == 60
    clock.advance(30.0)  # half a window later the burst still fills the sliding minute
    assert await admit_all(rl) == 0
    clock.advance(30.0)  # exactly 60 s after it: an admission at t leaves the window at t + 60
    assert await admit_all(rl) == 60


async def test_spread_admissions_free_up_one_by_one() -> None:
    clock = FakeClock(T0)
    rl = limiter(clock)
    limits = RateLimitConfig(requests_per_minute=3)
    for _ in range(3):
        await rl.check("key:a", limits)
        clock.advance(10.0)  # admitted at T0, T0+10, T0+20
    clock.advance(29.0)  # T0+59
    assert await admit_all(rl, limits) == 0
    clock.advance(1.0)  # T0+60: the first one left
    assert await admit_all(rl, limits) == 1
    clock.advance(10.0)  # T0+70: the second one left
    assert await admit_all(rl, limits) == 1


async def test_retry_after_is_when_the_next_request_fits() -> None:
    clock = FakeClock(T0 + 20.0)
    rl = limiter(clock)
    limits = RateLimitConfig(requests_per_minute=2)
    await rl.check("key:a", limits)
    clock.advance(15.0)
    await rl.check("key:a", limits)
    clock.advance(5.0)  # the oldest admission is 20 s old
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", limits)
    wait = info.value.retry_after_s
    assert wait == pytest.approx(40.0)
    assert info.value.rate_headers is not None and info.value.rate_headers["X-RateLimit-Reset"] == "40"
    clock.advance(wait * 0.9)
    with pytest.raises(RateLimited):
        await rl.check("key:a", limits)
    clock.advance(wait * 0.1 + 0.01)
    assert (await rl.check("key:a", limits)) is not None


async def test_recovers_after_a_full_window() -> None:
    clock = FakeClock(T0 + 59.9)
    rl = limiter(clock)
    await admit_all(rl)
    clock.advance(60.01)
    assert await admit_all(rl) == 60


async def test_refused_requests_are_not_counted() -> None:
    clock = FakeClock(T0)
    rl = limiter(clock)
    await admit_all(rl)
    clock.advance(30.0)
    for _ in range(100):
        with pytest.raises(RateLimited):
            await rl.check("key:a", PER_MIN)
    clock.advance(30.01)  # the admitted burst left; refused requests never entered
    assert await admit_all(rl) == 60, "a refused request must not count against the window"


# ----------------------------------------------------------------------------- tokens


async def test_tokens_per_minute_admits_while_under_then_429() -> None:
    clock = FakeClock(T0)
    rl = limiter(clock)
    limits = RateLimitConfig(tokens_per_minute=100)
    for _ in range(10):  # checks cost no tokens
        await rl.check("key:a", limits)
    await rl.add_tokens("key:a", limits, 60)
    d = await rl.check("key:a", limits)
    assert d is not None and d.remaining == 40
    await rl.add_tokens("key:a", limits, 60)  # the call that crosses finished; the next waits
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", limits)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0


async def test_token_limit_at_exactly_the_limit_refuses() -> None:
    rl = limiter(FakeClock(T0))
    limits = RateLimitConfig(tokens_per_minute=100)
    await rl.add_tokens("key:a", limits, 100)
    with pytest.raises(RateLimited):
        await rl.check("key:a", limits)


async def test_add_tokens_without_a_token_limit_books_nothing() -> None:
    rl = limiter(FakeClock(T0))
    await rl.add_tokens("key:a", PER_MIN, 10_000)
    assert await admit_all(rl) == 60


async def test_token_refusal_does_not_count_the_request() -> None:
    clock = FakeClock(T0)
    rl = limiter(clock)
    both = RateLimitConfig(requests_per_minute=5, tokens_per_minute=100)
    await rl.check("key:a", both)
    await rl.add_tokens("key:a", both, 500)
    for _ in range(10):
        with pytest.raises(RateLimited):
            await rl.check("key:a", both)
    assert len(rl._local._logs["p:rl:req:key:a"]) == 1, "only the admitted request counts"


async def test_decision_shows_the_tightest_limit() -> None:
    rl = limiter(FakeClock(T0))
    both = RateLimitConfig(requests_per_minute=60, tokens_per_minute=1000)
    await rl.add_tokens("key:a", both, 900)  # tokens: 10 % left; requests: ~100 % left
    d = await rl.check("key:a", both)
    assert d is not None and (d.limit, d.remaining) == (1000, 100)


# ----------------------------------------------------------------------------- local share


async def test_local_share_with_min_replicas() -> None:
    rl = limiter(FakeClock(T0), min_replicas=2)
    assert await admit_all(rl) == 30


async def test_local_share_follows_live_replicas() -> None:
    store = PolicyStore(None, "p")
    store._live = 3
    rl = RateLimiter(store, clock=FakeClock(T0))
    assert await admit_all(rl) == 20


async def test_local_share_never_drops_below_one() -> None:
    rl = limiter(FakeClock(T0), min_replicas=10)
    assert await admit_all(rl, RateLimitConfig(requests_per_minute=3)) == 1


async def test_local_checks_are_counted() -> None:
    counters = Counters()
    rl = RateLimiter(PolicyStore(None, "p"), clock=FakeClock(T0), counters=counters)
    await rl.check("key:a", PER_MIN)
    assert counters.get("ratelimit_checks", scope="local") == 1
    assert (await rl.check("key:a", PER_MIN)).scope == "local"


# ----------------------------------------------------------------------------- Decision


@pytest.mark.parametrize(("decision", "expected"), [
    (Decision(60, 59, 12.3, "local"), {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "59",
                                        "X-RateLimit-Reset": "13"}),
    (Decision(60, -3, 0.2, "cluster"), {"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "0",
                                         "X-RateLimit-Reset": "1"}),
    (Decision(5, 0, 60.0, "local"), {"X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                                      "X-RateLimit-Reset": "60"}),
])
def test_decision_headers(decision: Decision, expected: dict[str, str]) -> None:
    assert decision.headers() == expected


async def test_request_reset_is_when_the_oldest_admission_leaves() -> None:
    clock = FakeClock(T0 + 7.0)
    rl = limiter(clock)
    await rl.check("key:a", PER_MIN)
    clock.advance(45.0)
    d = await rl.check("key:a", PER_MIN)
    assert d is not None and d.reset_s == pytest.approx(15.0)
    assert d.headers()["X-RateLimit-Reset"] == "15"


async def test_token_reset_is_the_time_left_in_the_fixed_window() -> None:
    rl = limiter(FakeClock(T0 + 45.0))
    d = await rl.check("key:a", RateLimitConfig(tokens_per_minute=100))
    assert d is not None and d.reset_s == pytest.approx(15.0)


# ----------------------------------------------------------------------------- cluster path


class ScriptedStore:
    """A ``PolicyStore`` stand-in whose ``run`` returns canned Redis-script replies."""

    prefix = "p"
    shared = True

    def __init__(self, replies: list[Any]) -> None:
        self.replies = list(replies)
        self.calls: list[tuple[str, list[str], list[Any]]] = []

    def live_replicas(self) -> int:
        return 1

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> list[Any] | None:
        self.calls.append((name, list(keys), list(args)))
        return self.replies.pop(0)


NOW_MS = "6030000"  # 6030 s: half-way through window 100


def check_args(args: list[Any]) -> list[Any]:
    """The script's ARGV without the per-request unique member id."""
    assert isinstance(args[1], str) and len(args[1]) >= 16
    return [args[0], *args[2:]]


async def test_cluster_reply_is_parsed() -> None:
    # Reply per key: count after this request, current window, previous window, oldest ms.
    store = ScriptedStore([["1", NOW_MS, "10", "0", "0", "6000000"]])
    counters = Counters()
    rl = RateLimiter(store, clock=FakeClock(0.0), counters=counters)  # the local clock is not used
    d = await rl.check("key:a", PER_MIN)
    ((name, keys, args),) = store.calls
    assert (name, keys, check_args(args)) == ("rl_check", ["p:rl:req:key:a"], [60_000, "log", 60, 1])
    assert d == Decision(60, 50, 30.0, "cluster")
    assert counters.get("ratelimit_checks", scope="local") == 0


async def test_each_check_sends_a_fresh_member_id() -> None:
    store = ScriptedStore([["1", NOW_MS, "1", "0", "0", NOW_MS]] * 2)
    rl = RateLimiter(store, clock=FakeClock(0.0))
    await rl.check("key:a", PER_MIN)
    await rl.check("key:a", PER_MIN)
    assert store.calls[0][2][1] != store.calls[1][2][1], "the same member would be one entry in the log"


async def test_cluster_refusal_gives_retry_after_from_the_oldest_admission() -> None:
    store = ScriptedStore([["0", NOW_MS, "10", "0", "0", "6000500"]])
    rl = RateLimiter(store, clock=FakeClock(0.0))
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", RateLimitConfig(requests_per_minute=10))
    assert info.value.retry_after_s == pytest.approx(30.5)
    assert info.value.rate_headers == {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": "31"}


async def test_cluster_token_refusal_waits_for_the_older_window_to_slide_out() -> None:
    # tokens 100/min, half-way through: est = 120 * 0.5 + 40 = 100; 1 token drains in 60/120 s
    store = ScriptedStore([["0", NOW_MS, "100", "40", "120", "0"]])
    rl = RateLimiter(store, clock=FakeClock(0.0))
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", RateLimitConfig(tokens_per_minute=100))
    assert info.value.retry_after_s == pytest.approx(0.5)


async def test_cluster_token_refusal_of_the_current_window_alone() -> None:
    # No previous window: the 150 now must become the older window and drain below 100.
    store = ScriptedStore([["0", NOW_MS, "150", "150", "0", "0"]])
    rl = RateLimiter(store, clock=FakeClock(0.0))
    with pytest.raises(RateLimited) as info:
        await rl.check("key:a", RateLimitConfig(tokens_per_minute=100))
    assert info.value.retry_after_s == pytest.approx(30.0 + 51 / 150 * 60)


async def test_cluster_args_for_both_limits() -> None:
    store = ScriptedStore([["1", NOW_MS, "1", "0", "0", NOW_MS, "200", "200", "0", "0"]])
    rl = RateLimiter(store, clock=FakeClock(0.0))
    both = RateLimitConfig(requests_per_minute=60, tokens_per_minute=1000)
    d = await rl.check("key:a", both)
    assert store.calls[0][1] == ["p:rl:req:key:a", "p:rl:tok:key:a"]
    assert check_args(store.calls[0][2]) == [60_000, "log", 60, 1, "counter", 1000, 0]
    assert d is not None and (d.limit, d.remaining, d.scope) == (1000, 800, "cluster")


@pytest.mark.parametrize("reply", [None, ["1", NOW_MS, "5", "0", "0"], ["garbage"]])
async def test_unusable_reply_falls_back_to_the_local_share(reply: Any) -> None:
    store = ScriptedStore([reply] * 100)
    counters = Counters()
    rl = RateLimiter(store, clock=FakeClock(T0), counters=counters)
    d = await rl.check("key:a", RateLimitConfig(requests_per_minute=3))
    assert d is not None and d.scope == "local" and d.remaining == 2
    assert counters.get("ratelimit_checks", scope="local") == 1
    await rl.check("key:a", RateLimitConfig(requests_per_minute=3))
    await rl.check("key:a", RateLimitConfig(requests_per_minute=3))
    with pytest.raises(RateLimited):
        await rl.check("key:a", RateLimitConfig(requests_per_minute=3))


async def test_add_tokens_goes_to_the_store_and_locally_only_when_it_is_down() -> None:
    limits = RateLimitConfig(tokens_per_minute=100)
    store = ScriptedStore([["1"], None, None])
    rl = RateLimiter(store, clock=FakeClock(T0))
    await rl.add_tokens("key:a", limits, 500)  # Redis took it: nothing local
    assert store.calls[0] == ("rl_add", ["p:rl:tok:key:a"], [60_000, 500])
    d = await rl.check("key:a", limits)  # Redis down: the local window is still empty
    assert d is not None and d.scope == "local" and d.remaining == 100
    await rl.add_tokens("key:a", limits, 500)  # Redis down: booked locally
    store.replies.append(None)
    with pytest.raises(RateLimited):
        await rl.check("key:a", limits)
