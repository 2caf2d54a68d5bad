"""The shared cache under real Redis faults (issue 3; RELIABILITY C1-C7).

Two applications share one real redis-server under one key prefix:
- ``/ra``: memory tier (max 200 entries) in front of Redis, four qa-shaped models;
- ``/rb``: memory tier and the router's near cache disabled, so every hit must come from Redis.
Faults are real: the redis-server process is killed with SIGKILL or frozen with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.cache import cache_key

from .harness import LMSim, RedisProcess, ServeCluster, dspy_app, serve_config, sim_model, wait_for

pytestmark = pytest.mark.integration

PREFIX = "itest"
QA = "serve_app.examples:build_qa"
MEMORY_MAX = 200


def _config(sim: LMSim, redis: RedisProcess, qa_state: str = "configs/states/qa_v1.json") -> dict[str, Any]:
    redis_cfg = {"url": redis.url}
    app_a = dspy_app(
        "redis_a", "/ra",
        [
            sim_model("qa", sim.api_base, QA),
            sim_model("qa_warm", sim.api_base, QA, lm={"temperature": 0.7}),
            sim_model("ask", sim.api_base, QA),
            sim_model("ask_fast", sim.api_base, QA, lm={"temperature": 0.7, "timeout_s": 0.5}, timeout_s=1.0),
        ],
        cache={"key_prefix": PREFIX, "memory_max_entries": MEMORY_MAX, "redis": redis_cfg},
        deployments=[{"name": "qa", "user_config": {"state": qa_state}}],
    )
    app_b = dspy_app(
        "redis_b", "/rb", [sim_model("qa", sim.api_base, QA)],
        cache={"key_prefix": PREFIX, "memory_max_entries": 0, "near_max_entries": 0, "redis": redis_cfg},
    )
    return serve_config(app_a, app_b)


@pytest.fixture(scope="module")
def apps(cluster: ServeCluster, lmsim: LMSim, redis_proc: RedisProcess) -> Iterator[ServeCluster]:
    cluster.deploy(_config(lmsim, redis_proc))
    yield cluster


@pytest.fixture
def env(apps: ServeCluster, sim: LMSim, redis_srv: RedisProcess) -> tuple[ServeCluster, LMSim, RedisProcess]:
    # Each test starts with a healthy simulator, an empty ledger and an empty, running Redis.
    # A Redis tier's breaker may still be open from a previous fault: wait until both apps'
    # writes land again.
    with httpx.Client(base_url=apps.base_url, timeout=30) as c:
        def redis_back() -> bool:
            redis_srv.client().flushall()
            for app in ("ra", "rb"):
                c.post(f"/{app}/v1/predict", json={"model": "qa", "inputs": {"question": f"probe {time.time_ns()}"}})
            tiers_closed = all(c.get(f"/{app}/ready").json()["cache"]["redis"]["state"] == "CLOSED"
                               for app in ("ra", "rb"))
            return tiers_closed and len(list(redis_srv.client().scan_iter(match=f"{PREFIX}:p:*"))) >= 2

        wait_for(redis_back, 30, "both apps' Redis tiers to accept writes", interval_s=0.5)
    redis_srv.client().flushall()
    sim.reset()
    return apps, sim, redis_srv


def post(client: httpx.Client, app: str, model: str, inputs: dict[str, Any], **extra: Any) -> httpx.Response:
    return client.post(f"/{app}/v1/predict", json={"model": model, "inputs": inputs, **extra})


def redis_keys(redis: RedisProcess) -> list[bytes]:
    """Prediction keys (the cost book's hashes live under the same prefix)."""
    return list(redis.client().scan_iter(match=f"{PREFIX}:p:*", count=1000))


def test_two_apps_share_hits_through_redis(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    inputs = {"question": f"shared {time.time_ns()}"}
    first = post(http, "ra", "qa", inputs)
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    wait_for(lambda: redis_keys(redis), 5, "the write-back to reach Redis")
    second = post(http, "rb", "qa", inputs)
    assert second.status_code == 200, second.text
    assert second.headers["X-Cache"] == "HIT-REDIS"
    assert second.json()["cached"] is True
    assert second.json()["outputs"] == first.json()["outputs"]
    assert post(http, "ra", "qa", inputs).headers["X-Cache"] == "HIT-MEMORY"
    assert sim.calls() == 1


class Load:
    """Background closed-loop load; records (status, latency_s, x-cache) per request."""

    def __init__(self, base_url: str, app: str, threads: int = 4, distinct: int = 40) -> None:
        self.base_url, self.app, self.threads, self.distinct = base_url, app, threads, distinct
        self.results: list[tuple[float, int, float, str]] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            i = 0
            while not self._stop.is_set():
                # A mix: repeated inputs (hits) and fresh ones (misses that write back).
                q = f"load {i % self.distinct}" if i % 2 else f"fresh {worker} {i} {time.time_ns()}"
                t0 = time.monotonic()
                try:
                    r = post(c, self.app, "qa", {"question": q})
                    self.results.append((t0, r.status_code, time.monotonic() - t0, r.headers.get("X-Cache", "")))
                except httpx.HTTPError:
                    self.results.append((t0, 0, time.monotonic() - t0, ""))
                i += 1

    def __enter__(self) -> "Load":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)

    def failures(self) -> list[tuple[float, int, float, str]]:
        return [r for r in self.results if r[1] != 200]


def test_c1_redis_killed_mid_load_then_restarted(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    caches = cluster.actor_ids("redis_a:Cache")
    with Load(cluster.base_url, "ra") as load:
        time.sleep(1.5)
        redis.kill9()
        killed_at = time.monotonic()
        time.sleep(3.0)
        redis.start()  # same port, empty
        restarted_at = time.monotonic()
        # Back within 10 s of the restart: fresh misses are written to Redis again.
        wait_for(lambda: redis_keys(redis), 10, "the Redis tier to come back after restart", interval_s=0.2)
        back_after = time.monotonic() - restarted_at
        time.sleep(0.5)
    assert load.results, "no load was sent"
    assert load.failures() == [], f"{len(load.failures())} failed requests of {len(load.results)}"
    # Skipped within 1 s: requests that started >1 s after the kill do not wait on Redis. On a
    # loaded 2-core box the bound is what requests cost before the kill plus a margin; a
    # request that waited on the dead Redis (redis-py's defaults) would take many seconds.
    before = [lat for t0, _s, lat, _c in load.results if t0 < killed_at]
    during = [lat for t0, _s, lat, _c in load.results if killed_at + 1.0 < t0 < restarted_at]
    assert during and before, "no requests before or during the outage"
    assert max(during) < max(before) + 1.0, (
        f"a request waited {max(during):.3f}s during the outage (before: {max(before):.3f}s)")
    assert back_after < 10.0
    assert cluster.actor_ids("redis_a:Cache") == caches, "a Cache replica restarted"


def test_c2_redis_frozen_no_request_waits_past_the_cache_budget(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    warm = [{"question": f"frozen {i} {time.time_ns()}"} for i in range(20)]
    for inputs in warm:  # in Redis now; /rb has no memory tier, so these hits need Redis
        assert post(http, "ra", "qa", inputs).status_code == 200
    wait_for(lambda: len(redis_keys(redis)) >= 20, 5, "write-backs")
    assert post(http, "rb", "qa", warm[0]).headers["X-Cache"] == "HIT-REDIS"
    baseline = []
    for inputs in warm[1:6]:
        t0 = time.monotonic()
        post(http, "rb", "qa", inputs)
        baseline.append(time.monotonic() - t0)

    redis.sigstop()
    try:
        latencies, statuses, caches = [], [], []
        stop_at = time.monotonic() + 10.0
        i = 0
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            r = post(http, "rb", "qa", warm[6 + i % 14])
            latencies.append(time.monotonic() - t0)
            statuses.append(r.status_code)
            caches.append(r.headers.get("X-Cache"))
            i += 1
    finally:
        redis.sigcont()
    assert set(statuses) == {200}
    assert "HIT-REDIS" not in caches  # Redis answered nothing while frozen
    # Each request: what it cost before the freeze, plus at most one cache budget (100 ms) on
    # Redis, plus scheduling noise on a 2-core box. Without the Redis timeouts (redis-py's
    # defaults) a request would hang for the whole 10 s freeze. The noise of a shared host
    # (CPU steal) can stretch one request past the tight bound, so that one holds for 95 % of
    # them, and no request at all may come near the freeze.
    bound = max(baseline) + 0.75
    ordered = sorted(latencies)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    assert p95 < bound, f"p95 {p95:.3f}s (baseline {max(baseline):.3f}s, {len(ordered)} requests)"
    assert ordered[-1] < max(baseline) + 2.5, f"slowest request {ordered[-1]:.3f}s (baseline {max(baseline):.3f}s)"


def test_c3_corrupt_pickled_and_foreign_values_are_misses_never_unpickled(env: Any, http: httpx.Client,
                                                                          tmp_path: Path) -> None:
    cluster, sim, redis = env
    version = http.get("/rb/v1/models").json()["models"][0]["program_version"]
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    planted = {
        "corrupt": b"\x00\xffnot json",
        "pickle": pickle.dumps({"v": 1, "value": Evil()}),
        "foreign": b'{"v": 1, "value": "just a string"}',
        "old-schema": b'{"v": 0, "value": {"outputs": {}}}',
    }
    lm = {"model": "openai/sim-qa", "temperature": 0.0, "max_tokens": 512}
    for name, raw in planted.items():
        inputs = {"question": f"planted {name} {time.time_ns()}"}
        key = cache_key(PREFIX, "qa", "default", version, lm, inputs)
        redis.client().set(key, raw, ex=60)
        r = post(http, "rb", "qa", inputs)
        assert r.status_code == 200, (name, r.text)
        assert r.headers["X-Cache"] == "MISS", name
        # The write-back replaced the bad value with a valid one.
        wait_for(lambda: redis.client().get(key) != raw, 15, f"{name} value replaced")
        assert post(http, "rb", "qa", inputs).headers["X-Cache"] == "HIT-REDIS", name
    assert not marker.exists(), "a planted pickle was unpickled"


def test_c3_redis_full_is_a_skipped_write_not_a_failure(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    client = redis.client()
    client.config_set("maxmemory-policy", "noeviction")
    # A 1-byte limit: Redis is "full" for every write (OOM refusals), reads still answer.
    client.config_set("maxmemory", "1")
    try:
        errors_before = _redis_set_errors(http, "rb")
        statuses = [post(http, "rb", "qa", {"question": f"full {i} {time.time_ns()}"}).status_code
                    for i in range(10)]
        assert statuses == [200] * 10
        # Every write was refused: a skipped write plus a counter each, never a failure.
        wait_for(lambda: _redis_set_errors(http, "rb") >= errors_before + 10, 5, "10 refused writes counted")
        assert redis_keys(redis) == []
    finally:
        client.config_set("maxmemory", "0")


def _redis_set_errors(http: httpx.Client, app: str) -> float:
    ops = http.get(f"/{app}/ready").json()["cache"]["ops"]
    # Refused writes are errors until the Redis tier's breaker opens, then skipped writes.
    return sum(o["value"] for o in ops
               if o["labels"] in ({"tier": "redis", "op": "set", "result": "error"},
                                  {"tier": "redis", "op": "set", "result": "skipped"}))


def test_c4_200_concurrent_identical_cold_requests_make_one_lm_call(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    sim.set_knobs(latency_ms=800)
    inputs = {"question": f"stampede {time.time_ns()}"}
    payload = httpx.Request("POST", f"{cluster.base_url}/ra/v1/predict",
                            json={"model": "qa", "inputs": inputs})
    raw = (f"POST /ra/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           f"content-length: {len(payload.content)}\r\n\r\n").encode() + payload.content

    # The leader's client sends the request and leaves before the answer.
    leader = socket.create_connection(("127.0.0.1", cluster.http_port))
    leader.sendall(raw)
    time.sleep(0.3)

    async def followers() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=30,
                                     limits=httpx.Limits(max_connections=200)) as c:
            return list(await asyncio.gather(*[
                c.post("/ra/v1/predict", json={"model": "qa", "inputs": inputs}) for _ in range(199)]))

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(asyncio.run, followers())
        time.sleep(0.2)
        leader.close()
        responses = future.result(60)
    assert [r.status_code for r in responses] == [200] * 199
    # One answer for all (compared as JSON objects: under a slow host a late follower can get it
    # from the Cache deployment after the write-back instead of from the flight).
    bodies = {json.dumps(r.json()["outputs"], sort_keys=True) for r in responses}
    assert len(bodies) == 1
    assert sim.calls() == 1, sim.ledger()  # one router replica: at most one LM call


def test_c5_one_lm_call_per_distinct_combination(env: Any, http: httpx.Client, lmsim: LMSim,
                                                 redis_proc: RedisProcess) -> None:
    cluster, sim, redis = env
    question = f"combo {time.time_ns()}"
    combos = [("qa", {}), ("qa_warm", {}), ("ask", {}), ("ask_fast", {})]  # 2 names x 2 temperatures
    for model, _ in combos:
        assert post(http, "ra", model, {"question": question}).headers["X-Cache"] == "MISS"
    assert sim.calls() == 4
    # The same JSON with its keys reordered (and other whitespace) is a hit.
    body = '{"inputs": {"question": "%s"}, "model": "qa"}' % question
    r = http.post("/ra/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.headers["X-Cache"] == "HIT-MEMORY"
    assert sim.calls() == 4
    # A new program version of qa is a new key: one more call, then hits again.
    v1 = http.get("/ra/v1/models").json()["models"][0]["program_version"]
    cluster.deploy(_config(lmsim, redis_proc, qa_state="configs/states/qa_v2.json"))
    try:
        wait_for(lambda: http.get("/ra/v1/models").json()["models"][0]["program_version"] != v1, 10,
                 "the router to learn qa's new version")
        r = post(http, "ra", "qa", {"question": question})
        assert r.status_code == 200 and r.headers["X-Cache"] == "MISS"
        v2 = r.json()["program_version"]
        assert v2 != v1
        again = post(http, "ra", "qa", {"question": question})
        assert again.headers["X-Cache"] == "HIT-MEMORY" and again.json()["program_version"] == v2
        assert sim.calls() == 5
    finally:
        cluster.deploy(_config(lmsim, redis_proc))


def test_c6_errors_timeouts_and_unparseable_outputs_are_not_cached(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    cases = [
        ("error", {"error_rate": 1.0, "error_status": 500}, "qa", 502, "upstream_error"),
        ("timeout", {"hang_rate": 1.0}, "ask_fast", 504, "upstream_timeout"),
        ("unparseable", {"malformed_rate": 1.0}, "qa", 502, "bad_program_output"),
    ]
    for name, knobs, model, status, code in cases:
        inputs = {"question": f"not cached {name} {time.time_ns()}"}
        sim.reset()
        sim.set_knobs(**knobs)
        bad = post(http, "ra", model, inputs)
        assert bad.status_code == status, (name, bad.text)
        assert bad.json()["error"]["code"] == code
        sim.reset()
        good = post(http, "ra", model, inputs)
        assert good.status_code == 200, (name, good.text)
        assert good.headers["X-Cache"] == "MISS", name
        assert sim.calls() >= 1, name


def test_c7_ttl_and_prefix_hygiene_after_a_run(env: Any, http: httpx.Client) -> None:
    cluster, sim, redis = env
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(
            lambda i: post(http, "ra", "qa", {"question": f"hygiene {i}"}).status_code, range(300)))
    assert statuses == [200] * 300
    # Under saturation the Redis tier may skip some writes (its breaker, by design): wait until
    # the background writes settle, then check the hygiene of every key that was written.
    counts: list[int] = []

    def settled() -> bool:
        counts.append(len(redis_keys(redis)))
        return len(counts) >= 3 and counts[-1] == counts[-3] and counts[-1] > 0

    wait_for(settled, 20, "background writes to settle", interval_s=0.5)
    assert counts[-1] >= 100, f"only {counts[-1]} of 300 answers reached Redis"
    client = redis.client()
    all_keys = list(client.scan_iter(count=1000))
    assert all(k.startswith(f"{PREFIX}:".encode()) for k in all_keys)
    ttls = [client.pttl(k) for k in all_keys]
    assert all(t > 0 for t in ttls), "a key without a TTL"
    ready = http.get("/ra/ready").json()
    assert ready["cache"]["memory_entries"] <= MEMORY_MAX
