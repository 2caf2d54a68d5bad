"""The router core under a traffic policy: variants, variant shifts, budgets around the cache, key rights."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from serve_app.config import AppArgs
from serve_app.errors import BudgetExceeded, CircuitOpen, Forbidden, InvalidRequest, UnknownModel, UpstreamError
from serve_app.keys import KeyRing, hash_key
from serve_app.metrics import Counters
from serve_app.policy import TrafficPolicy
from serve_app.policy_store import PolicyStore
from serve_app.predictor import PredictionPayload
from serve_app.router import PredictOutcome, RouterCore
from serve_app.schemas import PredictRequest

from .conftest import FakeCache, FakeClock, FakePredictor, app_args

T0 = 6_000.0
Q = {"question": "What is Ray Serve?"}
USER_KEY = "sk-user-0123456789abcdef"


class CostlyPredictor(FakePredictor):
    """A predictor whose calls cost ``cost`` dollars."""

    def __init__(self, name: str = "qa", *, cost: float = 0.5, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.cost = cost

    async def predict(self, inputs: Any) -> PredictionPayload:
        payload = await super().predict(inputs)
        payload["usage"]["cost_usd"] = self.cost
        return payload


class LedgerCache(FakeCache):
    """A FakeCache that is also the cost book."""

    def __init__(self) -> None:
        super().__init__()
        self.usage: list[tuple[str, str, dict[str, Any], str | None]] = []

    async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
        self.usage += [(r["model"], r["variant"], r["usage"], r["key_id"]) for r in records]

    async def cost_report(self) -> dict[str, Any]:
        return {"scope": "replica", "by_key": {}}


def qa_model(**over: Any) -> dict[str, Any]:
    raw = {"name": "qa", "program": "serve_app.examples:build_qa", "timeout_s": 2.0,
           "lm": {"model": "openai/sim-qa", "timeout_s": 1.0}}
    raw.update(over)
    return raw


CLASSIFY = {"name": "classify", "program": "serve_app.examples:build_classifier", "timeout_s": 2.0,
            "lm": {"model": "openai/sim-classify", "timeout_s": 1.0}}


def variant_args(weights: tuple[float, float] = (1.0, 0.0), **over: Any) -> AppArgs:
    return app_args(models=[
        qa_model(variants=[{"name": "a", "weight": weights[0]}, {"name": "b", "weight": weights[1]}], pin_variants=True),
        CLASSIFY,
    ], **over)


def build(args: AppArgs, predictors: dict[str, FakePredictor], cache: FakeCache | None = None,
          store: Any = None, rand: Any = lambda: 0.0) -> RouterCore:
    counters = Counters()
    policy = TrafficPolicy(args, store or PolicyStore(None, "serve_app"), KeyRing.load(args.policy.auth, env={}),
                           wall=FakeClock(T0), counters=counters, rand=rand)
    return RouterCore(args, predictors, cache if cache is not None else FakeCache(), clock=FakeClock(),
                      counters=counters, policy=policy)


def variant_predictors() -> dict[str, FakePredictor]:
    return {"qa.a": FakePredictor("qa"), "qa.b": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))}


async def ask(core: RouterCore, inputs: dict[str, Any] | None = None, *, model: str = "qa",
              variant: str | None = None, headers: dict[str, str] | None = None, cache: bool = True) -> PredictOutcome:
    admission = await core.policy.admit(headers or {}, "10.0.0.1")
    request = PredictRequest(model=model, inputs=Q if inputs is None else inputs, variant=variant, cache=cache)
    return await core.predict(request, "rid", admission)


# ----------------------------------------------------------------------------- variants


async def test_weighted_variant_routes_to_its_deployment() -> None:
    predictors = variant_predictors()
    cache = FakeCache()
    core = build(variant_args(), predictors, cache, rand=lambda: 0.99)  # b weighs 0: a wherever the point is
    out = await ask(core)
    await core.drain()
    assert out.body["variant"] == "a" and out.headers["X-Model-Variant"] == "a"
    assert out.body["served_by"] == "qa" and out.body["degraded"] is False
    assert len(predictors["qa.a"].predict_calls) == 1 and predictors["qa.b"].predict_calls == []
    ((key, _, _),) = cache.set_calls
    assert key.startswith("serve_app:p:qa:a:v1:")


async def test_pinned_variant_routes_to_its_deployment_and_cache_entry() -> None:
    predictors = variant_predictors()
    cache = FakeCache()
    core = build(variant_args(), predictors, cache)
    await ask(core)
    await core.drain()
    out = await ask(core, variant="b")
    await core.drain()
    assert out.body["variant"] == "b" and out.headers["X-Model-Variant"] == "b"
    assert out.headers["X-Cache"] == "MISS", "another variant's answer is never served from the cache"
    assert len(predictors["qa.b"].predict_calls) == 1
    assert [k.split(":")[3] for k, _, _ in cache.set_calls] == ["a", "b"]
    assert (await ask(core, variant="b")).headers["X-Cache"] == "HIT-MEMORY"


async def test_pin_on_a_model_without_pinning_is_403() -> None:
    core = build(variant_args(), variant_predictors())
    with pytest.raises(Forbidden):
        await ask(core, {"text": "hi"}, model="classify", variant="default")


async def test_pin_unknown_variant_is_422() -> None:
    predictors = variant_predictors()
    core = build(variant_args(), predictors)
    with pytest.raises(InvalidRequest) as info:
        await ask(core, variant="zzz")
    assert (info.value.status, info.value.field) == (422, "variant")
    assert predictors["qa.a"].predict_calls == predictors["qa.b"].predict_calls == []


async def test_model_with_a_missing_variant_deployment_is_unknown() -> None:
    predictors = variant_predictors()
    del predictors["qa.b"]
    core = build(variant_args(), predictors)
    with pytest.raises(UnknownModel):
        await ask(core)


async def test_open_breaker_shifts_to_the_other_variant() -> None:
    predictors = variant_predictors()
    predictors["qa.a"].fail(CircuitOpen("breaker open", retry_after_s=5.0))
    core = build(variant_args((1.0, 1.0)), predictors, rand=lambda: 0.0)  # point 0: a first
    out = await ask(core)
    assert out.body["variant"] == "b" and out.headers["X-Model-Variant"] == "b"
    assert out.body["degraded"] is False
    assert core.counters.get("variant_shifts", model="qa", variant="a", code="circuit_open") == 1
    await ask(core, {"question": "another"})
    assert len(predictors["qa.a"].predict_calls) == 1, "a's clients go to b while a's breaker is open"
    assert len(predictors["qa.b"].predict_calls) == 2


async def test_slow_failures_do_not_shift_variants() -> None:
    predictors = variant_predictors()
    predictors["qa.a"].fail(UpstreamError("provider failed"))
    core = build(variant_args((1.0, 1.0)), predictors, rand=lambda: 0.0)
    with pytest.raises(UpstreamError):
        await ask(core)
    assert predictors["qa.b"].predict_calls == []


async def test_pinned_variant_does_not_shift() -> None:
    predictors = variant_predictors()
    predictors["qa.b"].fail(CircuitOpen("breaker open", retry_after_s=5.0))
    core = build(variant_args((1.0, 1.0)), predictors)
    with pytest.raises(CircuitOpen):
        await ask(core, variant="b")
    assert predictors["qa.a"].predict_calls == []


# ----------------------------------------------------------------------------- budgets


def budget_args(**over: Any) -> AppArgs:
    return app_args(models=[qa_model(budget={"hard_usd": 1.0, "reserve_usd": 0.5}), CLASSIFY], **over)


def costly_predictors(cost: float = 0.5) -> dict[str, FakePredictor]:
    return {"qa": CostlyPredictor("qa", cost=cost), "classify": CostlyPredictor("classify", cost=cost, inputs=("text",))}


async def test_budget_exhausted_is_429_while_another_model_answers() -> None:
    predictors = costly_predictors()
    core = build(budget_args(), predictors)
    await ask(core, {"question": "one"})
    await ask(core, {"question": "two"})
    await core.drain()
    with pytest.raises(BudgetExceeded) as info:
        await ask(core, {"question": "three"})
    assert info.value.status == 429 and info.value.retry_after_s and info.value.retry_after_s > 0
    assert len(predictors["qa"].predict_calls) == 2, "no LM call once the budget is gone"
    assert (await ask(core, {"text": "fine"}, model="classify")).body["model"] == "classify"


async def test_cache_hit_after_the_budget_is_exhausted_still_answers_for_free() -> None:
    predictors = costly_predictors()
    core = build(budget_args(), predictors)
    await ask(core, {"question": "one"})
    await ask(core, {"question": "two"})
    await core.drain()
    hit = await ask(core, {"question": "one"})
    assert hit.headers["X-Cache"].startswith("HIT") and hit.body["usage"]["cost_usd"] == 0.0
    assert len(predictors["qa"].predict_calls) == 2


async def test_cache_bypass_also_reserves() -> None:
    core = build(budget_args(), costly_predictors())
    await ask(core, cache=False)
    await ask(core, cache=False)
    await core.drain()
    with pytest.raises(BudgetExceeded):
        await ask(core, cache=False)


async def test_failed_call_gives_its_reservation_back() -> None:
    predictors = costly_predictors()
    core = build(budget_args(), predictors)
    predictors["qa"].fail(UpstreamError("provider failed"))
    for i in range(3):
        with pytest.raises(UpstreamError):
            await ask(core, {"question": f"fail {i}"})
    await core.drain()
    predictors["qa"].fail(None)
    await ask(core, {"question": "one"})
    await ask(core, {"question": "two"})


async def test_real_cost_replaces_the_reservation() -> None:
    predictors = costly_predictors(cost=0.125)
    core = build(budget_args(), predictors)
    for i in range(5):  # each reserves 0.5 while in flight and then books 0.125
        await ask(core, {"question": f"q{i}"})
        await core.drain()
    with pytest.raises(BudgetExceeded):  # 5 x 0.125 spent + 0.5 reserved > 1.0
        await ask(core, {"question": "q5"})


async def test_identical_concurrent_misses_reserve_once() -> None:
    predictors = costly_predictors()
    gate = predictors["qa"].block()
    core = build(budget_args(), predictors)
    tasks = [asyncio.ensure_future(ask(core)) for _ in range(10)]
    await predictors["qa"].entered.wait()
    gate.set()
    outs = await asyncio.gather(*tasks)
    assert len(predictors["qa"].predict_calls) == 1
    assert sum(o.headers.get("X-Coalesced") == "true" for o in outs) == 9
    await core.drain()
    await ask(core, {"question": "still room for one more"})


class YieldingDownStore:
    """A shared store that is down: every call yields to other tasks, then answers None."""

    prefix, shared = "serve_app", True

    def live_replicas(self) -> int:
        return 1

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        return (await self.attempt(name, keys, args))[0]

    async def attempt(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[None, bool]:
        await asyncio.sleep(0)
        return None, True  # sent, then failed: as PolicyStore reports a refused connection


async def test_follower_that_reserved_gives_it_back_when_the_flight_succeeds() -> None:
    predictors = costly_predictors(cost=0.5)
    gate = predictors["qa"].block()
    core = build(budget_args(), predictors, store=YieldingDownStore())
    tasks = [asyncio.ensure_future(ask(core)) for _ in range(2)]  # both reserve before either flies
    await predictors["qa"].entered.wait()
    gate.set()
    await asyncio.gather(*tasks)
    await core.drain()
    await ask(core, {"question": "second"})  # 0.5 spent: room for exactly one more


async def test_follower_that_reserved_gives_it_back_when_the_flight_fails() -> None:
    predictors = costly_predictors(cost=0.5)
    gate = predictors["qa"].block()
    core = build(budget_args(), predictors, store=YieldingDownStore())
    tasks = [asyncio.ensure_future(ask(core)) for _ in range(2)]
    await predictors["qa"].entered.wait()
    predictors["qa"].fail(UpstreamError("provider failed"))
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) for r in results)
    await core.drain()
    predictors["qa"].fail(None)
    predictors["qa"].gate = None
    await ask(core, {"question": "one"})
    await ask(core, {"question": "two"})  # nothing was spent: the whole $1 is left


# ----------------------------------------------------------------------------- keys


def keyed_args() -> AppArgs:
    return app_args(policy={"auth": {"enabled": True, "keys": [
        {"id": "user", "sha256": hash_key(USER_KEY), "models": ["qa"]}]}})


async def test_key_may_not_call_another_model() -> None:
    predictors = {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))}
    core = build(keyed_args(), predictors)
    with pytest.raises(Forbidden, match="classify"):
        await ask(core, {"text": "x"}, model="classify", headers={"x-api-key": USER_KEY})
    assert predictors["classify"].predict_calls == [] and predictors["classify"].info_calls == 0


async def test_fallback_the_key_may_not_call_is_not_used() -> None:
    args = app_args(
        models=[qa_model(fallback="backup"), qa_model(name="backup")],
        policy={"auth": {"enabled": True, "keys": [{"id": "user", "sha256": hash_key(USER_KEY), "models": ["qa"]}]}},
    )
    predictors = {"qa": FakePredictor("qa"), "backup": FakePredictor("backup")}
    predictors["qa"].fail(CircuitOpen("open", retry_after_s=1.0))
    core = build(args, predictors)
    with pytest.raises(CircuitOpen):
        await ask(core, headers={"x-api-key": USER_KEY})
    assert predictors["backup"].predict_calls == []


async def test_costs_are_booked_under_the_key_id() -> None:
    ledger = LedgerCache()
    core = build(keyed_args(), {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))},
                 ledger)
    await ask(core, headers={"x-api-key": USER_KEY})
    await core.drain()
    assert [(m, v, k) for m, v, _, k in ledger.usage] == [("qa", "default", "user")]


async def test_anonymous_costs_have_no_key_id() -> None:
    ledger = LedgerCache()
    core = build(app_args(), {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))},
                 ledger)
    await ask(core)
    await ask(core)  # a hit books nothing
    await core.drain()
    assert [(m, v, k) for m, v, _, k in ledger.usage] == [("qa", "default", None)]


async def test_rate_limit_headers_ride_on_the_outcome() -> None:
    core = build(app_args(policy={"rate_limit": {"requests_per_minute": 10}}),
                 {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))})
    out = await ask(core)
    assert (out.headers["X-RateLimit-Limit"], out.headers["X-RateLimit-Remaining"]) == ("10", "9")


async def test_open_door_admission_is_the_default() -> None:
    core = build(app_args(), {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))})
    out = await core.predict(PredictRequest(model="qa", inputs=Q), "rid")
    assert "X-RateLimit-Limit" not in out.headers and out.body["variant"] == "default"
