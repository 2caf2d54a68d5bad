"""HopBatcher: calls in one event-loop turn (or one window) share a hop; failures and
cancellations stay where they belong."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable

import pytest

from serve_app.hop_batch import HopBatcher


class Remote:
    """A batched callee: records each batch, can be gated, can fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.short = False  # answer one result too few

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        out = [item.upper() for item in items]
        return out[:-1] if self.short else out


async def test_calls_in_one_turn_share_one_hop_and_get_their_own_results() -> None:
    remote = Remote()
    sizes: list[int] = []
    batcher: HopBatcher[str, str] = HopBatcher(remote, on_batch=sizes.append)
    results = await asyncio.gather(*(batcher.call(k) for k in ("a", "b", "c")))
    assert results == ["A", "B", "C"]
    assert remote.batches == [["a", "b", "c"]] and sizes == [3]


async def test_a_lone_call_is_sent_at_once() -> None:
    remote = Remote()
    batcher: HopBatcher[str, str] = HopBatcher(remote)
    assert await batcher.call("x") == "X"
    assert await batcher.call("y") == "Y"
    assert remote.batches == [["x"], ["y"]]


async def test_max_batch_splits_a_burst() -> None:
    remote = Remote()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_batch=2)
    results = await asyncio.gather(*(batcher.call(k) for k in "abcde"))
    assert results == list("ABCDE")
    assert remote.batches == [["a", "b"], ["c", "d"], ["e"]]


async def test_a_window_gathers_calls_spread_over_time() -> None:
    remote = Remote()
    batcher: HopBatcher[str, str] = HopBatcher(remote, window_s=0.05)

    async def later(key: str, delay: float) -> str:
        await asyncio.sleep(delay)
        return await batcher.call(key)

    started = time.perf_counter()
    results = await asyncio.gather(later("a", 0), later("b", 0.01), later("c", 0.02))
    assert results == ["A", "B", "C"]
    assert remote.batches == [["a", "b", "c"]]
    assert time.perf_counter() - started >= 0.045  # the window, counted from the first call


async def test_a_failed_batch_fails_each_caller_with_its_error() -> None:
    remote = Remote()
    remote.error = ConnectionError("cache replica gone")
    batcher: HopBatcher[str, str] = HopBatcher(remote)
    results = await asyncio.gather(*(batcher.call(k) for k in "ab"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]


async def test_a_short_answer_is_an_error_not_a_wrong_result() -> None:
    remote = Remote()
    remote.short = True
    batcher: HopBatcher[str, str] = HopBatcher(remote)
    results = await asyncio.gather(*(batcher.call(k) for k in "ab"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_one_caller_giving_up_does_not_cancel_the_others() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote)
    impatient = asyncio.ensure_future(batcher.call("a"))
    patient = asyncio.ensure_future(batcher.call("b"))
    while not remote.batches:  # the batch is on its way
        await asyncio.sleep(0)
    impatient.cancel()
    await asyncio.sleep(0)
    remote.gate.set()
    assert await patient == "B"
    assert impatient.cancelled()


async def test_a_hung_callee_is_bounded_by_timeout(caplog: pytest.LogCaptureFixture) -> None:
    remote = Remote()
    remote.gate = asyncio.Event()  # never set
    batcher: HopBatcher[str, str] = HopBatcher(remote, timeout_s=0.05)
    with pytest.raises(TimeoutError):
        await batcher.call("a")
    await batcher.flush()  # nothing left in flight
    assert "never retrieved" not in caplog.text


async def test_a_cancelled_batch_is_a_failed_hop_for_its_callers() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote)
    caller = asyncio.ensure_future(batcher.call("a"))
    while not remote.batches:
        await asyncio.sleep(0)
    for task in list(batcher._inflight):  # e.g. Ray cancelling the hop
        task.cancel()
    with pytest.raises(ConnectionError):
        await caller


async def test_flush_sends_a_window_early_and_waits_for_it() -> None:
    remote = Remote()
    batcher: HopBatcher[str, str] = HopBatcher(remote, window_s=10.0)
    caller = asyncio.ensure_future(batcher.call("a"))
    await asyncio.sleep(0)
    assert len(batcher) == 1 and remote.batches == []
    await asyncio.wait_for(batcher.flush(), 1.0)
    assert remote.batches == [["a"]] and await caller == "A"


async def test_the_batch_runs_in_the_context_the_factory_makes() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    async def remote(items: list[str]) -> list[str]:
        seen.append(var.get())
        return items

    def detached() -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(var.set, "detached")
        return ctx

    var.set("caller")
    batcher: HopBatcher[str, str] = HopBatcher(remote, context=detached)
    assert await batcher.call("a") == "a"
    assert seen == ["detached"]


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HopBatcher(Remote(), max_batch=0)


# ----------------------------------------------------------------------------- max_inflight


async def _until(cond: Callable[[], bool], turns: int = 100) -> None:
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _eventually(cond: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """``_until`` for conditions a timer makes true (a window's end), bounded in time."""
    deadline = time.perf_counter() + timeout_s
    while not cond():
        if time.perf_counter() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def test_with_max_inflight_calls_arriving_while_a_batch_is_out_leave_together_after_it() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_inflight=1)
    first = asyncio.ensure_future(batcher.call("a"))
    await _until(lambda: remote.batches == [["a"]])
    later = [asyncio.ensure_future(batcher.call(k)) for k in "bcd"]
    for _ in range(5):  # several loop turns: without the bound each turn would be its own hop
        await asyncio.sleep(0)
        later.append(asyncio.ensure_future(batcher.call(f"e{_}")))
    await asyncio.sleep(0)
    assert remote.batches == [["a"]] and len(batcher) == 8
    remote.gate.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "D", *(f"E{i}" for i in range(5))]
    assert remote.batches == [["a"], ["b", "c", "d", *(f"e{i}" for i in range(5))]]


async def test_without_max_inflight_each_turn_is_its_own_hop() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote)  # 0: no bound (the old behaviour)
    calls = [asyncio.ensure_future(batcher.call("a"))]
    await _until(lambda: len(remote.batches) == 1)
    calls.append(asyncio.ensure_future(batcher.call("b")))
    await _until(lambda: len(remote.batches) == 2)
    remote.gate.set()
    assert await asyncio.gather(*calls) == ["A", "B"]


async def test_max_inflight_never_holds_a_lone_call_on_an_idle_batcher() -> None:
    remote = Remote()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_inflight=1)
    for key in "xyz":
        assert await asyncio.wait_for(batcher.call(key), 1.0) == key.upper()
    assert remote.batches == [["x"], ["y"], ["z"]]


async def test_max_inflight_two_lets_two_batches_out() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_inflight=2)
    calls = [asyncio.ensure_future(batcher.call("a"))]
    await _until(lambda: len(remote.batches) == 1)
    calls.append(asyncio.ensure_future(batcher.call("b")))
    await _until(lambda: len(remote.batches) == 2)
    calls += [asyncio.ensure_future(batcher.call(k)) for k in "cd"]
    await asyncio.sleep(0.01)
    assert len(remote.batches) == 2  # c, d wait
    remote.gate.set()
    assert await asyncio.gather(*calls) == list("ABCD")
    assert remote.batches[2] == ["c", "d"]


async def test_a_full_batch_leaves_even_while_held() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_inflight=1, max_batch=2)
    calls = [asyncio.ensure_future(batcher.call("a"))]
    await _until(lambda: len(remote.batches) == 1)
    calls += [asyncio.ensure_future(batcher.call(k)) for k in "bc"]
    await _until(lambda: len(remote.batches) == 2)
    assert remote.batches[1] == ["b", "c"]
    remote.gate.set()
    assert await asyncio.gather(*calls) == list("ABC")


async def test_a_held_caller_waits_at_most_timeout_from_its_call_and_the_rest_still_land(
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, max_inflight=1, timeout_s=0.2)
    first = asyncio.ensure_future(batcher.call("a"))
    await _until(lambda: len(remote.batches) == 1)
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        await batcher.call("b")  # queued behind a hung batch: bounded from ITS call
    waited = time.perf_counter() - started
    assert 0.15 <= waited < 0.5
    with pytest.raises(TimeoutError):
        await first
    remote.gate.set()
    await asyncio.wait_for(batcher.flush(), 1.0)
    assert remote.batches[-1] == ["b"]  # sent once the hung batch gave up, answer unread
    assert "never retrieved" not in caplog.text


async def test_a_held_item_keeps_its_window_from_its_arrival() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, window_s=0.1, max_inflight=1)
    first = asyncio.ensure_future(batcher.call("a"))
    await _eventually(lambda: remote.batches == [["a"]])  # the window ended: "a" is out
    second = asyncio.ensure_future(batcher.call("b"))
    await asyncio.sleep(0)
    remote.gate.set()  # "a" answers at once; "b" still has most of its window to gather others
    assert await first == "A"
    third = asyncio.ensure_future(batcher.call("c"))
    await asyncio.sleep(0.02)
    assert remote.batches == [["a"]]
    assert await asyncio.wait_for(asyncio.gather(second, third), 1.0) == ["B", "C"]
    assert remote.batches == [["a"], ["b", "c"]]


async def test_a_held_write_window_leaves_when_the_batch_out_answers() -> None:
    remote = Remote()
    remote.gate = asyncio.Event()
    batcher: HopBatcher[str, str] = HopBatcher(remote, window_s=0.01, max_inflight=1)
    first = asyncio.ensure_future(batcher.call("a"))
    await _eventually(lambda: remote.batches == [["a"]])  # the window ended: "a" is out
    second = asyncio.ensure_future(batcher.call("b"))
    await asyncio.sleep(0.03)  # past the window: still held
    assert remote.batches == [["a"]]
    remote.gate.set()
    assert await first == "A" and await second == "B"
    assert remote.batches == [["a"], ["b"]]


def test_max_inflight_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        HopBatcher(Remote(), max_inflight=-1)
