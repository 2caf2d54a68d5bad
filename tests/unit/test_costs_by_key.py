"""The cost book's per-API-key totals (``/costs`` ``by_key``)."""

from __future__ import annotations

import math

from serve_app.costs import CostBook

from .conftest import FakeClock

DAY0 = 1_795_305_600.0  # 2026-11-22T00:00:00Z
USAGE = {"input_tokens": 100, "output_tokens": 20, "cost_usd": 0.001,
         "by_module": {"predict": {"input_tokens": 100, "output_tokens": 20, "cost_usd": 0.001}}}


async def test_by_key_totals() -> None:
    book = CostBook("svc", None, wall=FakeClock(DAY0 + 10))
    await book.record("qa", "a", USAGE, "alice")
    await book.record("qa", "b", USAGE, "alice")
    await book.record("classify", "default", USAGE, "bob")
    await book.record("qa", "a", USAGE)  # anonymous: no key entry
    report = await book.report()
    alice = report["by_key"]["total"]["alice"]
    assert (alice["requests"], alice["input_tokens"], alice["output_tokens"]) == (2, 200, 40)
    assert math.isclose(alice["cost_usd"], 0.002)
    assert report["by_key"]["today"]["bob"]["requests"] == 1
    assert set(report["by_key"]["total"]) == {"alice", "bob"}


async def test_key_entries_do_not_leak_into_the_model_view() -> None:
    book = CostBook("svc", None, wall=FakeClock(DAY0))
    await book.record("qa", "a", USAGE, "alice")
    report = await book.report()
    assert set(report["total"]) == {"qa"}
    assert report["total"]["qa"]["a"]["requests"] == 1


async def test_by_key_today_resets_on_a_new_day() -> None:
    clock = FakeClock(DAY0 + 86_000)
    book = CostBook("svc", None, wall=clock)
    await book.record("qa", "a", USAGE, "alice")
    clock.advance(1_000)
    report = await book.report()
    assert report["by_key"]["today"] == {}
    assert report["by_key"]["total"]["alice"]["requests"] == 1
