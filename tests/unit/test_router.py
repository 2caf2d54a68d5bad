"""Router core: admission, cache-through, coalescing, deadlines, readiness (C4-C6)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.config import AppArgs
from serve_app.errors import (
    InvalidRequest,
    Overloaded,
    ProgramOutputError,
    ServeAppError,
    UnknownModel,
    UpstreamError,
    UpstreamTimeout,
)
from serve_app.metrics import Counters
from serve_app.router import DEFAULT_VARIANT, PredictOutcome, RouterCore
from serve_app.schemas import PredictRequest, PredictResponse

from .conftest import FakeCache, FakeClock, FakePredictor, app_args, fake_outputs

Q = {"question": "What is Ray Serve?"}


def core_with(
    predictors: dict[str, FakePredictor],
    cache: FakeCache | None,
    args: AppArgs | None = None,
    clock: FakeClock | None = None,
    **kwargs: Any,
) -> RouterCore:
    return RouterCore(args or app_args(), predictors, cache, clock=clock or FakeClock(), counters=Counters(), **kwargs)


@pytest.fixture
def core(fake_predictor: FakePredictor, fake_cache: FakeCache) -> RouterCore:
    return core_with({"qa": fake_predictor, "classify": FakePredictor("classify", inputs=("text",))}, fake_cache)


async def ask(
    core: RouterCore, inputs: dict[str, Any] | None = None, *, model: str = "qa", cache: bool = True, rid: str = "rid"
) -> PredictOutcome:
    return await core.predict(PredictRequest(model=model, inputs=Q if inputs is None else inputs, cache=cache), rid)


def without_volatile(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("request_id", "latency_ms")}


# ----------------------------------------------------------------------------- admission


async def test_unknown_model(core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    with pytest.raises(UnknownModel, match="unknown model 'nope'") as info:
        await ask(core, model="nope")
    assert info.value.status == 404
    assert fake_predictor.predict_calls == [] and fake_cache.get_calls == []


async def test_configured_model_without_a_predictor_is_unknown(fake_predictor: FakePredictor) -> None:
    core = core_with({"qa": fake_predictor}, FakeCache())
    with pytest.raises(UnknownModel):
        await ask(core, {"text": "hi"}, model="classify")


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({}, "inputs.question"),
        ({"question": "q", "extra": 1}, "inputs.extra"),
        ({"questoin": "typo"}, "inputs.question"),
    ],
)
async def test_bad_inputs_are_422_naming_the_field_before_any_call(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache, inputs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await ask(core, inputs)
    assert info.value.status == 422
    assert info.value.field == field
    assert fake_predictor.predict_calls == []
    assert fake_cache.get_calls == [] and fake_cache.set_calls == []


# ----------------------------------------------------------------------------- cache-through


async def test_miss_then_memory_hit(core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    first = await ask(core, rid="r1")
    await core.drain()
    second = await ask(core, rid="r2")

    assert first.headers["X-Cache"] == "MISS"
    assert second.headers["X-Cache"] == "HIT-MEMORY"
    assert len(fake_predictor.predict_calls) == 1
    assert first.body["cached"] is False and second.body["cached"] is True
    assert first.body["usage"] == {"input_tokens": 11, "output_tokens": 7}
    assert second.body["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "by_module": {}}, (
        "a hit spends no tokens")
    assert second.headers["X-Cost-USD"] == "0"
    assert first.body["outputs"] == second.body["outputs"] == fake_outputs(Q)
    assert (first.body["request_id"], second.body["request_id"]) == ("r1", "r2")
    assert first.body["program_version"] == second.body["program_version"] == "v1"
    for body in (first.body, second.body):
        PredictResponse.model_validate(body)
    assert core.counters.get("predictions", model="qa", variant="default", outcome="ok", cache="MISS") == 1
    assert core.counters.get("predictions", model="qa", variant="default", outcome="ok", cache="HIT-MEMORY") == 1


NO_NEAR = {"timeout_s": 0.05, "near_max_entries": 0}  # every lookup goes to the Cache deployment


async def test_redis_tier_hit_is_labelled(fake_predictor: FakePredictor) -> None:
    cache = FakeCache(tier="redis")
    core = core_with({"qa": fake_predictor}, cache, args=app_args(cache=NO_NEAR))
    await ask(core)
    await core.drain()
    assert (await ask(core)).headers["X-Cache"] == "HIT-REDIS"


async def test_reordered_inputs_hit_the_same_entry(fake_cache: FakeCache) -> None:
    predictor = FakePredictor("qa", inputs=("question", "context"))
    core = core_with({"qa": predictor}, fake_cache)
    await ask(core, {"question": "q", "context": "c"})
    await core.drain()
    assert (await ask(core, {"context": "c", "question": "q"})).headers["X-Cache"] == "HIT-MEMORY"
    assert len(predictor.predict_calls) == 1


async def test_cache_write_uses_the_model_ttl_and_a_prefixed_key(core: RouterCore, fake_cache: FakeCache) -> None:
    await ask(core)
    await ask(core, {"text": "great"}, model="classify")
    await core.drain()
    (qa_key, qa_value, qa_ttl), (cl_key, _, cl_ttl) = fake_cache.set_calls
    assert qa_key.startswith(f"serve_app:p:qa:{DEFAULT_VARIANT}:v1:")
    assert cl_key.startswith(f"serve_app:p:classify:{DEFAULT_VARIANT}:v1:")
    assert (qa_ttl, cl_ttl) == (None, 60.0)
    assert qa_value["outputs"] == fake_outputs(Q) and qa_value["program_version"] == "v1"


async def test_lm_settings_are_part_of_the_key(fake_cache: FakeCache) -> None:
    keys = []
    for temperature in (0.0, 0.7):
        args = app_args(
            models=[
                {
                    "name": "qa",
                    "program": "serve_app.examples:build_qa",
                    "lm": {"model": "openai/sim-qa", "temperature": temperature, "timeout_s": 1},
                    "timeout_s": 2,
                }
            ]
        )
        core = core_with({"qa": FakePredictor()}, fake_cache, args=args)
        await ask(core)
        await core.drain()
        keys.append(fake_cache.set_calls[-1][0])
    assert keys[0] != keys[1]


async def test_cache_false_bypasses_the_cache(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    for _ in range(2):
        out = await ask(core, cache=False)
        assert out.headers["X-Cache"] == "BYPASS"
        assert out.body["cached"] is False
    await core.drain()
    assert len(fake_predictor.predict_calls) == 2
    assert fake_cache.get_calls == [] and fake_cache.set_calls == []


async def test_disabled_cache_config_bypasses(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, args=app_args(cache={"enabled": False}))
    assert (await ask(core)).headers["X-Cache"] == "BYPASS"
    assert (await ask(core)).headers["X-Cache"] == "BYPASS"
    await core.drain()
    assert len(fake_predictor.predict_calls) == 2
    assert fake_cache.get_calls == [] and fake_cache.set_calls == []
    ok, detail = await core.ready()
    assert ok and detail["cache"] is None


async def test_no_cache_client_at_all(fake_predictor: FakePredictor) -> None:
    core = core_with({"qa": fake_predictor}, None)
    assert (await ask(core)).headers["X-Cache"] == "BYPASS"


async def test_failing_cache_is_a_miss_plus_a_counter(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    fake_cache.fail_with = ConnectionError("cache replica gone")
    out = await ask(core)
    await core.drain()
    assert out.headers["X-Cache"] == "MISS"
    assert out.body["outputs"] == fake_outputs(Q)
    assert core.counters.get("cache_client_errors", op="get") == 1
    assert core.counters.get("cache_client_errors", op="set") == 1
    assert len(fake_predictor.predict_calls) == 1


async def test_hanging_cache_is_bounded_by_its_budget(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, args=app_args(cache={"hop_timeout_s": 0.01}))
    fake_cache.hang = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    out = await ask(core)
    assert loop.time() - started < 0.5
    assert out.headers["X-Cache"] == "MISS"
    assert core.counters.get("cache_client_errors", op="get") == 1
    fake_cache.hang.set()  # let the background write through instead of waiting it out
    await core.drain()
    assert len(fake_cache.set_calls) == 1


async def test_concurrent_lookups_share_one_cache_hop_and_writes_one_more(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    outcomes = await asyncio.gather(*(ask(core, {"question": f"q{i}"}, rid=f"r{i}") for i in range(20)))
    await core.drain()
    assert {o.headers["X-Cache"] for o in outcomes} == {"MISS"}
    assert [o.body["outputs"] for o in outcomes] == [fake_outputs({"question": f"q{i}"}) for i in range(20)]
    # 20 lookups made in one event-loop turn: one get_many; 20 write-backs inside the
    # write window: one set_many. Without batching that was 40 hops.
    assert fake_cache.get_batches == [20] and fake_cache.set_batches == [20]
    assert core.counters.get("cache_hops", op="get") == 1 and core.counters.get("cache_hop_items", op="get") == 20
    again = await asyncio.gather(*(ask(core, {"question": f"q{i}"}) for i in range(20)))
    assert {o.headers["X-Cache"] for o in again} == {"HIT-MEMORY"}


async def test_batch_size_is_capped_by_hop_batch_max(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, args=app_args(cache={"hop_batch_max": 8}))
    await asyncio.gather(*(ask(core, {"question": f"q{i}"}) for i in range(20)))
    await core.drain()
    assert fake_cache.get_batches == [8, 8, 4]
    assert sum(fake_cache.set_batches) == 20 and max(fake_cache.set_batches) <= 8


async def test_a_write_back_waits_at_most_the_write_window(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, args=app_args(cache={"write_batch_s": 0.05}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    out = await ask(core)
    assert out.headers["X-Cache"] == "MISS" and fake_cache.set_calls == []  # answered before the write
    while not fake_cache.set_calls:
        await asyncio.sleep(0.005)
    assert 0.045 <= loop.time() - started < 0.5
    # meanwhile the router itself answers it (near cache), without a hop
    assert (await ask(core)).headers["X-Cache"] == "HIT-MEMORY" and fake_cache.get_batches == [1]


async def test_two_hundred_identical_cold_requests_make_one_call(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    gate = fake_predictor.block()
    tasks = [asyncio.ensure_future(ask(core, rid=f"r{i}")) for i in range(200)]
    await fake_predictor.entered.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    gate.set()
    outcomes = await asyncio.gather(*tasks)
    await core.drain()

    assert len(fake_predictor.predict_calls) == 1
    # One request paid for the LM call; the 199 coalesced followers cost nothing and say so.
    paid = [o for o in outcomes if "X-Coalesced" not in o.headers]
    assert len(paid) == 1 and paid[0].body["usage"]["input_tokens"] == 11
    assert all(o.body["usage"]["input_tokens"] == 0 for o in outcomes if o is not paid[0])
    bodies = [{k: v for k, v in without_volatile(o.body).items() if k != "usage"} for o in outcomes]
    assert all(b == bodies[0] for b in bodies)
    assert {o.body["request_id"] for o in outcomes} == {f"r{i}" for i in range(200)}
    assert {o.headers["X-Cache"] for o in outcomes} == {"MISS"}
    assert len(fake_cache.set_calls) == 1


async def test_leader_leaving_fails_none_of_the_followers(core: RouterCore, fake_predictor: FakePredictor) -> None:
    gate = fake_predictor.block()
    leader = asyncio.ensure_future(ask(core, rid="leader"))
    await fake_predictor.entered.wait()
    followers = [asyncio.ensure_future(ask(core, rid=f"f{i}")) for i in range(10)]
    for _ in range(5):
        await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    gate.set()
    outcomes = await asyncio.gather(*followers)
    assert all(o.body["outputs"] == fake_outputs(Q) for o in outcomes)
    assert len(fake_predictor.predict_calls) == 1


@pytest.mark.parametrize(
    "error",
    [
        UpstreamError("model 'qa' provider failed"),
        UpstreamTimeout("model 'qa' did not answer in time"),
        ProgramOutputError("model 'qa' answered, but its output could not be parsed"),
        Overloaded("busy", retry_after_s=3),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_errors_propagate_and_are_never_cached(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache, error: ServeAppError
) -> None:
    fake_predictor.fail(error)
    gate = fake_predictor.block()
    tasks = [asyncio.ensure_future(ask(core)) for _ in range(3)]
    await fake_predictor.entered.wait()
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(type(o) is type(error) for o in outcomes), outcomes
    assert len(fake_predictor.predict_calls) == 1
    await core.drain()
    assert fake_cache.set_calls == []

    fake_predictor.fail(None)
    out = await ask(core)
    assert out.headers["X-Cache"] == "MISS"
    assert len(fake_predictor.predict_calls) == 2, "the next identical request calls the predictor again"


async def test_new_program_version_refreshes_info_and_keys_the_new_version(
    core: RouterCore, fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    await ask(core, {"question": "warm-up"})
    await core.drain()
    assert (await core.model_info("qa"))["program_version"] == "v1"
    info_calls = fake_predictor.info_calls

    fake_predictor.version = "v2"  # hot swap: reconfigure on the replica
    out = await ask(core)
    await core.drain()
    assert out.body["program_version"] == "v2"
    assert fake_predictor.info_calls == info_calls + 1, "the router learnt the new version at once"
    assert (await core.model_info("qa"))["program_version"] == "v2"
    stored_key = fake_cache.set_calls[-1][0]
    assert ":qa:default:v2:" in stored_key

    again = await ask(core)
    assert again.headers["X-Cache"] == "HIT-MEMORY"
    assert again.body["program_version"] == "v2"
    assert len(fake_predictor.predict_calls) == 2


async def test_router_deadline_is_an_upstream_timeout(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    args = app_args(
        models=[
            {
                "name": "qa",
                "program": "serve_app.examples:build_qa",
                "lm": {"model": "openai/sim-qa", "timeout_s": 0.001},
                "timeout_s": 0.002,
            }
        ],
        limits={"request_timeout_s": 0.01},
    )
    core = core_with({"qa": fake_predictor}, fake_cache, args=args)
    gate = fake_predictor.block()
    with pytest.raises(UpstreamTimeout, match="request deadline") as info:
        await ask(core)
    assert info.value.status == 504
    # The shared call was not cancelled with the waiter: once it finishes, it is stored.
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    await core.drain()
    assert len(fake_cache.set_calls) == 1
    assert (await ask(core)).headers["X-Cache"] == "HIT-MEMORY"


async def test_latency_and_headers(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    clock = FakeClock()
    fake_predictor.on_predict = lambda: clock.advance(0.25)
    core = core_with({"qa": fake_predictor}, fake_cache, clock=clock)
    out = await ask(core)
    assert out.body["latency_ms"] == 250.0
    assert out.headers == {"X-Cache": "MISS", "X-Model-Variant": "default", "X-Response-Time": "250.0ms",
                           "X-Cost-USD": out.headers["X-Cost-USD"],
                           "Server-Timing": "cache;dur=0.0, predictor;dur=250.0, program;dur=12.5, "
                                            "total;dur=250.0"}
    assert out.body["variant"] == "default"


async def test_server_timing_names_the_parts_each_answer_took(
    fake_predictor: FakePredictor, fake_cache: FakeCache
) -> None:
    clock = FakeClock()
    fake_predictor.on_predict = lambda: clock.advance(0.25)
    core = core_with({"qa": fake_predictor}, fake_cache, clock=clock, args=app_args(cache=NO_NEAR))
    miss = await ask(core)
    assert [part.split(";")[0] for part in miss.headers["Server-Timing"].split(", ")] == [
        "cache", "predictor", "program", "total"]
    await core.drain()
    hit = await ask(core)  # from the Cache deployment: no predictor, no program
    assert hit.headers["X-Cache"] == "HIT-MEMORY"
    assert hit.headers["Server-Timing"] == "cache;dur=0.0, total;dur=0.0"
    bypass = await ask(core, {"question": "fresh"}, cache=False)
    assert [part.split(";")[0] for part in bypass.headers["Server-Timing"].split(", ")] == [
        "predictor", "program", "total"]


async def test_foreign_cached_value_is_a_miss(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, args=app_args(cache=NO_NEAR))
    await ask(core)
    await core.drain()
    key = fake_cache.set_calls[0][0]
    fake_cache.data[key] = {"planted": True}  # a valid envelope around a foreign value
    out = await ask(core)
    assert out.headers["X-Cache"] == "MISS"
    assert len(fake_predictor.predict_calls) == 2


# ----------------------------------------------------------------------------- directory, readiness


async def test_models_shape(core: RouterCore) -> None:
    models = await core.models()
    assert [m["name"] for m in models] == ["qa", "classify"]
    assert models[0] == {
        "name": "qa",
        "description": "",
        "program_version": "v1",
        "inputs": [{"name": "question", "type": "str", "description": ""}],
        "outputs": [{"name": "answer", "type": "str", "description": ""}],
        "lm": {"model": "openai/sim-qa"},
        "variants": [{"name": "default", "weight": 1.0, "program_version": "v1", "lm": {"model": "openai/sim-qa"}}],
        "pin_variants": False,
    }
    assert models[1]["inputs"] == [{"name": "text", "type": "str", "description": ""}]


async def test_ready_when_everything_answers(core: RouterCore) -> None:
    ok, detail = await core.ready()
    assert ok is True
    assert detail == {
        "models": {
            "qa": {"ready": True, "program_version": "v1", "breaker": "CLOSED"},
            "classify": {"ready": True, "program_version": "v1", "breaker": "CLOSED"},
        },
        "cache": {"ready": True, "memory_entries": 0},
        "router": {"ops": [], "lookup_index": "syncing"},
    }


async def test_not_ready_when_a_predictor_fails(core: RouterCore, fake_predictor: FakePredictor) -> None:
    fake_predictor.info_fail_with = ConnectionError("replica starting")
    ok, detail = await core.ready()
    assert ok is False
    assert detail["models"]["qa"] == {"ready": False, "error": "ConnectionError"}
    assert detail["models"]["classify"]["ready"] is True


async def test_not_ready_when_a_predictor_hangs(fake_predictor: FakePredictor, fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache, info_timeout_s=0.01)
    fake_predictor.info_gate = asyncio.Event()
    ok, detail = await core.ready()
    assert ok is False
    assert detail["models"]["qa"] == {"ready": False, "error": "TimeoutError"}
    with pytest.raises(Overloaded) as info:
        await ask(core)
    assert info.value.retry_after_s == 1.0
    fake_predictor.info_gate.set()


async def test_not_ready_when_the_cache_fails(core: RouterCore, fake_cache: FakeCache) -> None:
    fake_cache.stats_fail_with = ConnectionError("gone")
    ok, detail = await core.ready()
    assert ok is False
    assert detail["cache"] == {"ready": False, "error": "ConnectionError"}


async def test_refresh_loop_survives_failures(core: RouterCore, fake_predictor: FakePredictor) -> None:
    fake_predictor.info_fail_with = ConnectionError("down")
    ticks: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        ticks.append(seconds)
        if len(ticks) == 2:
            fake_predictor.info_fail_with = None
        if len(ticks) == 3:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await core.refresh_loop(sleep=fake_sleep)
    assert ticks == [1.0, 1.0, 1.0]
    assert core.counters.get("info_refresh_errors", model="qa") == 2
    assert (await core.model_info("qa"))["program_version"] == "v1"


async def test_near_cache_answers_repeated_hits_without_a_hop(fake_predictor: FakePredictor,
                                                              fake_cache: FakeCache) -> None:
    clock = FakeClock()
    core = core_with({"qa": fake_predictor}, fake_cache, clock=clock)
    await ask(core)
    await core.drain()
    gets = len(fake_cache.get_calls)
    hit = await ask(core)
    assert hit.headers["X-Cache"] == "HIT-MEMORY" and hit.body["cached"] is True
    assert len(fake_cache.get_calls) == gets, "a near hit made a hop"
    assert core.counters.get("cache_ops", tier="near", op="get", result="hit") == 1
    clock.advance(core.args.cache.near_ttl_s + 0.1)  # near entry expired: ask the Cache again
    assert (await ask(core)).headers["X-Cache"] == "HIT-MEMORY"
    assert len(fake_cache.get_calls) == gets + 1
    assert len(fake_predictor.predict_calls) == 1


async def test_a_near_hit_is_answered_without_the_deadline_path(fake_predictor: FakePredictor,
                                                                fake_cache: FakeCache,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A near-cache hit whose info is known never enters ``_answer`` (the deadline timer and
    the awaited chain); a near miss enters it with the key already made, once."""
    core = core_with({"qa": fake_predictor}, fake_cache)
    await ask(core)
    await core.drain()
    entered: list[str | None] = []
    full_path = core._answer

    async def spy(*args: Any) -> Any:
        entered.append(args[-1])
        return await full_path(*args)

    monkeypatch.setattr(core, "_answer", spy)
    hit = await ask(core)
    assert hit.headers["X-Cache"] == "HIT-MEMORY" and hit.headers["Server-Timing"].startswith("total;dur=")
    assert entered == []
    assert core.counters.get("cache_ops", tier="near", op="get", result="hit") == 1
    other = await ask(core, {"question": "something else"})
    assert other.headers["X-Cache"] == "MISS"
    assert len(entered) == 1 and entered[0] is not None and entered[0].startswith(core.args.cache.key_prefix)
    assert len(fake_predictor.predict_calls) == 2
    bad = PredictRequest(model="qa", inputs={"nope": 1})
    with pytest.raises(InvalidRequest):  # inputs are checked on the near path too
        await core.predict(bad, "rid")
    assert len(entered) == 1


async def test_near_cache_never_serves_another_program_version(fake_predictor: FakePredictor,
                                                               fake_cache: FakeCache) -> None:
    core = core_with({"qa": fake_predictor}, fake_cache)
    await ask(core)
    await core.drain()
    fake_predictor.version = "v2"
    await core.refresh_info("qa")
    out = await ask(core)
    assert out.headers["X-Cache"] == "MISS" and out.body["program_version"] == "v2"


# ----------------------------------------------------------------------------- open breaker short-circuit


async def test_known_open_breaker_answers_misses_without_a_hop_until_it_may_probe(fake_predictor: FakePredictor) -> None:
    from serve_app.errors import CircuitOpen

    clock = FakeClock()
    cache = FakeCache()
    core = core_with({"qa": fake_predictor, "classify": FakePredictor("classify", inputs=("text",))}, cache,
                     clock=clock)
    await ask(core, {"question": "cached before the trip"})
    await core.drain()
    fake_predictor.fail(CircuitOpen("model 'qa' is failing; calls are paused", retry_after_s=3.0))
    with pytest.raises(CircuitOpen):
        await ask(core, {"question": "first miss"})
    calls = len(fake_predictor.predict_calls)
    # While the predictor's breaker is open (3 s by its own Retry-After), misses are answered
    # here: no predictor call, Retry-After counting down; hits are still served.
    clock.advance(1.0)
    with pytest.raises(CircuitOpen) as info:
        await ask(core, {"question": "second miss"})
    assert len(fake_predictor.predict_calls) == calls
    assert info.value.retry_after_s == pytest.approx(2.0)
    assert (await ask(core, {"question": "cached before the trip"})).headers["X-Cache"] == "HIT-MEMORY"
    assert core.counters.get("short_circuits", model="qa", variant="default") == 1
    # Once the open period is over, the next miss goes to the predictor (its half-open probe).
    fake_predictor.fail(None)
    clock.advance(2.5)
    assert (await ask(core, {"question": "probe"})).headers["X-Cache"] == "MISS"
    assert len(fake_predictor.predict_calls) == calls + 1
    assert core.directory.open_for("qa") == 0.0


async def test_usage_is_booked_in_batches_one_hop_per_flush(fake_predictor: FakePredictor) -> None:
    class Ledger(FakeCache):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[list[dict[str, Any]]] = []

        async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
            self.batches.append(records)

    ledger = Ledger()
    core = core_with({"qa": fake_predictor, "classify": FakePredictor("classify", inputs=("text",))}, ledger,
                     usage_flush_s=3600)
    for i in range(5):
        await ask(core, {"question": f"q{i}"})
    await ask(core, {"question": "q0"})  # a hit: nothing to book
    assert ledger.batches == []  # queued, not sent per prediction
    await core.drain()
    assert len(ledger.batches) == 1
    assert [r["usage"]["input_tokens"] for r in ledger.batches[0]] == [11] * 5
    assert {(r["model"], r["variant"], r["key_id"]) for r in ledger.batches[0]} == {("qa", "default", None)}


async def test_cost_book_records_a_batch_in_one_store_round_trip() -> None:
    from serve_app.costs import CostBook

    class Store:
        def __init__(self) -> None:
            self.calls: list[dict[str, Any]] = []

        async def hincr_many(self, increments: Any, ttl_s: Any) -> bool:
            self.calls.append(dict(increments))
            return True

        async def hgetall(self, key: str) -> dict[str, float] | None:
            return None

    store = Store()
    book = CostBook("p", store, wall=lambda: 1_700_000_000.0)
    usage = {"input_tokens": 10, "output_tokens": 5, "cost_usd": 0.5, "by_module": {}}
    await book.record_many([{"model": "qa", "variant": "a", "usage": usage, "key_id": "k"}] * 3)
    assert len(store.calls) == 1
    fields = next(iter(store.calls[0].values()))
    assert fields["qa|a|requests"] == 3 and fields["qa|a|cost_usd"] == 1.5 and fields["@key|k|input_tokens"] == 30


async def test_a_failed_usage_batch_is_counted_by_records_and_not_resent() -> None:
    from serve_app.usage_queue import UsageQueue

    class Broken:
        calls = 0

        async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
            Broken.calls += 1
            raise ConnectionError("cache replica gone")

    counters = Counters()
    queue = UsageQueue(Broken(), counters, flush_s=3600, timeout_s=1.0)
    queue.add("qa", "default", {"input_tokens": 1}, None)
    queue.add("qa", "default", {"input_tokens": 2}, "k")
    await queue.flush()
    await queue.flush()  # nothing left: the failed batch is not sent twice
    assert Broken.calls == 1
    assert counters.get("cost_book_errors") == 2
