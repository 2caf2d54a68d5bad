"""The HTTP surface under a traffic policy: keys, admin endpoints, variants, rate-limit headers,
CORS, GZip and string lengths."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.config import AppArgs
from serve_app.http import build_http_app
from serve_app.keys import KeyRing, hash_key
from serve_app.metrics import Counters
from serve_app.policy import TrafficPolicy
from serve_app.policy_store import PolicyStore
from serve_app.router import RouterCore

from .conftest import FakeCache, FakeClock, FakePredictor, app_args

T0 = 6_000.0
USER_KEY = "sk-user-0123456789abcdef"
ADMIN_KEY = "sk-admn-0123456789abcdef"
QA = {"model": "qa", "inputs": {"question": "What is Ray Serve?"}}
CLASSIFY = {"model": "classify", "inputs": {"text": "great"}}


class LedgerCache(FakeCache):
    async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
        pass

    async def cost_report(self) -> dict[str, Any]:
        return {"scope": "replica", "total": {}, "today": {}, "by_key": {"total": {}, "today": {}}}


def predictors_for(args: AppArgs) -> dict[str, FakePredictor]:
    out = {}
    for m in args.models:
        for v in m.served_variants():
            out[v.deployment] = FakePredictor(m.name, inputs=("text",) if m.name == "classify" else ("question",))
    return out


def make_client(args: AppArgs, predictors: dict[str, FakePredictor] | None = None, rand: Any = lambda: 0.0,
                ) -> httpx.AsyncClient:
    counters = Counters()
    policy = TrafficPolicy(args, PolicyStore(None, "serve_app"), KeyRing.load(args.policy.auth, env={}),
                           wall=FakeClock(T0), counters=counters, rand=rand)
    core = RouterCore(args, predictors if predictors is not None else predictors_for(args), LedgerCache(),
                      clock=FakeClock(), counters=counters, policy=policy)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_http_app(core)), base_url="http://t")


def keyed_args(**over: Any) -> AppArgs:
    policy = {"auth": {"enabled": True, "keys": [
        {"id": "user", "sha256": hash_key(USER_KEY), "models": ["qa"]},
        {"id": "admin", "sha256": hash_key(ADMIN_KEY), "admin": True},
    ]}}
    policy.update(over.pop("policy", {}))
    return app_args(policy=policy, **over)


def user() -> dict[str, str]:
    return {"authorization": f"Bearer {USER_KEY}"}


def admin() -> dict[str, str]:
    return {"x-api-key": ADMIN_KEY}


@pytest.fixture
async def keyed() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(keyed_args()) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    return body


# ----------------------------------------------------------------------------- keys on /v1/predict


async def test_predict_without_a_key_is_401_missing(keyed: httpx.AsyncClient) -> None:
    r = await keyed.post("/v1/predict", json=QA)
    body = assert_error(r, 401, "unauthorized")
    assert "missing API key" in body["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer sk-wrong-0000000000000000"},
    {"authorization": f"Basic {USER_KEY}"},
    {"x-api-key": "sk-wrong-0000000000000000"},
])
async def test_predict_with_a_bad_key_is_401_invalid(keyed: httpx.AsyncClient, headers: dict[str, str]) -> None:
    r = await keyed.post("/v1/predict", json=QA, headers=headers)
    body = assert_error(r, 401, "unauthorized")
    assert "invalid API key" in body["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"


async def test_key_is_checked_before_the_body_is_read(keyed: httpx.AsyncClient) -> None:
    big = b'{"model": "qa", "inputs": {"question": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
    r = await keyed.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert_error(r, 401, "unauthorized")
    r = await keyed.post("/v1/predict", content=big, headers={"content-type": "application/json", **user()})
    assert_error(r, 413, "invalid_request")


async def test_key_is_checked_before_the_content_type(keyed: httpx.AsyncClient) -> None:
    r = await keyed.post("/v1/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(r, 401, "unauthorized")


async def test_predict_with_a_key(keyed: httpx.AsyncClient) -> None:
    for headers in (user(), {"x-api-key": USER_KEY}, admin()):
        r = await keyed.post("/v1/predict", json=QA, headers=headers)
        assert r.status_code == 200, r.text


async def test_model_the_key_may_not_call_is_403(keyed: httpx.AsyncClient) -> None:
    r = await keyed.post("/v1/predict", json=CLASSIFY, headers=user())
    assert_error(r, 403, "forbidden")
    assert (await keyed.post("/v1/predict", json=CLASSIFY, headers=admin())).status_code == 200


# ----------------------------------------------------------------------------- other endpoints


@pytest.mark.parametrize("path", ["/health", "/ready", "/"])
async def test_open_endpoints_need_no_key(keyed: httpx.AsyncClient, path: str) -> None:
    assert (await keyed.get(path)).status_code == 200


@pytest.mark.parametrize("path", ["/config", "/costs"])
async def test_admin_endpoints(keyed: httpx.AsyncClient, path: str) -> None:
    r = await keyed.get(path)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(await keyed.get(path, headers=user()), 403, "forbidden")
    r = await keyed.get(path, headers=admin())
    assert r.status_code == 200, r.text


async def test_config_for_the_admin_shows_no_digests(keyed: httpx.AsyncClient) -> None:
    text = (await keyed.get("/config", headers=admin())).text
    assert hash_key(USER_KEY) not in text and hash_key(ADMIN_KEY) not in text
    assert USER_KEY not in text and ADMIN_KEY not in text
    assert [k["id"] for k in json.loads(text)["policy"]["auth"]["keys"]] == ["user", "admin"]


async def test_admin_endpoints_are_open_with_auth_off() -> None:
    async with make_client(app_args()) as c:
        assert (await c.get("/config")).status_code == 200
        assert (await c.get("/costs")).status_code == 200


async def test_models_lists_only_what_the_key_may_call(keyed: httpx.AsyncClient) -> None:
    assert_error(await keyed.get("/v1/models"), 401, "unauthorized")
    r = await keyed.get("/v1/models", headers=user())
    assert [m["name"] for m in r.json()["models"]] == ["qa"]
    r = await keyed.get("/v1/models", headers=admin())
    assert [m["name"] for m in r.json()["models"]] == ["qa", "classify"]


# ----------------------------------------------------------------------------- variants


def variant_args(**over: Any) -> AppArgs:
    return app_args(models=[
        {"name": "qa", "program": "serve_app.examples:build_qa", "timeout_s": 2.0,
         "lm": {"model": "openai/sim-qa", "timeout_s": 1.0}, "pin_variants": True,
         "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 0}]},
    ], **over)


async def test_variant_in_body_and_header() -> None:
    predictors = predictors_for(variant_args())
    async with make_client(variant_args(), predictors) as c:
        r = await c.post("/v1/predict", json=QA)
        assert r.status_code == 200, r.text
        assert r.json()["variant"] == "a" and r.headers["x-model-variant"] == "a"
        r = await c.post("/v1/predict", json={**QA, "variant": "b"})
        assert r.json()["variant"] == "b" and r.headers["x-model-variant"] == "b"
        assert_error(await c.post("/v1/predict", json={**QA, "variant": "zzz"}), 422, "invalid_request")
    assert len(predictors["qa.a"].predict_calls) == len(predictors["qa.b"].predict_calls) == 1


async def test_models_lists_variants() -> None:
    async with make_client(variant_args()) as c:
        (m,) = (await c.get("/v1/models")).json()["models"]
    assert [(v["name"], v["weight"]) for v in m["variants"]] == [("a", 1.0), ("b", 0.0)]
    assert m["pin_variants"] is True


# ----------------------------------------------------------------------------- rate limits


def limited(rpm: int = 3, **over: Any) -> AppArgs:
    return app_args(policy={"rate_limit": {"requests_per_minute": rpm}, **over})


async def test_rate_limit_headers_on_success_then_429() -> None:
    async with make_client(limited(2)) as c:
        first = await c.post("/v1/predict", json=QA)
        second = await c.post("/v1/predict", json=QA)
        third = await c.post("/v1/predict", json=QA)
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == ("2", "1")
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert int(first.headers["x-ratelimit-reset"]) >= 1
    assert_error(third, 429, "rate_limited")
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-remaining"] == "0" and third.headers["x-ratelimit-limit"] == "2"


async def test_rate_limit_headers_on_errors_after_admission() -> None:
    async with make_client(limited(5)) as c:
        r422 = await c.post("/v1/predict", json={"model": "qa", "inputs": {"nope": 1}})
        r415 = await c.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"})
        r404 = await c.post("/v1/predict", json={"model": "nope", "inputs": {}})
    assert_error(r422, 422, "invalid_request")
    assert_error(r415, 415, "invalid_request")
    assert_error(r404, 404, "unknown_model")
    assert [r.headers["x-ratelimit-remaining"] for r in (r422, r415, r404)] == ["4", "3", "2"]


async def test_unauthenticated_requests_are_not_rate_limited_or_counted() -> None:
    args = keyed_args(policy={"rate_limit": {"requests_per_minute": 1}})
    async with make_client(args) as c:
        for _ in range(3):
            r = await c.post("/v1/predict", json=QA)
            assert_error(r, 401, "unauthorized")
            assert "x-ratelimit-limit" not in r.headers
        assert (await c.post("/v1/predict", json=QA, headers=user())).status_code == 200


async def test_each_key_has_its_own_rate_limit() -> None:
    args = keyed_args(policy={"rate_limit": {"requests_per_minute": 1}})
    async with make_client(args) as c:
        assert (await c.post("/v1/predict", json=QA, headers=user())).status_code == 200
        assert_error(await c.post("/v1/predict", json=QA, headers=user()), 429, "rate_limited")
        assert (await c.post("/v1/predict", json=QA, headers=admin())).status_code == 200


async def test_spoofed_forwarded_for_does_not_change_the_subject() -> None:
    async with make_client(limited(2)) as c:
        for spoof in ("1.1.1.1", "2.2.2.2"):
            r = await c.post("/v1/predict", json=QA, headers={"x-forwarded-for": spoof})
            assert r.status_code == 200
        r = await c.post("/v1/predict", json=QA, headers={"x-forwarded-for": "3.3.3.3"})
    assert_error(r, 429, "rate_limited")


# ----------------------------------------------------------------------------- CORS, GZip, strings


async def test_cors_preflight_allows_only_configured_origins() -> None:
    args = keyed_args(http={"cors_origins": ["https://app.example"]})
    preflight = {"access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    async with make_client(args) as c:
        ok = await c.options("/v1/predict", headers={"origin": "https://app.example", **preflight})
        bad = await c.options("/v1/predict", headers={"origin": "https://evil.example", **preflight})
    assert ok.status_code == 200, "a preflight needs no key"
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in bad.headers


async def test_cors_response_exposes_our_headers() -> None:
    args = app_args(http={"cors_origins": ["https://app.example"]})
    async with make_client(args) as c:
        r = await c.post("/v1/predict", json=QA, headers={"origin": "https://app.example"})
        plain = await c.post("/v1/predict", json=QA, headers={"origin": "https://evil.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    exposed = r.headers["access-control-expose-headers"].lower()
    assert "x-model-variant" in exposed and "x-ratelimit-remaining" in exposed and "retry-after" in exposed
    assert "access-control-allow-origin" not in plain.headers


async def test_no_cors_headers_without_cors_origins() -> None:
    async with make_client(app_args()) as c:
        r = await c.post("/v1/predict", json=QA, headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_gzip_for_large_responses_when_accepted() -> None:
    args = app_args(http={"gzip_min_bytes": 200})
    question = {"model": "qa", "inputs": {"question": "y" * 1000}}
    async with make_client(args) as c:
        zipped = await c.post("/v1/predict", json=question, headers={"accept-encoding": "gzip"})
        small = await c.get("/health", headers={"accept-encoding": "gzip"})
        unasked = await c.post("/v1/predict", json=question, headers={"accept-encoding": "identity"})
    assert zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.json()["outputs"]["answer"].endswith("y" * 10 + '"}')  # httpx decoded it
    assert "content-encoding" not in small.headers
    assert "content-encoding" not in unasked.headers


async def test_gzip_off_by_default() -> None:
    async with make_client(app_args()) as c:
        r = await c.post("/v1/predict", json={"model": "qa", "inputs": {"question": "y" * 1000}},
                         headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in r.headers


@pytest.mark.parametrize(("body", "status"), [
    ({"model": "qa", "inputs": {"question": "x" * 10}}, 200),
    ({"model": "qa", "inputs": {"question": "x" * 11}}, 400),
    ({"model": "qa", "inputs": {"question": "ok", "k" * 11: 1}}, 400),  # keys count too
    ({"model": "qa", "inputs": {"question": ["short", "x" * 11]}}, 400),  # so do strings in lists
])
async def test_max_string_chars(body: dict[str, Any], status: int) -> None:
    async with make_client(app_args(http={"max_string_chars": 10})) as c:
        r = await c.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    if status == 400:
        assert "longer than 10 characters" in r.json()["error"]["message"]
