"""lmsim: answers parsed by DSPy's real adapters, knobs, ledger, HTTP app, and DSPy end to end.

No test sleeps: the core takes an injected ``sleep``; the end-to-end tests use a loopback
uvicorn server in a background thread with zero latency.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import dspy
import httpx
import pydantic
import pytest
import uvicorn
from dspy.utils.exceptions import AdapterParseError, LMRateLimitError, LMServerError, LMTransportError
from starlette.applications import Starlette
from starlette.routing import Mount

# Importing serve_app also pins litellm/DSPy model metadata to their bundled offline copies.
from serve_app.lmsim import (
    KNOB_NAMES,
    KnobError,
    Knobs,
    Ledger,
    SimCore,
    answer,
    build_sim_app,
    parse_request,
    prompt_hash,
)

# ----------------------------------------------------------------------------- signatures


class Classify(dspy.Signature):
    """Classify the sentiment of a review."""

    text: str = dspy.InputField()
    label: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    confidence: float = dspy.OutputField()


class Mixed(dspy.Signature):
    """Extract facts."""

    document: str = dspy.InputField()
    hints: list[str] = dspy.InputField(desc="optional hints")
    is_relevant: bool = dspy.OutputField()
    count: int = dspy.OutputField()
    keywords: list[str] = dspy.OutputField(desc="a few keywords")
    ids: list[int] = dspy.OutputField()
    extra: dict = dspy.OutputField()


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Item(pydantic.BaseModel):
    name: str
    qty: int


class Structured(dspy.Signature):
    """Structured outputs."""

    query: str = dspy.InputField()
    color: Color = dspy.OutputField()
    item: Item = dspy.OutputField()
    scores: dict[str, int] = dspy.OutputField()
    maybe: str | None = dspy.OutputField()
    level: Literal[1, 2, 3] = dspy.OutputField()


COT = dspy.ChainOfThought("question -> answer").predict.signature
ADAPTERS = [dspy.ChatAdapter(), dspy.JSONAdapter()]
CASES: list[tuple[Any, dict[str, Any], dict[str, Any]]] = [
    (COT, {"question": "What is the capital of France?"}, {"reasoning": str, "answer": str}),
    (Classify, {"text": "I loved this film"}, {"label": str, "confidence": float}),
    (
        Mixed,
        {"document": "Ray Serve scales.", "hints": ["ray", "serve"]},
        {"is_relevant": bool, "count": int, "keywords": list, "ids": list, "extra": dict},
    ),
    (
        Structured,
        {"query": "widgets"},
        {"color": Color, "item": Item, "scores": dict, "maybe": str, "level": int},
    ),
]


def body_for(adapter: Any, signature: Any, inputs: dict[str, Any], model: str = "sim-model") -> dict[str, Any]:
    return {"model": model, "messages": adapter.format(signature, [], inputs)}


class FakeSleep:
    """Records requested delays; returns at once (or never, with ``forever=True``)."""

    def __init__(self, forever: bool = False) -> None:
        self.calls: list[float] = []
        self.forever = forever

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self.forever:
            await asyncio.Event().wait()


def make_core(**knobs: Any) -> tuple[SimCore, FakeSleep]:
    sleep = FakeSleep()
    return SimCore(knobs, sleep=sleep, clock=lambda: 1_700_000_000.0), sleep


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("adapter", ADAPTERS, ids=["chat", "json"])
@pytest.mark.parametrize("signature,inputs,types", CASES, ids=["cot", "classify", "mixed", "structured"])
def test_answers_parse_with_real_adapters(adapter: Any, signature: Any, inputs: dict, types: dict) -> None:
    content = answer(body_for(adapter, signature, inputs)).content
    parsed = adapter.parse(signature, content)
    assert set(parsed) == set(signature.output_fields)
    for name, expected in types.items():
        assert isinstance(parsed[name], expected), (name, parsed[name])
    if signature is Classify:
        assert parsed["label"] in ("positive", "negative", "neutral")
    if signature is Mixed:
        assert all(isinstance(k, str) for k in parsed["keywords"]) and all(isinstance(i, int) for i in parsed["ids"])
    if signature is Structured:
        assert parsed["level"] in (1, 2, 3) and all(isinstance(v, int) for v in parsed["scores"].values())


def test_chat_reply_format_and_json_values_match() -> None:
    inputs = {"text": "solid"}
    chat = answer(body_for(dspy.ChatAdapter(), Classify, inputs))
    js = answer(body_for(dspy.JSONAdapter(), Classify, inputs))
    assert (chat.kind, js.kind) == ("chat", "json")
    assert chat.content.startswith("[[ ## label ## ]]\n") and chat.content.endswith("[[ ## completed ## ]]")
    assert dspy.ChatAdapter().parse(Classify, chat.content) == dspy.JSONAdapter().parse(Classify, js.content)


def test_answers_are_deterministic_and_input_sensitive() -> None:
    adapter = dspy.ChatAdapter()
    replies = [answer(body_for(adapter, Classify, {"text": f"review number {i}"})).content for i in range(20)]
    again = [answer(body_for(adapter, Classify, {"text": f"review number {i}"})).content for i in range(20)]
    assert replies == again
    assert len(set(replies)) == 20
    labels = {adapter.parse(Classify, r)["label"] for r in replies}
    assert len(labels) >= 2  # choices come from the input hash, not a constant


def test_demos_and_instructions_do_not_change_the_answer_but_inputs_do() -> None:
    adapter = dspy.ChatAdapter()
    plain = answer(body_for(adapter, Classify, {"text": "meh"})).content
    demo = dspy.Example(text="great", label="positive", confidence=0.9)
    with_demo = {"model": "m", "messages": adapter.format(Classify, [demo], {"text": "meh"})}
    assert answer(with_demo).content == plain
    assert prompt_hash(with_demo["messages"]) != prompt_hash(body_for(adapter, Classify, {"text": "meh"})["messages"])


def test_plain_chat_gets_a_sentence_and_usage_counts() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello, how are you?"}]}
    reply = answer(body)
    assert reply.kind == "plain" and "[[ ##" not in reply.content and "Hello" in reply.content
    assert reply.prompt_tokens == 6  # "Hello" "," "how" "are" "you" "?": words and punctuation
    assert reply.total_tokens == reply.prompt_tokens + reply.completion_tokens > reply.prompt_tokens


def test_bare_json_schema_response_format_is_answered() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Name a city."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    parsed = parse_request(body)
    assert parsed.kind == "json" and [f.name for f in parsed.outputs] == ["city", "n"]
    values = dspy.JSONAdapter().parse(dspy.Signature("q -> city: str, n: int"), answer(body).content)
    assert isinstance(values["city"], str) and isinstance(values["n"], int)


# ----------------------------------------------------------------------------- core knobs


async def test_ok_response_shape() -> None:
    core, sleep = make_core()
    res = await core.complete(body_for(dspy.ChatAdapter(), Classify, {"text": "x"}), {"X-Request-ID": "r-1"})
    assert res.status == 200 and sleep.calls == []
    assert res.body["object"] == "chat.completion" and res.body["model"] == "sim-model"
    choice = res.body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    usage = res.body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
    assert res.headers["x-request-id"] == "r-1"


async def test_error_429_with_retry_after() -> None:
    core, _ = make_core(error_rate=1.0, error_status=429, retry_after_s=2.5)
    res = await core.complete(body_for(dspy.ChatAdapter(), COT, {"question": "q"}), {})
    assert res.status == 429 and res.headers["Retry-After"] == "2.5"
    assert set(res.body["error"]) >= {"message", "type", "code"}
    core.set_knobs(error_status=500)
    res = await core.complete(body_for(dspy.ChatAdapter(), COT, {"question": "q"}), {})
    assert res.status == 500 and "Retry-After" not in res.headers
    assert core.ledger.summary()["by_outcome"] == {"error:429": 1, "error:500": 1}


async def test_hang_waits_hang_s_then_504() -> None:
    core, sleep = make_core(hang_rate=1.0, hang_s=7.0)
    res = await core.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert res.status == 504 and sleep.calls == [7.0]
    assert core.ledger.entries()[-1].outcome == "hang"


async def test_hang_ends_when_client_disconnects() -> None:
    sleep = FakeSleep(forever=True)
    core = SimCore({"hang_rate": 1.0}, sleep=sleep)
    gone = asyncio.Event()

    async def disconnected() -> None:
        await gone.wait()

    task = asyncio.ensure_future(
        core.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, disconnected=disconnected)
    )
    await asyncio.sleep(0)
    assert not task.done() and core.ledger.total == 1  # recorded before hanging
    gone.set()
    res = await asyncio.wait_for(task, timeout=1)
    assert res.status == 499 and sleep.calls == [3600.0]


async def test_malformed_is_200_and_unparseable() -> None:
    core, _ = make_core(malformed_rate=1.0)
    for adapter in ADAPTERS:
        res = await core.complete(body_for(adapter, Classify, {"text": "x"}))
        content = res.body["choices"][0]["message"]["content"]
        assert res.status == 200 and "[[ ##" not in content
        with pytest.raises(AdapterParseError):
            adapter.parse(Classify, content)
    assert core.ledger.summary()["by_outcome"] == {"malformed": 2}


async def test_latency_and_jitter_use_injected_sleep() -> None:
    core, sleep = make_core(latency_ms=50)
    await core.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert sleep.calls == [pytest.approx(0.05)]
    core.set_knobs(jitter_ms=100, seed=7)
    for _ in range(20):
        await core.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    delays = sleep.calls[1:]
    assert all(0.05 <= d <= 0.15 for d in delays) and len(set(delays)) > 1
    other, other_sleep = make_core(latency_ms=50, jitter_ms=100, seed=7)
    for _ in range(20):
        await other.complete({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert other_sleep.calls == delays  # same seed, same model -> same draws


async def test_per_model_override_and_reset() -> None:
    core, _ = make_core()
    effective = core.set_knobs(model="sim-a", error_rate=1.0, error_status=503)
    assert effective.error_rate == 1.0 and core.knobs.error_rate == 0.0
    core.set_knobs(latency_ms=5)  # defaults still flow into the override's other knobs
    assert core.knobs_for("sim-a").latency_ms == 5 and core.knobs_for("sim-b").error_rate == 0.0
    msgs = [{"role": "user", "content": "hi"}]
    assert (await core.complete({"model": "sim-a", "messages": msgs})).status == 503
    assert (await core.complete({"model": "sim-b", "messages": msgs})).status == 200
    assert "sim-a" in core.knobs_snapshot()["overrides"] and "sim-a" in core.list_models()
    core.reset_knobs("sim-a")
    assert (await core.complete({"model": "sim-a", "messages": msgs})).status == 200
    core.reset_knobs()
    assert core.knobs == Knobs()


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"bogus": 1}, "unknown knob 'bogus'"),
        ({"error_status": 404}, "error_status"),
    ],
)
def test_invalid_knobs_rejected_without_change(bad: dict[str, Any], needle: str) -> None:
    core, _ = make_core(latency_ms=3)
    with pytest.raises(KnobError, match=needle):
        core.set_knobs(**bad)
    with pytest.raises(KnobError):
        core.set_knobs(model="x", **bad)
    assert core.knobs == Knobs(latency_ms=3) and core.knobs_snapshot()["overrides"] == {}
    with pytest.raises(KnobError):
        SimCore(bad)


async def test_bad_requests_are_400() -> None:
    core, _ = make_core()
    msgs = [{"role": "user", "content": "hi"}]
    for body in ({"model": "m", "messages": msgs, "stream": True}, {"messages": msgs}, {"model": "m", "messages": []}):
        res = await core.complete(body)
        assert res.status == 400 and res.body["error"]["type"] == "invalid_request_error"
    assert core.ledger.summary()["by_outcome"] == {"error:400": 3}


# ----------------------------------------------------------------------------- ledger


async def test_ledger_by_request_id_and_prompt_hash() -> None:
    core, _ = make_core()
    a = body_for(dspy.ChatAdapter(), Classify, {"text": "a"})
    b = body_for(dspy.ChatAdapter(), Classify, {"text": "b"})
    for body, rid in ((a, "r1"), (a, "r1"), (b, "r2"), (a, None)):
        await core.complete(body, {"x-request-id": rid} if rid else {})
    assert core.ledger.total == 4
    assert len(core.ledger.by_request_id("r1")) == 2 and core.ledger.count(request_id="r2") == 1
    assert core.ledger.count(prompt_hash=prompt_hash(a["messages"])) == 3
    assert core.ledger.by_prompt_hash(prompt_hash(b["messages"]))[0].request_id == "r2"
    assert core.ledger.clear() == 4 and core.ledger.total == 0


def test_ledger_is_bounded_but_counters_exact() -> None:
    ledger = Ledger(max_entries=3, clock=lambda: 0.0)
    for i in range(10):
        ledger.record(request_id=str(i), model="m", prompt_hash="h", outcome="ok", prompt_tokens=2)
    summary = ledger.summary()
    assert summary["total"] == 10 and summary["retained"] == 3 and summary["prompt_tokens"] == 20
    assert [e.request_id for e in ledger.entries()] == ["7", "8", "9"]


# ----------------------------------------------------------------------------- HTTP app


async def test_app_routes_and_admin() -> None:
    core, _ = make_core()
    transport = httpx.ASGITransport(app=build_sim_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "sim-model"
        r = await client.put("/admin/knobs", json={"model": "sim-a", "error_rate": 1, "error_status": 429})
        assert r.status_code == 200 and r.json()["knobs"]["error_status"] == 429
        bad = await client.put("/admin/knobs", json={"error_rate": 2})
        assert bad.status_code == 422 and "error_rate" in bad.json()["error"]["message"]
        assert (await client.put("/admin/knobs", json={"nope": 1})).status_code == 422
        knobs = (await client.get("/admin/knobs")).json()
        assert knobs["effective"]["sim-a"]["error_rate"] == 1 and knobs["knob_names"] == list(KNOB_NAMES)
        msgs = [{"role": "user", "content": "hi"}]
        r = await client.post("/v1/chat/completions", json={"model": "sim-a", "messages": msgs})
        assert r.status_code == 429
        r = await client.post(
            "/v1/chat/completions", json={"model": "sim-b", "messages": msgs}, headers={"X-Request-ID": "abc"}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert (await client.post("/v1/chat/completions", content=b"{nope")).status_code == 400
        summary = (await client.get("/admin/ledger")).json()
        assert summary["total"] == 2 and summary["by_model"] == {"sim-a": 1, "sim-b": 1}
        hits = (await client.get("/admin/ledger", params={"request_id": "abc"})).json()
        assert hits["count"] == 1 and hits["entries"][0]["model"] == "sim-b"
        hits = (await client.get("/admin/ledger", params={"prompt_hash": prompt_hash(msgs)})).json()
        assert hits["count"] == 2
        assert (await client.post("/admin/knobs/reset", json={"model": "sim-a"})).json()["overrides"] == {}
        assert (await client.delete("/admin/ledger")).json() == {"cleared": 2}


@pytest.mark.parametrize("how", ["mount", "root_path"])
async def test_app_works_under_a_prefix(how: str) -> None:
    core, _ = make_core()
    sim = build_sim_app(core)
    if how == "mount":
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/lmsim", app=sim)]))
    else:  # how Ray Serve calls an ASGI app served at route_prefix="/lmsim"
        transport = httpx.ASGITransport(app=sim, root_path="/lmsim")
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        assert (await client.get("/lmsim/health")).status_code == 200
        r = await client.post("/lmsim/v1/chat/completions", json=body_for(dspy.ChatAdapter(), COT, {"question": "q"}))
        assert r.status_code == 200 and "[[ ## completed ## ]]" in r.json()["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------- DSPy end to end


@pytest.fixture(scope="module")
def sim_server() -> Iterator[tuple[SimCore, str, uvicorn.Server]]:
    """A real loopback server (DSPy's engine cannot take an in-process transport)."""
    core = SimCore()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_sim_app(core), log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "lmsim test server did not start"
    try:
        yield core, f"http://127.0.0.1:{port}/v1", server
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture()
def sim_lm(sim_server: tuple[SimCore, str, uvicorn.Server]) -> Iterator[tuple[SimCore, dspy.LM]]:
    core, url, _ = sim_server
    core.reset_knobs()
    core.ledger.clear()
    yield core, dspy.LM("openai/sim-model", api_base=url, api_key="sim", cache=False, num_retries=0)


def test_e2e_chain_of_thought_and_usage(sim_lm: tuple[SimCore, dspy.LM]) -> None:
    core, lm = sim_lm
    with dspy.context(lm=lm, track_usage=True):
        pred = dspy.ChainOfThought("question -> answer")(question="What is 2+2?")
        again = dspy.ChainOfThought("question -> answer")(question="What is 2+2?")
    assert isinstance(pred.reasoning, str) and pred.reasoning and isinstance(pred.answer, str)
    assert (pred.reasoning, pred.answer) == (again.reasoning, again.answer)
    usage = pred.get_lm_usage()["openai/sim-model"]
    entry = core.ledger.entries()[0]
    assert usage["prompt_tokens"] == entry.prompt_tokens > 0
    assert usage["completion_tokens"] == entry.completion_tokens > 0
    assert core.ledger.summary()["by_outcome"] == {"ok": 2}


def test_e2e_typed_predict_with_both_adapters(sim_lm: tuple[SimCore, dspy.LM]) -> None:
    _, lm = sim_lm
    for adapter in ADAPTERS:
        with dspy.context(lm=lm, adapter=adapter):
            pred = dspy.Predict(Mixed)(document="doc", hints=["h"])
            cls = dspy.Predict(Classify)(text="fine")
        assert isinstance(pred.is_relevant, bool) and isinstance(pred.count, int)
        assert isinstance(pred.keywords, list) and all(isinstance(k, str) for k in pred.keywords)
        assert cls.label in ("positive", "negative", "neutral") and isinstance(cls.confidence, float)


def test_e2e_errors_surface_as_dspy_exceptions(sim_lm: tuple[SimCore, dspy.LM]) -> None:
    core, lm = sim_lm
    core.set_knobs(error_rate=1.0, error_status=429, retry_after_s=0)
    with dspy.context(lm=lm), pytest.raises(LMRateLimitError) as info:
        dspy.Predict("question -> answer")(question="q")
    assert info.value.status == 429 and info.value.retry_after == 0
    core.set_knobs(error_status=529)
    with dspy.context(lm=lm), pytest.raises(LMServerError):
        dspy.Predict("question -> answer")(question="q")
    core.reset_knobs()
    core.set_knobs(malformed_rate=1.0)
    with dspy.context(lm=lm), pytest.raises(AdapterParseError):
        dspy.Predict("question -> answer")(question="q")
    # ChatAdapter retries a parse failure once through JSONAdapter: two calls.
    assert core.ledger.summary()["by_outcome"] == {"error:429": 1, "error:529": 1, "malformed": 2}


def test_e2e_hang_ends_on_client_timeout(sim_server: tuple[SimCore, str, uvicorn.Server]) -> None:
    core, url, server = sim_server
    core.reset_knobs()
    core.set_knobs(hang_rate=1.0)  # hang_s stays 3600: only the client's disconnect can end it
    lm = dspy.LM("openai/sim-model", api_base=url, api_key="sim", cache=False, num_retries=0, timeout=0.3)
    try:
        with dspy.context(lm=lm), pytest.raises(LMTransportError, match="timed out"):
            dspy.Predict("question -> answer")(question="q")
        deadline = time.monotonic() + 3
        while server.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server.server_state.tasks, "the hung handler outlived its client"
    finally:
        core.reset_knobs()
