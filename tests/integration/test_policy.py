"""Traffic policy on a real cluster (issue 6; RELIABILITY A1-A7): two router replicas, a real
redis-server holding the limits and budgets, the LM simulator behind every model.

One application ``/pa`` with API keys on (hashes, a mounted key file and a keys file), and
one ``/pb`` with keys off and a per-client-address limit. Faults are real: redis-server is
killed with SIGKILL while limits and budgets are enforced.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import (
    LMSim,
    RedisProcess,
    ServeCluster,
    dspy_app,
    serve_config,
    session_log_lines,
    sim_model,
    wait_for,
    wait_until_logged,
)

pytestmark = pytest.mark.integration

QA = "serve_app.examples:build_qa"
PREFIX = "ptest"
RAW = {name: f"{name}-key-{uuid.uuid4().hex}" for name in ("alice", "bob", "admin", "burst", "xff", "outage", "filed")}
# The spend model's prices make one simulated call cost a few cents (A4 uses ~$0.05).
SPEND_PRICES = {"input_usd_per_mtok": 150.0, "output_usd_per_mtok": 300.0, "max_tokens": 100}
VARIANT_B_SHARE = 0.3


def _sha(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _config(sim: LMSim, redis: RedisProcess, workdir: Path, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    (workdir / "filed.key").write_text(RAW["filed"] + "\n")
    (workdir / "keys.json").write_text(json.dumps([{"id": "bob", "sha256": _sha(RAW["bob"]), "models": ["qa"]}]))
    keys = [
        {"id": "alice", "sha256": _sha(RAW["alice"])},
        {"id": "admin", "sha256": _sha(RAW["admin"]), "admin": True},
        {"id": "burst", "sha256": _sha(RAW["burst"]), "rate_limit": {"requests_per_minute": 60}},
        {"id": "xff", "sha256": _sha(RAW["xff"]), "rate_limit": {"requests_per_minute": 100}},
        {"id": "outage", "sha256": _sha(RAW["outage"]), "rate_limit": {"requests_per_minute": 40},
         "budget": {"hard_usd": 5.0}},
        {"id": "filed", "key_file": str(workdir / "filed.key"), "models": ["qa"]},
    ]
    sim_lm = {"api_base": sim.api_base}
    breaker = {"min_calls": 2, "failure_rate_threshold": 0.5, "open_s": 60, "max_open_s": 120, "jitter_ratio": 0}
    models = [
        sim_model("qa", sim.api_base, QA, pin_variants=True, variants=[
            {"name": "a", "weight": 1 - VARIANT_B_SHARE},
            {"name": "b", "weight": VARIANT_B_SHARE,
             "lm": {"model": "openai/sim-qb", "timeout_s": 5.0, **sim_lm}},
        ]),
        sim_model("shift", sim.api_base, QA, breaker=breaker, variants=[
            {"name": "x", "weight": 1, "lm": {"model": "openai/sim-shx", "timeout_s": 5.0, **sim_lm}},
            {"name": "y", "weight": 1, "lm": {"model": "openai/sim-shy", "timeout_s": 5.0, **sim_lm}},
        ]),
        sim_model("spend", sim.api_base, QA, lm=SPEND_PRICES, budget={"hard_usd": 1.0, "soft_usd": 0.5}),
    ]
    cache = {"key_prefix": PREFIX, "redis": {"url": redis.url}}
    deployments = [{"name": "Router", "user_config": {"weights": weights or {}}}]
    app_a = dspy_app(
        "policy_a", "/pa", models, cache=cache, router_replicas=2, deployments=deployments,
        policy={"auth": {"enabled": True, "keys": keys, "keys_file": str(workdir / "keys.json")},
                "expected_router_replicas": 2},
    )
    # Its own key prefix: routers that share a prefix share limits and count each other as
    # live replicas (the outage share), and A3 counts on exactly /pa's two.
    app_b = dspy_app(
        "policy_b", "/pb", [sim_model("qa", sim.api_base, QA)], cache={**cache, "key_prefix": PREFIX + "_b"},
        router_replicas=2,
        policy={"rate_limit": {"requests_per_minute": 50}, "trusted_proxy_hops": 0, "expected_router_replicas": 2},
    )
    return serve_config(app_a, app_b)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sa_policy_") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def deployed(cluster: ServeCluster, lmsim: LMSim, redis_proc: RedisProcess, workdir: Path) -> Iterator[ServeCluster]:
    if redis_proc.proc is None or redis_proc.proc.poll() is not None:
        redis_proc.start()
    cluster.deploy(_config(lmsim, redis_proc, workdir))
    yield cluster


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {RAW[name]}"}


def predict(http: httpx.Client, model: str, question: str, key: str = "alice", prefix: str = "/pa",
            **extra: Any) -> httpx.Response:
    headers = {**(auth(key) if key else {}), **extra.pop("headers", {})}
    return http.post(f"{prefix}/v1/predict", json={"model": model, "inputs": {"question": question}, **extra},
                     headers=headers)


def fan_out(n: int, fn: Any, workers: int = 8) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(n)))


# ----------------------------------------------------------------------------- A5: who may call


def test_auth_matrix(deployed: ServeCluster, http: httpx.Client, redis_srv: RedisProcess, sim: LMSim) -> None:
    q = f"auth {time.time_ns()}"
    missing = predict(http, "qa", q, key="")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    bad = http.post("/pa/v1/predict", json={"model": "qa", "inputs": {"question": q}},
                    headers={"Authorization": "Bearer not-a-key-of-ours-at-all"})
    assert bad.status_code == 401 and bad.headers["WWW-Authenticate"] == "Bearer"
    forbidden = predict(http, "spend", q, key="bob")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert sim.calls() == 0
    # The keys file's key, the mounted key file's key and X-API-Key all work.
    assert predict(http, "qa", q, key="bob").status_code == 200
    assert predict(http, "qa", q, key="filed").status_code == 200
    assert http.post("/pa/v1/predict", json={"model": "qa", "inputs": {"question": q}},
                     headers={"X-API-Key": RAW["alice"]}).status_code == 200
    # Health needs no key; /config and /costs need an admin key; /v1/models shows what a key may call.
    for path in ("/pa/health", "/pa/ready", "/pa/"):
        assert http.get(path).status_code == 200, path
    assert http.get("/pa/config").status_code == 401
    assert http.get("/pa/config", headers=auth("bob")).status_code == 403
    assert http.get("/pa/costs", headers=auth("alice")).status_code == 403
    config = http.get("/pa/config", headers=auth("admin"))
    assert config.status_code == 200
    assert {k["id"] for k in config.json()["policy"]["auth"]["keys"]} >= {"alice", "admin", "burst"}
    assert all(_sha(raw) not in config.text and raw not in config.text for raw in RAW.values())
    assert http.get("/pa/costs", headers=auth("admin")).status_code == 200
    assert [m["name"] for m in http.get("/pa/v1/models", headers=auth("bob")).json()["models"]] == ["qa"]


# ----------------------------------------------------------------------------- A1: exact across replicas


def _wait_for_second(lo: float, hi: float) -> None:
    """Sleep until the wall clock's second-of-minute is within [lo, hi)."""
    while not (lo <= time.time() % 60 < hi):
        time.sleep(0.05)


def test_rate_limit_holds_across_two_replicas_and_the_window_edge(deployed: ServeCluster, http: httpx.Client,
                                                                  redis_srv: RedisProcess) -> None:
    # A burst just before a minute boundary, and more just after: a fixed window would admit
    # 60 + 60; the sliding window admits 60 (+1 at the edge) in total.
    _wait_for_second(55.0, 57.0)
    tag = time.time_ns()
    first = fan_out(45, lambda i: predict(http, "qa", f"burst {tag} {i % 5}", key="burst"))
    _wait_for_second(0.5, 3.0)
    second = fan_out(45, lambda i: predict(http, "qa", f"burst {tag} {i % 5}", key="burst"))
    responses = first + second
    assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
    admitted = [r for r in responses if r.status_code == 200]
    print(f"FIGURE A1: {len(admitted)} of 90 admitted across the minute edge (limit 60/min)")
    # A failed store call falls back to the local share and over-admits: say so when it happens.
    ops = http.get("/pa/ready").json().get("router", {}).get("ops", [])
    print("FIGURE A1 store errors (one router):", [o for o in ops if o["name"] in ("policy_store_ops", "ratelimit_checks")])
    assert 59 <= len(admitted) <= 61, len(admitted)
    assert all(r.status_code == 200 for r in first)  # 45 fit in the first window
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.headers["X-RateLimit-Limit"] == "60" for r in responses)
    assert all(r.headers["X-RateLimit-Remaining"] == "0" for r in refused)
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted)
    assert remaining[0] == 0 and remaining[-1] >= 14  # fell from 59-ish to 0
    # The 61st request within the window: refused, with a wait that ends inside a minute.
    late = predict(http, "qa", f"burst {tag} late", key="burst")
    assert late.status_code == 429 and 1 <= int(late.headers["Retry-After"]) <= 61


# ----------------------------------------------------------------------------- A2: spoofed X-Forwarded-For


def test_spoofed_forwarded_for_does_not_escape_the_limit(deployed: ServeCluster, http: httpx.Client,
                                                        redis_srv: RedisProcess) -> None:
    def spoofed(i: int, key: str = "xff", prefix: str = "/pa") -> httpx.Response:
        fake = f"{random.randint(1, 223)}.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        return predict(http, "qa", f"xff {i % 3}", key=key, prefix=prefix, headers={"X-Forwarded-For": fake})

    by_key = fan_out(1000, spoofed)
    print(f"FIGURE A2: {sum(r.status_code == 200 for r in by_key)} of 1000 admitted by key (100/min)")
    assert {r.status_code for r in by_key} <= {200, 429}
    assert 100 <= sum(r.status_code == 200 for r in by_key) <= 101
    # Keys off: the client address is the connection's peer (no trusted hops), not the header.
    by_addr = fan_out(120, lambda i: spoofed(i, key="", prefix="/pb"))
    print(f"FIGURE A2: {sum(r.status_code == 200 for r in by_addr)} of 120 admitted by address (50/min)")
    assert {r.status_code for r in by_addr} <= {200, 429}
    assert 50 <= sum(r.status_code == 200 for r in by_addr) <= 51


# ----------------------------------------------------------------------------- A4: a raced budget


def test_budget_raced_by_fifty_concurrent_requests(deployed: ServeCluster, http: httpx.Client,
                                                   redis_srv: RedisProcess, sim: LMSim) -> None:
    tag = time.time_ns()
    costs: list[float] = []
    answered: list[str] = []
    refused: list[httpx.Response] = []
    for burst in range(12):  # bursts of 50 concurrent distinct requests until the budget is gone
        questions = [f"spend {tag} {burst} {i}" for i in range(50)]
        rs = fan_out(50, lambda i: predict(http, "spend", questions[i]), workers=50)
        assert {r.status_code for r in rs} <= {200, 429}, [r.text for r in rs if r.status_code not in (200, 429)]
        for q, r in zip(questions, rs):
            if r.status_code == 200:
                costs.append(r.json()["usage"]["cost_usd"])
                answered.append(q)
            else:
                refused.append(r)
        if all(r.status_code == 429 for r in rs):
            break
    assert costs, "no request was admitted"
    max_cost = max(costs)
    spent = sum(costs)
    print(f"FIGURE A4: spent ${spent:.4f} of $1 in {len(costs)} calls (max ${max_cost:.4f}); {len(refused)} refused")
    # The promise: spend <= budget + in-flight x max cost (in-flight <= 50 here); with estimates
    # at least the largest cost seen, it stays at the budget itself plus rounding.
    assert spent <= 1.0 + 50 * max_cost, (spent, max_cost)
    assert spent <= 1.0 + max_cost, (spent, max_cost)
    # ... and the budget was used, not refused early: what is left is below one reservation
    # (0.18: the price bound of one call before a replica has seen a cost; measured ~$0.045 each).
    assert spent >= 1.0 - 0.18, spent
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    # After that: only this model answers budget_exceeded; cache hits still cost nothing.
    again = predict(http, "spend", f"spend {tag} after")
    assert again.status_code == 429 and again.json()["error"]["code"] == "budget_exceeded"
    assert 1 <= int(again.headers["Retry-After"]) <= 86_400
    hit = predict(http, "spend", answered[0])
    assert hit.status_code == 200 and hit.json()["cached"] and hit.json()["usage"]["cost_usd"] == 0
    assert predict(http, "qa", f"spend {tag} other model").status_code == 200
    # Redis holds the cluster's number: what the responses were charged.
    day = time.strftime("%Y-%m-%d", time.gmtime())
    stored = redis_srv.client().hgetall(f"{PREFIX}:budget:model:spend:{day}")
    assert abs(float(stored[b"spent"]) - spent) < 1e-6, (stored, spent)
    # ... and holds no reservation any more: every one was settled exactly once.
    assert abs(float(stored[b"committed"]) - spent) < 1e-6, (stored, spent)
    assert not [k for k in stored if k.startswith(b"r:")], stored


# ----------------------------------------------------------------------------- variants


def test_variant_weights_sticky_sessions_and_pins(deployed: ServeCluster, http: httpx.Client,
                                                  redis_srv: RedisProcess) -> None:
    q = f"variants {time.time_ns()}"
    rs = fan_out(1000, lambda i: predict(http, "qa", q, headers={"X-Session-ID": uuid.uuid4().hex}))
    assert all(r.status_code == 200 for r in rs)
    seen = Counter(r.json()["variant"] for r in rs)
    assert set(seen) == {"a", "b"}
    assert all(r.headers["X-Model-Variant"] == r.json()["variant"] for r in rs)
    share = seen["b"] / 1000
    print(f"FIGURE variants: {dict(seen)} of 1000 sessions (b weight {VARIANT_B_SHARE})")
    # Binomial sd at n=1000, p=0.3 is 1.45 points: 5 points is about 3.4 sd.
    assert abs(share - VARIANT_B_SHARE) < 0.05, seen
    # Sticky: a session keeps its variant; without a session the key decides.
    for _ in range(5):
        session = uuid.uuid4().hex
        got = {predict(http, "qa", q, headers={"X-Session-ID": session}).json()["variant"] for _ in range(10)}
        assert len(got) == 1
    assert len({predict(http, "qa", q).json()["variant"] for _ in range(10)}) == 1
    # Pinning where the model allows it; an unknown variant names the field.
    assert predict(http, "qa", q, variant="b").json()["variant"] == "b"
    unknown = predict(http, "qa", q, variant="zzz")
    assert unknown.status_code == 422 and "variant" in unknown.json()["error"]["message"]
    assert predict(http, "spend", q, variant="default").status_code == 403


def test_weights_change_with_a_redeploy_and_no_restart(deployed: ServeCluster, http: httpx.Client, lmsim: LMSim,
                                                       redis_proc: RedisProcess, workdir: Path) -> None:
    routers = deployed.actor_ids("policy_a:Router")
    assert len(routers) == 2
    deployed.deploy(_config(lmsim, redis_proc, workdir, weights={"qa": {"a": 0, "b": 1}}))
    try:
        q = f"reweighted {time.time_ns()}"

        def all_b() -> bool:
            rs = [predict(http, "qa", q, headers={"X-Session-ID": uuid.uuid4().hex}) for _ in range(30)]
            return all(r.json()["variant"] == "b" for r in rs)

        wait_for(all_b, 15, "the new weights on every router replica")
        assert deployed.actor_ids("policy_a:Router") == routers  # reconfigured, not restarted
    finally:
        deployed.deploy(_config(lmsim, redis_proc, workdir))


def test_an_open_breaker_shifts_its_variant_traffic(deployed: ServeCluster, http: httpx.Client, sim: LMSim,
                                                    redis_srv: RedisProcess) -> None:
    sim.set_knobs(model="sim-shx", error_rate=1.0, error_status=500)
    tag = time.time_ns()
    # Until x's breaker opens (2 failed calls), some x requests fail with the provider's error.
    early = [predict(http, "shift", f"shift {tag} {i}", headers={"X-Session-ID": f"s{i}"}) for i in range(12)]
    assert sum(r.status_code == 502 for r in early) <= 3, [r.status_code for r in early]
    later = fan_out(40, lambda i: predict(http, "shift", f"shift {tag} later {i}",
                                          headers={"X-Session-ID": f"t{i}"}))
    assert all(r.status_code == 200 for r in later), [r.text for r in later if r.status_code != 200]
    assert {r.json()["variant"] for r in later} == {"y"}
    assert all(r.json()["degraded"] is False for r in later)


# ----------------------------------------------------------------------------- A6: hygiene under policy


def test_bad_input_is_refused_fast_with_no_lm_call(deployed: ServeCluster, http: httpx.Client, sim: LMSim,
                                                   redis_srv: RedisProcess) -> None:
    headers = {**auth("alice"), "content-type": "application/json"}
    cases = [
        (b'{"model": "qa", "inputs": {"question": "' + b"x" * (2 * 1024 * 1024) + b'"}}', headers, 413),
        (b"{not json", headers, 400),
        (b"[" * 5000 + b"]" * 5000, headers, 400),
        (b'{"model": "qa", "inputs": {}}', {**headers, "content-type": "text/plain"}, 415),
        (b'{"model": "qa", "inputs": {}}', headers, 422),
        (b'{"model": "qa", "inputs": {"question": "q", "extra": 1}}', headers, 422),
    ]
    breaker_before = http.get("/pa/ready").json()["models"]["qa.a"]["breaker"]
    for content, hdrs, status in cases:
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            r = http.post("/pa/v1/predict", content=content, headers=hdrs)
            timings.append(time.perf_counter() - t0)
            assert r.status_code == status, (status, r.text[:200])
        assert statistics.median(timings) < 0.05, (status, timings)

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "qa", "inputs": {"question": "'
        for _ in range(2048):
            yield b"y" * 1024
        yield b'"}}'

    assert http.post("/pa/v1/predict", content=chunks(), headers=headers).status_code == 413
    assert sim.calls() == 0
    assert http.get("/pa/ready").json()["models"]["qa.a"]["breaker"] == breaker_before == "CLOSED"


# ----------------------------------------------------------------------------- A3: Redis down


def test_redis_down_limits_fall_back_to_a_local_share(deployed: ServeCluster, http: httpx.Client,
                                                       redis_srv: RedisProcess) -> None:
    tag = time.time_ns()
    assert predict(http, "qa", f"outage {tag} warm", key="outage").status_code == 200
    redis_srv.kill9()
    try:
        rs = fan_out(100, lambda i: predict(http, "qa", f"outage {tag} {i % 10}", key="outage"))
        budget = fan_out(10, lambda i: predict(http, "spend", f"outage {tag} spend {i}", key="outage"))
    finally:
        redis_srv.start()
    statuses = Counter(r.status_code for r in rs + budget)
    assert set(statuses) <= {200, 429}, statuses
    admitted = sum(r.status_code == 200 for r in rs)
    print(f"FIGURE A3: {admitted} of 100 admitted with Redis down (40/min over 2 replicas); {dict(statuses)}")
    # Two replicas, each enforcing 40 / 2 live replicas; the warm-up request is the one before.
    assert 1 <= admitted <= 40, admitted
    local = [r for r in rs if r.status_code == 200]
    assert all(r.headers["X-RateLimit-Limit"] == "20" for r in local), {r.headers["X-RateLimit-Limit"] for r in local}
    assert all(r.json()["error"]["code"] in ("rate_limited", "budget_exceeded")
               for r in rs + budget if r.status_code == 429)


# ----------------------------------------------------------------------------- A7: keys never leak


def test_api_keys_appear_in_no_response_or_log_line(deployed: ServeCluster, http: httpx.Client,
                                                    redis_srv: RedisProcess) -> None:
    responses = [
        http.post("/pa/v1/predict", json={"model": "qa", "inputs": {"question": "x"}},
                  headers={"Authorization": f"Bearer {RAW['alice']}x"}),
        http.get("/pa/config", headers=auth("admin")),
        http.get("/pa/costs", headers=auth("admin")),
        predict(http, "qa", f"leak {time.time_ns()}", key="alice"),  # last: its log line ends the wait
    ]
    for r in responses:
        for raw in RAW.values():
            assert raw not in r.text and all(raw not in v for v in r.headers.values())
    wait_until_logged(responses[-1].headers["X-Request-ID"])  # the replicas flushed what came before
    for line in session_log_lines():
        for raw in RAW.values():
            assert raw not in line, f"an API key in a log line: {line[:120]}"
