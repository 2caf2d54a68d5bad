"""The HTTP surface over a router core: A6 admission, error bodies, endpoints, the answer's shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from serve_app import __version__
from serve_app.errors import Overloaded, UnknownModel
from serve_app.http import build_http_app
from serve_app.router import RouterCore
from serve_app.schemas import ErrorBody, PredictResponse

from .conftest import FakeCache, FakeClock, FakePredictor, app_args, fake_outputs

LIMIT = 4096  # app_args: limits.max_body_bytes
QUESTION: dict[str, Any] = {"question": "What is Ray Serve?"}
GOOD: dict[str, Any] = {"model": "qa", "inputs": QUESTION}


@pytest.fixture
def predictors() -> dict[str, FakePredictor]:
    return {"qa": FakePredictor("qa"), "classify": FakePredictor("classify", inputs=("text",))}


@pytest.fixture
def core(predictors: dict[str, FakePredictor], fake_cache: FakeCache) -> RouterCore:
    return RouterCore(app_args(), predictors, fake_cache, clock=FakeClock())


@pytest.fixture
def app(core: RouterCore) -> Starlette:
    return build_http_app(core)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def predict_calls(predictors: dict[str, FakePredictor]) -> int:
    return sum(len(p.predict_calls) for p in predictors.values())


def assert_error(response: httpx.Response, status: int, code: str, request_id: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    ErrorBody.model_validate(body)
    assert body["error"]["code"] == code
    assert body["error"]["request_id"]
    if request_id is not None:
        assert body["error"]["request_id"] == request_id
    assert "Traceback" not in response.text
    detail: dict[str, Any] = body["error"]
    return detail


# ----------------------------------------------------------------------------- A6 admission


async def test_declared_body_over_the_limit_is_413(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    body = json.dumps({"model": "qa", "inputs": {"question": "x" * (LIMIT + 10)}})
    response = await client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    err = assert_error(response, 413, "invalid_request")
    assert str(LIMIT) in err["message"]
    assert predict_calls(predictors) == 0


async def test_chunked_body_without_length_over_the_limit_is_413(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "qa", "inputs": {"question": "'
        for _ in range(64):
            sent.append(1)
            yield b"x" * 1024
        yield b'"}}'

    response = await client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "invalid_request")
    assert predict_calls(predictors) == 0


async def test_body_exactly_at_the_limit_is_read(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    prefix, suffix = '{"model": "qa", "inputs": {"question": "', '"}}'
    body = prefix + "x" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body.encode()) == LIMIT
    response = await client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert predict_calls(predictors) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"model": "qa",}', b"\xff\xfe\x00"],
    ids=["syntax", "empty", "trailing-comma", "binary"],
)
async def test_invalid_json_is_400(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor], content: bytes
) -> None:
    response = await client.post("/v1/predict", content=content, headers={"content-type": "application/json"})
    err = assert_error(response, 400, "invalid_request")
    assert "not valid JSON" in err["message"]
    assert predict_calls(predictors) == 0


@pytest.mark.parametrize("depth", [3_000, 100_000])
async def test_deeply_nested_json_is_400(predictors: dict[str, FakePredictor], depth: int) -> None:
    core = RouterCore(app_args(limits={"max_body_bytes": 1024 * 1024}), predictors, FakeCache(), clock=FakeClock())
    transport = httpx.ASGITransport(app=build_http_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for body in (
            b"[" * depth,
            b'{"model": "qa", "inputs": {"question": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}}",
        ):
            response = await client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
            err = assert_error(response, 400, "invalid_request")
            assert "nested too deeply" in err["message"]
    assert predict_calls(predictors) == 0


async def test_no_nesting_depth_yields_a_500(predictors: dict[str, FakePredictor]) -> None:
    core = RouterCore(app_args(limits={"max_body_bytes": 1024 * 1024}), predictors, FakeCache(), clock=FakeClock())
    transport = httpx.ASGITransport(app=build_http_app(core), raise_app_exceptions=False)
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for depth in range(600, 1001, 2):
            body = b'{"model": "qa", "inputs": {"question": ' + b"[" * depth + b"]" * depth + b"}}"
            response = await client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
            statuses[response.status_code] = depth
    assert 500 not in statuses, f"depth {statuses[500]} -> 500 (statuses seen: {sorted(statuses)})"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor], content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = await client.post("/v1/predict", content=json.dumps(GOOD), headers=headers)
    assert_error(response, 415, "invalid_request")
    assert predict_calls(predictors) == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.api+json", "APPLICATION/JSON"]
)
async def test_json_media_types_are_accepted(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post("/v1/predict", content=json.dumps(GOOD), headers={"content-type": content_type})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"inputs": {"question": "q"}}, "model"),
        ({"model": "qa"}, "inputs"),
        ({"model": "qa", "inputs": {"question": "q"}, "temperature": 2}, "temperature"),
        ({"model": "qa", "inputs": "q"}, "inputs"),
        ({"model": "", "inputs": {}}, "model"),
        ({"model": "qa", "inputs": {}, "cache": "maybe"}, "cache"),
        ([1, 2, 3], "body"),
        ({"model": "qa", "inputs": {}}, "question"),
        ({"model": "qa", "inputs": {"question": "q", "context": "c"}}, "context"),
    ],
    ids=[
        "no-model",
        "no-inputs",
        "extra-field",
        "inputs-not-object",
        "empty-model",
        "bad-cache",
        "not-object",
        "missing-input",
        "unknown-input",
    ],
)
async def test_shape_errors_are_422_naming_the_field(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor], body: Any, field: str
) -> None:
    response = await client.post("/v1/predict", json=body)
    err = assert_error(response, 422, "invalid_request")
    assert f"'{field}'" in err["message"], err["message"]
    assert predict_calls(predictors) == 0


async def test_extra_field_message_says_unknown(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/predict", json={**GOOD, "temperature": 2})
    assert assert_error(response, 422, "invalid_request")["message"] == "field 'temperature': unknown field"


async def test_unknown_model_is_404(client: httpx.AsyncClient, predictors: dict[str, FakePredictor]) -> None:
    response = await client.post("/v1/predict", json={"model": "gpt-5", "inputs": {"question": "q"}})
    err = assert_error(response, 404, "unknown_model")
    assert "gpt-5" in err["message"]
    assert predict_calls(predictors) == 0


async def test_error_uses_the_request_id_header(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/predict", json={"model": "nope", "inputs": {}}, headers={"x-request-id": "abc-123"}
    )
    assert_error(response, 404, "unknown_model", request_id="abc-123")


async def test_error_without_a_request_id_gets_a_fresh_one(client: httpx.AsyncClient) -> None:
    ids = set()
    for _ in range(2):
        response = await client.post("/v1/predict", json={"model": "nope", "inputs": {}})
        ids.add(assert_error(response, 404, "unknown_model")["request_id"])
    assert len(ids) == 2


async def test_retryable_errors_carry_retry_after(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    predictors["qa"].fail(Overloaded("model 'qa' provider is rate limiting; retry later", retry_after_s=9.2))
    response = await client.post("/v1/predict", json=GOOD)
    assert_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == "10"


async def test_unexpected_exception_is_an_opaque_500(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    predictors["qa"].fail(RuntimeError("leaked sk-canary-123 from /srv/app/secret.py"))
    response = await client.post("/v1/predict", json=GOOD, headers={"x-request-id": "rid-500"})
    err = assert_error(response, 500, "internal", request_id="rid-500")
    assert "rid-500" in err["message"]
    assert "sk-canary-123" not in response.text and "/srv" not in response.text


async def test_infinite_retry_hint_still_gets_our_error_body(
    app: Starlette, predictors: dict[str, FakePredictor]
) -> None:
    predictors["qa"].fail(Overloaded("busy", retry_after_s=float("inf")))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/predict", json=GOOD)
    assert_error(response, 503, "overloaded")


# ----------------------------------------------------------------------------- success


async def test_successful_predict(
    client: httpx.AsyncClient, core: RouterCore, predictors: dict[str, FakePredictor]
) -> None:
    response = await client.post("/v1/predict", json=GOOD, headers={"x-request-id": "ok-1"})
    assert response.status_code == 200, response.text
    body = PredictResponse.model_validate(response.json())
    assert set(response.json()) == set(PredictResponse.model_fields)
    assert body.request_id == "ok-1"
    assert (body.model, body.variant, body.program_version, body.cached) == ("qa", "default", "v1", False)
    assert body.outputs == fake_outputs(QUESTION)
    assert (body.usage.input_tokens, body.usage.output_tokens) == (11, 7)
    assert response.headers["x-cache"] == "MISS"
    assert response.headers["x-model-variant"] == "default"
    assert response.headers["x-response-time"].endswith("ms")
    await core.drain()

    again = await client.post("/v1/predict", json=GOOD)
    assert again.headers["x-cache"] == "HIT-MEMORY"
    assert again.json()["cached"] is True
    assert predict_calls(predictors) == 1


async def test_cache_false_in_the_body(client: httpx.AsyncClient, fake_cache: FakeCache) -> None:
    response = await client.post("/v1/predict", json={**GOOD, "cache": False})
    assert response.headers["x-cache"] == "BYPASS"
    assert fake_cache.get_calls == []


# ----------------------------------------------------------------------------- other endpoints


async def test_health(client: httpx.AsyncClient, predictors: dict[str, FakePredictor]) -> None:
    predictors["qa"].info_fail_with = ConnectionError("down")  # liveness does not ask anyone
    response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_ready_200_and_503(client: httpx.AsyncClient, predictors: dict[str, FakePredictor]) -> None:
    ok = await client.get("/ready")
    assert ok.status_code == 200
    assert ok.json()["ready"] is True
    assert set(ok.json()["models"]) == {"qa", "classify"}

    predictors["classify"].info_fail_with = ConnectionError("replica starting")
    down = await client.get("/ready")
    assert down.status_code == 503
    assert down.json()["ready"] is False
    assert down.json()["models"]["classify"] == {"ready": False, "error": "ConnectionError"}


async def test_models_endpoint(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    models = response.json()["models"]
    assert [m["name"] for m in models] == ["qa", "classify"]
    assert set(models[0]) == {"name", "description", "program_version", "inputs", "outputs", "lm", "variants",
                              "pin_variants"}


async def test_models_endpoint_errors_use_the_error_body(
    client: httpx.AsyncClient, predictors: dict[str, FakePredictor]
) -> None:
    # A predictor that cannot describe itself (starting, dead) is a retryable 503, whatever it raised.
    predictors["qa"].info_fail_with = UnknownModel("gone")
    response = await client.get("/v1/models", headers={"x-request-id": "m-1"})
    assert_error(response, 503, "overloaded", request_id="m-1")
    assert response.headers["Retry-After"] == "1"


async def test_index(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.json() == {
        "service": "unit",
        "version": __version__,
        "models": ["qa", "classify"],
        "links": {"predict": "POST /v1/predict", "models": "/v1/models", "health": "/health", "ready": "/ready",
                  "costs": "/costs", "config": "/config"},
    }


async def test_predict_is_post_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/predict")).status_code == 405
