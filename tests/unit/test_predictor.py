# mypy: disable-error-code="comparison-overlap"
# (mypy narrows the `breaker.state` property across calls that change it.)
"""Predictor core: a real DSPy program over an in-process simulated LM; breaker and error mapping (B1, B5, B8)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
)

from serve_app.breaker import BreakerConfig, CircuitBreaker, State
from serve_app.config import PROJECT_ROOT, LMConfig, ModelConfig, ProgramRelease
from serve_app.errors import (
    CircuitOpen,
    InternalError,
    InvalidRequest,
    Overloaded,
    ProgramOutputError,
    ServeAppError,
    UpstreamError,
    UpstreamTimeout,
)
from serve_app.metrics import Counters
from serve_app.predictor import PredictorCore, build_lm, validate_inputs
from serve_app.programs import ProgramLoadError, load_program

from .conftest import FakeClock, SimLM

CANARY = "sk-canary-123"
QA_V1 = "configs/states/qa_v1.json"
QA_V2 = "configs/states/qa_v2.json"
CLASSIFY_STATE = "configs/states/classify.json"


def model_config(
    name: str = "qa",
    program: str = "serve_app.examples:build_qa",
    state: str | None = QA_V1,
    *,
    timeout_s: float = 5.0,
    lm_timeout_s: float = 1.0,
    lm: dict[str, Any] | None = None,
) -> ModelConfig:
    return ModelConfig(
        name=name,
        program=program,
        state=state,
        description=f"{name} for tests",
        lm=LMConfig(model=f"openai/sim-{name}", timeout_s=lm_timeout_s, **(lm or {})),
        timeout_s=timeout_s,
    )


def make_core(
    lm: SimLM,
    model: ModelConfig | None = None,
    *,
    breaker: BreakerConfig | None = None,
    clock: Callable[[], float] | None = None,
) -> PredictorCore:
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs["clock"] = clock
    model = model or model_config()
    if breaker is not None:  # the breaker is configured per model, in the YAML
        model = model.model_copy(update={"breaker": breaker})
    return PredictorCore(model, lm=lm, counters=Counters(), **kwargs)


TRIP_FAST = BreakerConfig(
    min_calls=2, window_s=60, failure_rate_threshold=0.5, open_s=30, max_open_s=60, jitter_ratio=0
)


# ----------------------------------------------------------------------------- answers


async def test_qa_prediction(sim_lm: SimLM) -> None:
    # The clock moves 125 ms while the LM answers (the breaker reads the same clock).
    core = make_core(sim_lm, clock=lambda: 100.125 if sim_lm.calls else 100.0)
    payload = await core.predict({"question": "What is Ray Serve?"})
    assert payload["model"] == "qa"
    assert (
        payload["program_version"] == load_program("serve_app.examples:build_qa", ProgramRelease(state=QA_V1)).version
    )
    assert set(payload["outputs"]) == {"reasoning", "answer"}
    assert all(isinstance(v, str) and v for v in payload["outputs"].values())
    assert payload["latency_ms"] == 125.0
    assert sim_lm.calls == 1
    tin, tout = sim_lm.usage_log[0]
    assert payload["usage"] == {
        "input_tokens": tin, "output_tokens": tout, "cost_usd": None,  # the test model names no price
        "by_module": {"predict": {"input_tokens": tin, "output_tokens": tout, "calls": 1, "cost_usd": None}},
    }
    json.dumps(payload)  # plain JSON-safe data, ready for a handle and a cache


async def test_one_predictor_needs_no_dspy_callback(sim_lm: SimLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-predictor program gets its per-module usage from the totals: DSPy's callback
    machinery (argument inspection on every module, adapter and LM call) is not paid."""
    import serve_app.predictor as predictor_module

    def no_callback(*_: object) -> None:
        raise AssertionError("a one-predictor program built a ModuleUsage callback")

    monkeypatch.setattr(predictor_module, "ModuleUsage", no_callback)
    payload = await make_core(sim_lm).predict({"question": "one predictor"})
    tin, tout = sim_lm.usage_log[0]
    assert payload["usage"]["by_module"] == {"predict": {"input_tokens": tin, "output_tokens": tout, "calls": 1,
                                                         "cost_usd": None}}


def test_usage_without_a_named_predictor_goes_to_the_program() -> None:
    """A program whose LM calls come from no named predictor: its tokens are the ``program``'s,
    as the per-module callback would have named them."""
    from dspy.utils.usage_tracker import UsageTracker

    from serve_app.predictor import _usage

    tracker = UsageTracker()
    tracker.add_usage("openai/m", {"prompt_tokens": 7, "completion_tokens": 3})
    tracker.add_usage("openai/m", {"prompt_tokens": 5, "completion_tokens": 1})
    usage = _usage(tracker, None, {}, None)
    assert usage["input_tokens"] == 12 and usage["output_tokens"] == 4
    assert usage["by_module"] == {"program": {"input_tokens": 12, "output_tokens": 4, "calls": 2, "cost_usd": None}}
    assert _usage(UsageTracker(), None, {}, None)["by_module"] == {}  # no LM call, no module


async def test_classifier_prediction_has_typed_outputs(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, model_config("classify", "serve_app.examples:build_classifier", CLASSIFY_STATE))
    payload = await core.predict({"text": "I love how fast this is."})
    outputs = payload["outputs"]
    assert set(outputs) == {"sentiment", "confidence"}
    assert outputs["sentiment"] in {"positive", "negative", "neutral"}
    assert isinstance(outputs["confidence"], float)
    assert payload["usage"]["input_tokens"] > 0 and payload["usage"]["output_tokens"] > 0


async def test_pipeline_prediction_sums_usage_over_both_lm_calls(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, model_config("pipeline", "serve_app.examples:build_pipeline", None))
    payload = await core.predict({"document": "Ray Serve scales Python models. It runs on Kubernetes."})
    outputs = payload["outputs"]
    assert list(outputs) == ["summary", "title", "keywords", "word_count", "is_technical"]
    assert isinstance(outputs["summary"], str) and isinstance(outputs["title"], str)
    assert isinstance(outputs["keywords"], list) and all(isinstance(k, str) for k in outputs["keywords"])
    assert isinstance(outputs["word_count"], int) and not isinstance(outputs["word_count"], bool)
    assert isinstance(outputs["is_technical"], bool)
    assert sim_lm.calls == 2
    assert {k: payload["usage"][k] for k in ("input_tokens", "output_tokens")} == {
        "input_tokens": sum(p for p, _ in sim_lm.usage_log),
        "output_tokens": sum(c for _, c in sim_lm.usage_log),
    }
    assert payload["usage"]["input_tokens"] > sim_lm.usage_log[0][0] > 0
    assert payload["latency_ms"] >= 0
    json.dumps(payload)


async def test_same_inputs_same_answer(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)
    a = await core.predict({"question": "q1"})
    b = await core.predict({"question": "q1"})
    c = await core.predict({"question": "q2"})
    assert a["outputs"] == b["outputs"] != c["outputs"]


async def test_state_lm_does_not_override_ours(sim_lm: SimLM, tmp_path: Path) -> None:
    state = json.loads((PROJECT_ROOT / QA_V1).read_text())
    state["predict"]["lm"] = {"model": "openai/elsewhere", "api_base": "http://127.0.0.1:9/v1", "api_key": "x"}
    path = tmp_path / "with_lm.json"
    path.write_text(json.dumps(state))
    core = make_core(sim_lm, model_config(state=str(path)))
    await core.predict({"question": "who answers?"})
    assert sim_lm.calls == 1, "the program must call the LM the predictor configured"


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("inputs", "field"),
    [({}, "inputs.question"), ({"question": "q", "context": "c"}, "inputs.context"), ({"q": "x"}, "inputs.question")],
)
async def test_bad_inputs_are_422_without_an_lm_call(sim_lm: SimLM, inputs: dict[str, Any], field: str) -> None:
    core = make_core(sim_lm, breaker=TRIP_FAST)
    for _ in range(3):
        with pytest.raises(InvalidRequest) as info:
            await core.predict(inputs)
        assert (info.value.status, info.value.field) == (422, field)
    assert sim_lm.calls == 0
    assert core.breaker.snapshot()["calls_in_window"] == 0


def test_validate_inputs_reports_the_first_missing_then_unknown_field() -> None:
    with pytest.raises(InvalidRequest, match="missing input field 'a'"):
        validate_inputs(["b", "a"], {"z": 1})
    with pytest.raises(InvalidRequest, match=r"unknown input field 'y' \(expected: a, b\)"):
        validate_inputs(["b", "a"], {"a": 1, "b": 2, "z": 1, "y": 2})
    validate_inputs(["a"], {"a": None})


# ----------------------------------------------------------------------------- breaker


async def test_provider_failures_trip_the_breaker(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, breaker=TRIP_FAST)
    sim_lm.fail_with = LMServerError(f"upstream 500: {CANARY}", status=500)
    for _ in range(2):
        with pytest.raises(UpstreamError) as info:
            await core.predict({"question": "q"})
        assert CANARY not in str(info.value)
    assert sim_lm.calls == 2
    assert core.breaker.state is State.OPEN
    assert core.counters.get("breaker_transitions", model="qa", to="open") == 1

    for _ in range(5):
        with pytest.raises(CircuitOpen) as opened:
            await core.predict({"question": "q"})
        assert opened.value.retry_after_s is not None and 29 < opened.value.retry_after_s <= 30
        assert opened.value.status == 503
    assert sim_lm.calls == 2, "an open breaker must not call the LM"
    assert core.info()["breaker"]["state"] == "OPEN"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (LMServerError("boom", status=503), UpstreamError),
        (LMTimeoutError("slow"), UpstreamTimeout),
    ],
)
async def test_provider_failures_count(sim_lm: SimLM, exc: Exception, expected: type[ServeAppError]) -> None:
    core = make_core(sim_lm, breaker=TRIP_FAST)
    sim_lm.fail_with = exc
    with pytest.raises(expected):
        await core.predict({"question": "q"})
    snap = core.breaker.snapshot()
    assert (snap["calls_in_window"], snap["failure_rate"]) == (1, 1.0)


async def test_provider_rate_limit_opens_the_breaker_for_its_retry_after(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)  # default breaker: 10 calls before any rate is judged
    sim_lm.fail_with = LMRateLimitError(f"429 from provider {CANARY}", retry_after=10)
    with pytest.raises(Overloaded) as info:
        await core.predict({"question": "q"})
    assert info.value.retry_after_s == 10.0
    assert info.value.status == 503
    assert CANARY not in info.value.message
    assert core.breaker.state is State.OPEN
    assert core.breaker.retry_after_s() >= 9.5

    sim_lm.fail_with = None
    with pytest.raises(CircuitOpen) as opened:
        await core.predict({"question": "q"})
    assert opened.value.retry_after_s is not None and opened.value.retry_after_s >= 9.5
    assert sim_lm.calls == 1


@pytest.mark.parametrize(
    ("setup", "expected", "status"),
    [
        (lambda lm: setattr(lm, "fail_with", ContextWindowExceededError(model="openai/sim-qa")), InvalidRequest, 422),
        (
            lambda lm: setattr(lm, "fail_with", LMInvalidRequestError(f"policy {CANARY}", status=400)),
            InvalidRequest,
            422,
        ),
        (lambda lm: setattr(lm, "malformed", True), ProgramOutputError, 502),
        (lambda lm: setattr(lm, "fail_with", RuntimeError(f"bug {CANARY}")), InternalError, 500),
    ],
    ids=["context-window", "invalid-request", "unparseable-output", "program-bug"],
)
async def test_errors_that_are_not_the_providers_fault_leave_the_breaker_alone(
    sim_lm: SimLM, setup: Callable[[SimLM], None], expected: type[ServeAppError], status: int
) -> None:
    core = make_core(sim_lm, breaker=TRIP_FAST)
    setup(sim_lm)
    for _ in range(5):
        with pytest.raises(expected) as info:
            await core.predict({"question": "q"})
        assert info.value.status == status
        assert CANARY not in info.value.message
    snap = core.breaker.snapshot()
    assert snap["state"] == "CLOSED"
    assert snap["calls_in_window"] == 0
    assert sim_lm.calls >= 5, "every call reached the LM: nothing was blocked"


async def test_hanging_lm_hits_the_model_deadline(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, model_config(timeout_s=0.05, lm_timeout_s=0.01), breaker=TRIP_FAST)
    sim_lm.hang = asyncio.Event()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout) as info:
        await core.predict({"question": "q"})
    assert loop.time() - started < 1.0
    assert info.value.status == 504
    snap = core.breaker.snapshot()
    assert (snap["calls_in_window"], snap["failure_rate"]) == (1, 1.0), "a timeout is a provider failure"
    sim_lm.hang.set()


async def test_cancelled_predict_releases_its_permit(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, breaker=TRIP_FAST)
    sim_lm.hang, sim_lm.entered = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(core.predict({"question": "q"}))
    await sim_lm.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snap = core.breaker.snapshot()
    assert (snap["state"], snap["calls_in_window"], snap["generation"]) == ("CLOSED", 0, 0)


async def test_cancelled_half_open_probe_frees_its_permit(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)
    clock = FakeClock()
    core.breaker = CircuitBreaker(
        BreakerConfig(min_calls=1, open_s=10, jitter_ratio=0, half_open_permits=1, max_half_open_s=60, slow_call_s=30),
        clock=clock,
    )
    sim_lm.fail_with = LMServerError("down")
    with pytest.raises(UpstreamError):
        await core.predict({"question": "q"})
    assert core.breaker.state is State.OPEN
    clock.advance(10)
    assert core.breaker.state is State.HALF_OPEN

    sim_lm.fail_with = None
    sim_lm.hang, sim_lm.entered = asyncio.Event(), asyncio.Event()
    probe = asyncio.ensure_future(core.predict({"question": "probe"}))
    await sim_lm.entered.wait()
    assert core.breaker.snapshot()["half_open_probes_in_flight"] == 1
    with pytest.raises(CircuitOpen):  # the only permit is out
        await core.predict({"question": "other"})
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    snap = core.breaker.snapshot()
    assert (snap["state"], snap["half_open_probes_in_flight"], snap["half_open_probes_done"]) == ("HALF_OPEN", 0, 0)

    sim_lm.hang = None  # the freed permit admits the next probe, whose success closes the breaker
    await core.predict({"question": "next"})
    assert core.breaker.state is State.CLOSED


# ----------------------------------------------------------------------------- reconfigure, info


async def test_reconfigure_swaps_the_program(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)
    v1 = core.program_version
    core.reconfigure(ProgramRelease(state=QA_V2))
    assert core.program_version != v1
    assert core.info()["program_version"] == core.program_version
    payload = await core.predict({"question": "q"})
    assert payload["program_version"] == core.program_version
    core.reconfigure(ProgramRelease(state=QA_V1))
    assert core.program_version == v1


async def test_failed_reconfigure_keeps_the_old_program(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)
    v1 = core.program_version
    with pytest.raises(ProgramLoadError):
        core.reconfigure(ProgramRelease(state="configs/states/missing.json"))
    assert core.program_version == v1
    assert (await core.predict({"question": "q"}))["program_version"] == v1


async def test_in_flight_call_finishes_on_the_program_it_started_with(sim_lm: SimLM) -> None:
    core = make_core(sim_lm)
    v1 = core.program_version
    sim_lm.hang, sim_lm.entered = asyncio.Event(), asyncio.Event()
    task = asyncio.ensure_future(core.predict({"question": "q"}))
    await sim_lm.entered.wait()
    core.reconfigure(ProgramRelease(state=QA_V2))
    sim_lm.hang.set()
    assert (await task)["program_version"] == v1
    assert core.program_version != v1


def test_info_shape(sim_lm: SimLM) -> None:
    core = make_core(sim_lm, model_config("classify", "serve_app.examples:build_classifier", CLASSIFY_STATE))
    info = core.info()
    assert set(info) == {"name", "description", "program_version", "inputs", "outputs", "lm", "breaker"}
    assert info["name"] == "classify"
    assert info["description"] == "classify for tests"
    assert info["inputs"] == [{"name": "text", "type": "str", "description": "the text to classify"}]
    assert info["outputs"] == [
        {"name": "sentiment", "type": "Literal['positive', 'negative', 'neutral']", "description": ""},
        {"name": "confidence", "type": "float", "description": "between 0 and 1"},
    ]
    assert info["lm"] == {"model": "openai/sim-classify", "temperature": 0.0, "max_tokens": 512}
    assert info["breaker"]["state"] == "CLOSED"
    json.dumps(info)


# ----------------------------------------------------------------------------- build_lm


def test_build_lm_reads_the_key_from_the_named_variable() -> None:
    cfg = LMConfig(model="openai/x", api_key_env="PROVIDER_KEY", timeout_s=3, num_retries=1)
    lm = build_lm(cfg, env={"PROVIDER_KEY": CANARY})
    assert isinstance(lm, dspy.LM)
    assert lm.kwargs["api_key"] == CANARY
    assert (lm.cache, lm.num_retries, lm.kwargs["timeout"]) == (False, 1, 3.0)
    assert CANARY not in json.dumps(lm.dump_state(), default=str)


def test_build_lm_refuses_a_missing_key() -> None:
    with pytest.raises(ValueError, match="PROVIDER_KEY is not set"):
        build_lm(LMConfig(model="openai/x", api_key_env="PROVIDER_KEY"), env={})


def test_build_lm_for_an_unauthenticated_server() -> None:
    lm = build_lm(LMConfig(model="openai/sim-qa", api_base="http://127.0.0.1:8000/lmsim/v1"), env={})
    assert lm.kwargs["api_base"] == "http://127.0.0.1:8000/lmsim/v1"
    assert lm.kwargs["api_key"] == "unused"


def test_info_never_shows_the_key(sim_lm: SimLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_KEY_FOR_TEST", CANARY)
    core = PredictorCore(model_config(lm={"api_key_env": "PROVIDER_KEY_FOR_TEST"}))  # builds a real dspy.LM
    assert CANARY not in json.dumps(core.info())
