"""Per-model circuit breaker for one predictor replica, after resilience4j.

States: CLOSED (calls flow, outcomes feed a time-based sliding window), OPEN (calls are
rejected with ``BreakerOpen``), HALF_OPEN (exactly ``half_open_permits`` probes decide).

Contracts:

- Every state change bumps a *generation*; a ``Permit`` remembers the generation it was
  admitted in, and its outcome only counts if that generation is still current. A late
  success cannot close a breaker that tripped meanwhile, a late failure cannot re-trip one
  that recovered. The one exception is a provider ``Retry-After`` (see below).
- Time-based transitions are lazy: OPEN becomes HALF_OPEN at the first query (``state``,
  ``acquire``, ``snapshot``, an outcome) after its open period has elapsed.
- Half-open is evaluated like resilience4j, over the probes: it re-opens as soon as the
  probes' failure rate or slow-call rate (denominator ``half_open_permits``) is bound to
  reach its threshold, otherwise it closes once every permit has reported. A released
  probe frees its permit for another caller. If half-open lasts ``max_half_open_s``
  without a decision (a hung probe), it re-opens as a trip, so a fresh half-open with
  fresh permits follows; the stale probes' outcomes are then ignored. It never sticks.
- A failure carrying ``retry_after_s`` (a provider 429 ``Retry-After``) forces the breaker
  open for at least that long, whatever the window or the permit's generation (the
  response arrived now, so it describes the provider now). If already open, the open
  period is extended. The hint is capped at ``max_open_s``: a bogus header cannot park the
  replica indefinitely, and a provider that still limits answers the probe with another 429.
- Rates trip when ``rate >= threshold``; ``slow_call_rate_threshold=1.0`` thus trips only
  when every call in the window was slow.

Concurrency: every method is synchronous and never awaits, so when all callers share one
asyncio event-loop thread each call is atomic and no lock is needed. Not thread-safe.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from enum import IntEnum
from types import TracebackType
from typing import Any, Callable, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["BreakerConfig", "BreakerOpen", "CircuitBreaker", "Failure", "Permit", "State"]

_log = logging.getLogger(__name__)


class State(IntEnum):
    """Breaker state; the values are exported as a metric."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Exception):
    """The breaker rejected the call; retry after ``retry_after_s`` seconds (> 0)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(retry_after_s)  # args replayed by pickling
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"circuit breaker open; retry after {self.retry_after_s:.2f}s"


class BreakerConfig(BaseModel):
    """Breaker tuning for one model. Durations are seconds, rates are fractions in (0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    window_s: float = Field(default=30.0, gt=0, description="time-based sliding window span")
    min_calls: int = Field(default=10, ge=1, description="calls in window before rates are judged")
    failure_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    slow_call_s: float = Field(default=10.0, gt=0, description="a call strictly longer is slow")
    slow_call_rate_threshold: float = Field(default=1.0, gt=0, le=1)
    open_s: float = Field(default=10.0, gt=0, description="open period of the first trip")
    open_backoff: float = Field(default=2.0, ge=1, description="open period multiplier per repeated trip")
    max_open_s: float = Field(default=120.0, gt=0, description="cap on the un-jittered open period")
    jitter_ratio: float = Field(default=0.1, ge=0, le=1, description="open period x [1, 1+jitter]")
    half_open_permits: int = Field(default=3, ge=1)
    max_half_open_s: float = Field(default=30.0, gt=0, description="undecided half-open re-opens after")

    @model_validator(mode="after")
    def _cross_field(self) -> BreakerConfig:
        if self.max_open_s < self.open_s:
            raise ValueError(f"max_open_s ({self.max_open_s}) must be >= open_s ({self.open_s})")
        if self.max_half_open_s < self.slow_call_s:
            # Otherwise a merely-slow probe could never report before half-open times out,
            # and the breaker would cycle open/half-open forever.
            raise ValueError(
                f"max_half_open_s ({self.max_half_open_s}) must be >= slow_call_s ({self.slow_call_s})"
            )
        return self


class Failure(NamedTuple):
    """A ``guard`` classifier's verdict: count the error as a failure."""

    retry_after_s: float | None = None


class _Window:
    """Sliding window of (finish time, failed, slow) over ``(now - span_s, now]``.

    A deque with running counters: O(1) amortized per call, memory O(calls in window).
    """

    __slots__ = ("_span_s", "_records", "calls", "failures", "slow")

    def __init__(self, span_s: float) -> None:
        self._span_s = span_s
        self._records: deque[tuple[float, bool, bool]] = deque()
        self.calls = self.failures = self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.evict(now)
        self._records.append((now, failed, slow))
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def evict(self, now: float) -> None:
        cutoff = now - self._span_s
        records = self._records
        while records and records[0][0] <= cutoff:
            _, failed, slow = records.popleft()
            self.calls -= 1
            self.failures -= failed
            self.slow -= slow

    def clear(self) -> None:
        self._records.clear()
        self.calls = self.failures = self.slow = 0


class Permit:
    """One admitted call (made by ``CircuitBreaker.acquire`` only). Record one outcome: ``success()``, ``failure()`` or ``release()``
    (neither: client error, cancellation). Only the first call counts; later ones are no-ops.

    As a (sync) context manager it releases on exit if no outcome was recorded, so an
    exception or ``asyncio.CancelledError`` escaping the block never counts as a failure.
    """

    __slots__ = ("_breaker", "_generation", "_started", "_done")

    def __init__(self, breaker: CircuitBreaker | None, generation: int, started: float) -> None:
        self._breaker = breaker  # None: breaker disabled, outcomes are ignored
        self._generation = generation
        self._started = started
        self._done = False

    @property
    def generation(self) -> int:
        """The breaker generation this permit was admitted in."""
        return self._generation

    @property
    def done(self) -> bool:
        return self._done

    def success(self) -> None:
        self._finish(False, None)

    def failure(self, retry_after_s: float | None = None) -> None:
        """Count a failure; ``retry_after_s`` (provider Retry-After) forces the breaker open."""
        self._finish(True, retry_after_s)

    def release(self) -> None:
        self._finish(None, None)

    def _finish(self, failed: bool | None, retry_after_s: float | None) -> None:
        if self._done:
            return
        self._done = True
        if self._breaker is not None:
            self._breaker._record(self._generation, self._started, failed, retry_after_s)

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Guard:
    """The async context manager returned by ``CircuitBreaker.guard``."""

    __slots__ = ("_breaker", "_classify", "_permit")

    def __init__(self, breaker: CircuitBreaker, classify: Callable[[BaseException], Failure | None]) -> None:
        self._breaker, self._classify = breaker, classify
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self._permit = self._breaker.acquire()
        return self._permit

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        permit = self._permit
        if permit is None or permit.done:
            return
        if exc is None:
            permit.success()
        elif not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, ...
            permit.release()
        else:
            verdict: Failure | None = None
            try:
                verdict = self._classify(exc)
            finally:  # a raising classifier still returns the permit
                if verdict is None:
                    permit.release()
                else:
                    permit.failure(verdict.retry_after_s)


class CircuitBreaker:
    """Circuit breaker for one model on one replica; see the module docstring for semantics.

    ``clock`` (seconds, monotonic) and ``rand`` (uniform in [0, 1)) are injectable for tests.
    ``on_transition(old, new)`` is called exactly once per state change, after the change;
    any exception it raises is logged and swallowed.
    """

    def __init__(
        self,
        config: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self._cfg = config
        self._clock, self._rand, self._on_transition = clock, rand, on_transition
        self._state = State.CLOSED
        self._generation = 0
        self._window = _Window(config.window_s)
        self._open_until = 0.0
        self._base_open_s = config.open_s  # un-jittered period of the latest trip
        self._trips = 0  # consecutive trips since the last close
        self._half_open_since = 0.0
        self._probes_in_flight = self._probes_done = self._probe_failures = self._probe_slow = 0

    @property
    def config(self) -> BreakerConfig:
        return self._cfg

    @property
    def state(self) -> State:
        self._advance(self._clock())
        return self._state

    @property
    def generation(self) -> int:
        return self._generation

    def retry_after_s(self) -> float:
        """Remaining open time; 0.0 unless open."""
        now = self._clock()
        self._advance(now)
        return self._open_until - now if self._state is State.OPEN else 0.0

    def acquire(self) -> Permit:
        """Admit one call or raise ``BreakerOpen``. The caller must record an outcome on the
        permit (or use it as a context manager) so that half-open permits are returned."""
        now = self._clock()
        if not self._cfg.enabled:
            return Permit(None, self._generation, now)
        self._advance(now)
        if self._state is State.OPEN:
            raise BreakerOpen(self._open_until - now)
        if self._state is State.HALF_OPEN:
            if self._probes_in_flight + self._probes_done >= self._cfg.half_open_permits:
                # Probes are out; a decision comes at the latest at the half-open deadline.
                deadline = self._half_open_since + self._cfg.max_half_open_s
                raise BreakerOpen(min(self._cfg.open_s, deadline - now))
            self._probes_in_flight += 1
        return Permit(self, self._generation, now)

    def guard(self, classify: Callable[[BaseException], Failure | None]) -> _Guard:
        """``async with breaker.guard(classify) as permit:`` acquires on entry (may raise
        ``BreakerOpen``). On exit, unless the body recorded an outcome itself: normal exit is
        a success; a non-``Exception`` (``CancelledError``) releases; an ``Exception`` is
        passed to ``classify``, which returns ``Failure(retry_after_s)`` or None (release)."""
        return _Guard(self, classify)

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly state for a readiness detail endpoint (times on the breaker clock)."""
        now = self._clock()
        self._advance(now)
        w = self._window
        w.evict(now)
        is_open = self._state is State.OPEN
        return {
            "state": self._state.name,
            "enabled": self._cfg.enabled,
            "failure_rate": w.failures / w.calls if w.calls else None,
            "slow_call_rate": w.slow / w.calls if w.calls else None,
            "calls_in_window": w.calls,
            "min_calls": self._cfg.min_calls,
            "open_until": self._open_until if is_open else None,
            "retry_after_s": self._open_until - now if is_open else 0.0,
            "consecutive_trips": self._trips,
            "half_open_probes_in_flight": self._probes_in_flight,
            "half_open_probes_done": self._probes_done,
            "generation": self._generation,
        }

    # -- internals -------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Apply the time-based transitions due at ``now`` (at most one per query)."""
        if self._state is State.OPEN and now >= self._open_until:
            # Half-open starts when observed, so a long-idle breaker gets its full
            # max_half_open_s rather than timing out on its first probe.
            self._half_open_since = now
            self._transition(State.HALF_OPEN)
        elif (
            self._state is State.HALF_OPEN
            and now - self._half_open_since >= self._cfg.max_half_open_s
        ):
            self._trip(now, None)

    def _record(
        self, generation: int, started: float, failed: bool | None, retry_after_s: float | None
    ) -> None:
        now = self._clock()
        self._advance(now)  # a probe that outlived max_half_open_s thus becomes stale
        if failed and retry_after_s is not None and math.isfinite(retry_after_s) and retry_after_s > 0:
            hint = min(retry_after_s, self._cfg.max_open_s)
            if self._state is State.OPEN:
                self._open_until = max(self._open_until, now + hint)
            else:
                self._trip(now, hint)
            return
        if generation != self._generation:
            return  # admitted in an earlier state: must not move this one
        if self._state is State.HALF_OPEN:
            self._probes_in_flight -= 1
        if failed is None:
            return  # released: frees a probe permit, counts nowhere
        slow = now - started > self._cfg.slow_call_s
        cfg = self._cfg
        if self._state is State.CLOSED:
            w = self._window
            w.add(now, failed, slow)
            if w.calls >= cfg.min_calls and (
                w.failures / w.calls >= cfg.failure_rate_threshold
                or w.slow / w.calls >= cfg.slow_call_rate_threshold
            ):
                self._trip(now, None)
        elif self._state is State.HALF_OPEN:
            self._probes_done += 1
            self._probe_failures += failed
            self._probe_slow += slow
            n = cfg.half_open_permits
            # Decide early once the threshold is reached: the final rate can only be higher.
            if (
                self._probe_failures / n >= cfg.failure_rate_threshold
                or self._probe_slow / n >= cfg.slow_call_rate_threshold
            ):
                self._trip(now, None)
            elif self._probes_done >= n:
                self._window.clear()
                self._trips = 0
                self._base_open_s = cfg.open_s
                self._transition(State.CLOSED)

    def _trip(self, now: float, at_least_s: float | None) -> None:
        cfg = self._cfg
        self._trips += 1
        # Multiply iteratively rather than open_s * backoff**n, which overflows for large n.
        if self._trips == 1:
            self._base_open_s = cfg.open_s
        else:
            self._base_open_s = min(self._base_open_s * cfg.open_backoff, cfg.max_open_s)
        # Jitter after the cap, so replicas that all hit the cap still de-synchronise.
        r = min(max(self._rand(), 0.0), 1.0)
        period = self._base_open_s * (1.0 + cfg.jitter_ratio * r)
        if at_least_s is not None:
            period = max(period, at_least_s)
        self._open_until = now + period
        self._transition(State.OPEN)

    def _transition(self, new: State) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._probes_in_flight = self._probes_done = self._probe_failures = self._probe_slow = 0
        if self._on_transition is not None:
            try:
                self._on_transition(old, new)
            except Exception:  # a metrics/logging failure must never fail a request
                _log.warning("circuit breaker on_transition callback failed", exc_info=True)
