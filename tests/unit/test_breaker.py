# mypy: disable-error-code="comparison-overlap"
# (mypy narrows the `breaker.state` property across calls that change it.)
"""Circuit breaker: RELIABILITY scenarios that need only a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.breaker import (
    BreakerConfig,
    BreakerOpen,
    CircuitBreaker,
    Failure,
    Permit,
    State,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def make(
    clock: FakeClock | None = None, rand: float = 0.0, **overrides: Any
) -> tuple[CircuitBreaker, FakeClock, list[tuple[State, State]]]:
    clock = clock or FakeClock()
    transitions: list[tuple[State, State]] = []
    breaker = CircuitBreaker(
        BreakerConfig(**overrides),
        clock=clock,
        rand=lambda: rand,
        on_transition=lambda old, new: transitions.append((old, new)),
    )
    return breaker, clock, transitions


def fail_n(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.acquire().failure()


def trip(breaker: CircuitBreaker) -> None:
    fail_n(breaker, breaker.config.min_calls)
    assert breaker.state is State.OPEN


def to_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    clock.advance(breaker.retry_after_s())
    assert breaker.state is State.HALF_OPEN


def test_state_values_are_the_exported_metric() -> None:
    assert (State.CLOSED, State.HALF_OPEN, State.OPEN) == (0, 1, 2)


def test_b1_trip_boundary_is_min_calls() -> None:
    breaker, _, transitions = make(min_calls=10, failure_rate_threshold=0.5)
    fail_n(breaker, 9)
    assert breaker.state is State.CLOSED
    fail_n(breaker, 1)
    assert breaker.state is State.OPEN
    assert transitions == [(State.CLOSED, State.OPEN)]


def test_b1_rate_below_threshold_stays_closed() -> None:
    breaker, _, _ = make(min_calls=10, failure_rate_threshold=0.5)
    for i in range(20):
        permit = breaker.acquire()
        permit.failure() if i % 3 == 0 else permit.success()  # 7/20 = 35 % failures
    assert breaker.state is State.CLOSED


def test_b2_open_rejects_with_remaining_time_within_jitter() -> None:
    breaker, clock, _ = make(rand=0.5, open_s=10, jitter_ratio=0.1)
    trip(breaker)
    with pytest.raises(BreakerOpen) as exc:
        breaker.acquire()
    first = exc.value.retry_after_s
    assert 10.0 <= first <= 11.0
    assert first == pytest.approx(10.5)  # 10 s x (1 + 0.1 x 0.5)
    clock.advance(4)
    with pytest.raises(BreakerOpen) as exc:
        breaker.acquire()
    assert exc.value.retry_after_s == pytest.approx(first - 4)
    assert breaker.retry_after_s() == pytest.approx(first - 4)
    clock.advance(first - 4)
    assert breaker.retry_after_s() == 0.0
    assert breaker.state is State.HALF_OPEN


def test_breaker_open_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(BreakerOpen(3.5)))
    assert isinstance(err, BreakerOpen) and err.retry_after_s == 3.5


def test_b3_half_open_admits_exactly_n_then_closes_on_success() -> None:
    breaker, clock, transitions = make(half_open_permits=3)
    trip(breaker)
    to_half_open(breaker, clock)
    permits: list[Permit] = []
    rejected = 0
    for _ in range(50):
        try:
            permits.append(breaker.acquire())
        except BreakerOpen as exc:
            assert exc.retry_after_s > 0
            rejected += 1
    assert (len(permits), rejected) == (3, 47)
    for permit in permits:
        permit.success()
    assert breaker.state is State.CLOSED
    assert transitions == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    assert breaker.snapshot()["consecutive_trips"] == 0


def test_b3_probe_failures_reopen_with_capped_backoff() -> None:
    breaker, clock, _ = make(open_s=10, open_backoff=2, max_open_s=35, half_open_permits=3)
    trip(breaker)
    periods = [breaker.retry_after_s()]
    for _ in range(3):
        to_half_open(breaker, clock)
        probes = [breaker.acquire() for _ in range(3)]
        for probe in probes:
            probe.failure()
        assert breaker.state is State.OPEN
        periods.append(breaker.retry_after_s())
    assert periods == pytest.approx([10, 20, 35, 35])


def test_b3_close_resets_backoff() -> None:
    breaker, clock, _ = make(open_s=10, half_open_permits=1)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire().failure()
    assert breaker.retry_after_s() == pytest.approx(20)
    to_half_open(breaker, clock)
    breaker.acquire().success()
    assert breaker.state is State.CLOSED
    trip(breaker)
    assert breaker.retry_after_s() == pytest.approx(10)


def test_b3_half_open_reopens_early_once_failure_threshold_is_certain() -> None:
    breaker, clock, _ = make(half_open_permits=4, failure_rate_threshold=0.5)
    trip(breaker)
    to_half_open(breaker, clock)
    probes = [breaker.acquire() for _ in range(4)]
    probes[0].failure()
    assert breaker.state is State.HALF_OPEN  # 1/4 < 50 %
    probes[1].failure()
    assert breaker.state is State.OPEN  # 2/4 whatever the two still in flight do


def test_b3_one_failed_probe_below_threshold_still_closes() -> None:
    breaker, clock, _ = make(half_open_permits=3, failure_rate_threshold=0.5)
    trip(breaker)
    to_half_open(breaker, clock)
    probes = [breaker.acquire() for _ in range(3)]
    probes[0].failure()
    probes[1].success()
    probes[2].success()
    assert breaker.state is State.CLOSED


def test_b4_released_probe_frees_its_permit() -> None:
    breaker, clock, _ = make(half_open_permits=1)
    trip(breaker)
    to_half_open(breaker, clock)
    probe = breaker.acquire()
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    probe.release()
    assert breaker.state is State.HALF_OPEN  # a release decides nothing
    breaker.acquire().success()
    assert breaker.state is State.CLOSED


def test_b4_hung_probe_reopens_and_its_late_success_is_ignored() -> None:
    breaker, clock, transitions = make(half_open_permits=1, max_half_open_s=30, open_s=10)
    trip(breaker)
    to_half_open(breaker, clock)
    hung = breaker.acquire()
    clock.advance(29.9)
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    assert breaker.state is State.HALF_OPEN
    clock.advance(0.1)
    assert breaker.state is State.OPEN  # counted as a trip: backoff applies
    assert breaker.retry_after_s() == pytest.approx(20)
    hung.success()
    assert breaker.state is State.OPEN
    to_half_open(breaker, clock)
    hung.success()  # idempotent and stale either way
    assert breaker.state is State.HALF_OPEN
    breaker.acquire().success()
    assert breaker.state is State.CLOSED
    assert transitions[-3:] == [
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_b4_never_stuck_in_half_open() -> None:
    breaker, clock, transitions = make(half_open_permits=2, max_half_open_s=30, max_open_s=60)
    trip(breaker)
    half_open_since: float | None = None
    for _ in range(1000):  # 1000 s of callers whose probes never report
        clock.advance(1)
        try:
            breaker.acquire()  # leaked
        except BreakerOpen:
            pass
        if breaker.state is State.HALF_OPEN:
            half_open_since = clock.t if half_open_since is None else half_open_since
            assert clock.t - half_open_since < 30
        else:
            half_open_since = None
    assert transitions.count((State.HALF_OPEN, State.OPEN)) >= 10
    while breaker.state is not State.HALF_OPEN:
        clock.advance(1)
    breaker.acquire().success()
    breaker.acquire().success()
    assert breaker.state is State.CLOSED


@pytest.mark.asyncio
async def test_b4_cancelled_task_releases_its_permit() -> None:
    breaker, clock, _ = make(half_open_permits=1)
    trip(breaker)
    to_half_open(breaker, clock)
    entered = asyncio.Event()

    async def call() -> None:
        with breaker.acquire():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(call())
    await entered.wait()
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is State.HALF_OPEN  # released, not counted as a failure
    breaker.acquire().success()
    assert breaker.state is State.CLOSED


@pytest.mark.asyncio
async def test_guard_classifies_and_releases_on_cancel() -> None:
    breaker, clock, _ = make(min_calls=3, half_open_permits=1, max_open_s=60)

    class Upstream(Exception):
        pass

    class Provider429(Exception):
        pass

    def classify(exc: BaseException) -> Failure | None:
        if isinstance(exc, Provider429):
            return Failure(retry_after_s=42)
        return Failure() if isinstance(exc, Upstream) else None

    async def body(exc: BaseException | None) -> None:
        async with breaker.guard(classify):
            if exc is not None:
                raise exc

    await body(None)
    with pytest.raises(ValueError):
        await body(ValueError("client error"))  # released: does not count
    assert breaker.snapshot()["calls_in_window"] == 1
    for _ in range(2):
        with pytest.raises(Upstream):
            await body(Upstream())
    assert breaker.state is State.OPEN
    to_half_open(breaker, clock)
    entered = asyncio.Event()

    async def hang() -> None:
        async with breaker.guard(classify):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hang())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is State.HALF_OPEN
    await body(None)
    assert breaker.state is State.CLOSED
    with pytest.raises(Provider429):
        await body(Provider429())
    assert breaker.retry_after_s() == pytest.approx(42)


def test_b6_slow_successes_trip_via_slow_call_rate() -> None:
    breaker, clock, transitions = make(min_calls=5, slow_call_s=2.0)  # rate threshold 1.0
    for i in range(5):
        assert breaker.state is State.CLOSED, i
        permit = breaker.acquire()
        clock.advance(2.5)
        permit.success()
    assert breaker.state is State.OPEN
    assert transitions == [(State.CLOSED, State.OPEN)]


def test_b6_slow_rate_boundary() -> None:
    breaker, clock, _ = make(min_calls=5, slow_call_s=2.0, slow_call_rate_threshold=0.8)
    permit = breaker.acquire()
    clock.advance(2.0)  # exactly slow_call_s is not slow
    permit.success()
    permits = [breaker.acquire() for _ in range(4)]
    clock.advance(2.01)
    for permit in permits[:3]:
        permit.success()
    assert breaker.state is State.CLOSED  # 3/4, below min_calls anyway
    permits[3].success()
    assert breaker.state is State.OPEN  # 4/5 = 80 % >= 80 %


def test_b8_retry_after_forces_open_for_at_least_that_long() -> None:
    breaker, clock, _ = make(open_s=1, max_open_s=60)
    breaker.acquire().failure(retry_after_s=10)
    assert breaker.state is State.OPEN  # one failure, window far below min_calls
    clock.advance(9.99)
    with pytest.raises(BreakerOpen) as exc:
        breaker.acquire()
    assert exc.value.retry_after_s == pytest.approx(0.01)
    clock.advance(0.01)
    assert breaker.state is State.HALF_OPEN


def test_b8_retry_after_extends_an_open_breaker_and_is_capped() -> None:
    breaker, clock, _ = make(open_s=10, max_open_s=100)
    in_flight = breaker.acquire()
    trip(breaker)
    in_flight.failure(retry_after_s=40)  # stale generation, but the provider spoke now
    assert breaker.retry_after_s() == pytest.approx(40)
    breaker2, _, _ = make(open_s=10, max_open_s=100)
    breaker2.acquire().failure(retry_after_s=10_000)
    assert breaker2.retry_after_s() == pytest.approx(100)
    breaker3, _, _ = make()
    breaker3.acquire().failure(retry_after_s=float("nan"))
    breaker3.acquire().failure(retry_after_s=-1)
    assert breaker3.state is State.CLOSED


def test_late_success_after_trip_does_not_close() -> None:
    breaker, clock, _ = make(half_open_permits=1)
    old = breaker.acquire()
    trip(breaker)
    old.success()
    assert breaker.state is State.OPEN
    to_half_open(breaker, clock)
    old.success()
    assert breaker.state is State.HALF_OPEN


def test_late_success_from_closed_generation_does_not_close_half_open() -> None:
    breaker, clock, _ = make(half_open_permits=1)
    old = breaker.acquire()
    trip(breaker)
    to_half_open(breaker, clock)
    old.success()
    assert breaker.state is State.HALF_OPEN
    breaker.acquire()  # the one real probe is still admitted
    with pytest.raises(BreakerOpen):
        breaker.acquire()


def test_late_failure_from_old_generation_does_not_retrip() -> None:
    breaker, clock, _ = make(min_calls=10, half_open_permits=1)
    stale = [breaker.acquire() for _ in range(10)]
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire().success()
    assert breaker.state is State.CLOSED
    for permit in stale:
        permit.failure()
    assert breaker.state is State.CLOSED
    assert breaker.snapshot()["calls_in_window"] == 0


def test_outcomes_are_idempotent() -> None:
    breaker, _, _ = make(min_calls=2)
    permit = breaker.acquire()
    permit.failure()
    permit.failure()
    permit.success()
    permit.release()
    assert permit.done
    assert breaker.snapshot()["calls_in_window"] == 1
    assert breaker.state is State.CLOSED


def test_window_eviction_recovers() -> None:
    breaker, clock, _ = make(window_s=30, min_calls=10, failure_rate_threshold=0.5)
    fail_n(breaker, 9)
    clock.advance(29.9)
    assert breaker.snapshot()["calls_in_window"] == 9
    clock.advance(0.1)  # the old failures fall out at exactly window_s
    assert breaker.snapshot()["calls_in_window"] == 0
    fail_n(breaker, 1)
    for _ in range(9):
        breaker.acquire().success()
    snap = breaker.snapshot()
    assert snap["state"] == "CLOSED"
    assert snap["failure_rate"] == pytest.approx(0.1)
    assert snap["calls_in_window"] == 10


def test_snapshot_shape() -> None:
    breaker, _, _ = make(open_s=10)
    assert breaker.snapshot()["failure_rate"] is None
    trip(breaker)
    snap = breaker.snapshot()
    assert snap["state"] == "OPEN"
    assert snap["failure_rate"] == 1.0
    assert snap["slow_call_rate"] == 0.0
    assert snap["consecutive_trips"] == 1
    assert snap["retry_after_s"] == pytest.approx(10)
    assert snap["open_until"] == pytest.approx(1010)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"window_s": 0}, "window_s"),
        ({"min_calls": 0}, "min_calls"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": 0}, "slow_call_rate_threshold"),
        ({"jitter_ratio": -0.1}, "jitter_ratio"),
        ({"open_backoff": 0.5}, "open_backoff"),
        ({"half_open_permits": 0}, "half_open_permits"),
        ({"open_s": float("inf")}, "open_s"),
        ({"open_s": 30, "max_open_s": 20}, "max_open_s"),
        ({"slow_call_s": 60}, "max_half_open_s"),
        ({"window": 30}, "window"),
    ],
)
def test_config_validation_names_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BreakerConfig(**overrides)


def test_config_is_frozen() -> None:
    cfg = BreakerConfig()
    with pytest.raises(ValidationError):
        setattr(cfg, "open_s", 1)


def test_callback_exceptions_are_swallowed() -> None:
    calls: list[tuple[State, State]] = []

    def boom(old: State, new: State) -> None:
        calls.append((old, new))
        raise RuntimeError("metrics down")

    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(half_open_permits=1), clock=clock, on_transition=boom)
    trip(breaker)
    to_half_open(breaker, clock)
    breaker.acquire().success()
    assert breaker.state is State.CLOSED
    assert [new for _, new in calls] == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_disabled_breaker_never_rejects() -> None:
    breaker, _, transitions = make(enabled=False)
    fail_n(breaker, 100)
    breaker.acquire().failure(retry_after_s=10)
    assert breaker.state is State.CLOSED and transitions == []
