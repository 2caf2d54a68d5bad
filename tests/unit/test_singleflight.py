"""Request coalescing: one call per key in flight, shared outcomes, cancellation-safe (C4)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from serve_app.singleflight import SingleFlight


class Work:
    """A coalescable call that waits on a gate and counts how often it really ran."""

    def __init__(self, result: str = "answer") -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.result = result
        self.error: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"{self.result}#{self.calls}"


async def test_fifty_concurrent_identical_keys_make_one_call() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    tasks = [asyncio.ensure_future(flight.do("k", work)) for _ in range(50)]
    await work.started.wait()
    assert len(flight) == 1
    work.gate.set()
    results = await asyncio.gather(*tasks)
    assert work.calls == 1
    assert {r for r, _ in results} == {"answer#1"}
    assert sum(1 for _, shared in results if not shared) == 1, "exactly one leader"
    assert len(flight) == 0


async def test_errors_are_shared_and_not_remembered() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    work.error = ValueError("provider failed")
    tasks = [asyncio.ensure_future(flight.do("k", work)) for _ in range(10)]
    await work.started.wait()
    work.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert work.calls == 1
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 1, "every waiter gets the same exception"
    assert len(flight) == 0

    work.error = None
    result, shared = await flight.do("k", work)
    assert (result, shared) == ("answer#2", False), "a later call runs fn again"


async def test_results_are_not_remembered_either() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    work.gate.set()
    assert await flight.do("k", work) == ("answer#1", False)
    assert await flight.do("k", work) == ("answer#2", False)


async def test_cancelled_leader_does_not_cancel_the_followers() -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    leader = asyncio.ensure_future(flight.do("k", work))
    await work.started.wait()
    followers = [asyncio.ensure_future(flight.do("k", work)) for _ in range(5)]
    await asyncio.sleep(0)  # followers are now waiting on the shared task
    leader.cancel()  # the first client disconnected
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert len(flight) == 1, "the shared call is still running"
    work.gate.set()
    results = await asyncio.gather(*followers)
    assert results == [("answer#1", True)] * 5
    assert work.calls == 1


async def test_all_waiters_leaving_lets_the_call_finish_quietly(caplog: pytest.LogCaptureFixture) -> None:
    flight: SingleFlight[str] = SingleFlight()
    work = Work()
    work.error = RuntimeError("nobody listens")
    waiter = asyncio.ensure_future(flight.do("k", work))
    await work.started.wait()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    work.gate.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(flight) == 0  # finished and forgotten
    gc.collect()  # an unretrieved task exception is logged when the task is collected
    assert "never retrieved" not in caplog.text


async def test_different_keys_run_separately() -> None:
    flight: SingleFlight[str] = SingleFlight()
    a, b = Work("a"), Work("b")
    ta = asyncio.ensure_future(flight.do("ka", a))
    tb = asyncio.ensure_future(flight.do("kb", b))
    await a.started.wait()
    await b.started.wait()
    assert len(flight) == 2
    b.gate.set()
    assert await tb == ("b#1", False)
    assert not ta.done(), "one key's result must not complete another's waiters"
    a.gate.set()
    assert await ta == ("a#1", False)
    assert (a.calls, b.calls) == (1, 1)


async def test_flight_runs_in_the_context_the_factory_makes() -> None:
    import contextvars

    marker: contextvars.ContextVar[str | None] = contextvars.ContextVar("marker", default=None)
    marker.set("leader-request")

    def unlinked() -> contextvars.Context:
        ctx = contextvars.copy_context()
        ctx.run(marker.set, None)
        return ctx

    seen: list[str | None] = []

    async def fn() -> int:
        seen.append(marker.get())
        return 1

    assert await SingleFlight[int](unlinked).do("k", fn) == (1, False)
    assert await SingleFlight[int]().do("k", fn) == (1, False)
    assert seen == [None, "leader-request"]


def test_detached_context_clears_rays_task_link_and_keeps_the_rest() -> None:
    import contextvars

    import ray

    from serve_app.deployments import detached_context

    other: contextvars.ContextVar[str] = contextvars.ContextVar("other", default="")

    def inside() -> tuple[object, object, str]:
        ray._raylet.async_task_id.set(b"parent-task")
        other.set("request-context")
        ctx = detached_context()
        return ray._raylet.async_task_id.get(), ctx.run(ray._raylet.async_task_id.get), ctx.run(other.get)

    current, detached, kept = contextvars.copy_context().run(inside)
    assert current == b"parent-task"
    assert detached is None
    assert kept == "request-context"
