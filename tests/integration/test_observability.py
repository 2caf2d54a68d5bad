"""Metrics, costs, logs and secrets after a scripted run (issue 5).

One app with JSON logs at DEBUG and a canary provider key in its replicas' environment sends a
known mix of traffic; then Ray's metrics endpoint is scraped and every ``ray_dspy_*`` family
must have moved by exactly what was sent, tokens must equal the simulator's ledger, dollars the
sum of the responses' ``X-Cost-USD``, and the canary must appear in no log line, header or body.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    CANARY,
    CANARY_ENV,
    LMSim,
    ServeCluster,
    dspy_app,
    serve_config,
    session_log_lines,
    sim_model,
    wait_for,
    wait_until_logged,
)

pytestmark = pytest.mark.integration

APP = "obs"
PRICES = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}


def _config(sim: LMSim) -> dict[str, Any]:
    lm = {**PRICES, "api_key_env": CANARY_ENV}
    app = dspy_app(
        APP, "/obs",
        [
            sim_model("qa", sim.api_base, "serve_app.examples:build_qa", lm=lm),
            sim_model("pipeline", sim.api_base, "serve_app.examples:build_pipeline", lm=lm),
            sim_model("flaky", sim.api_base, "serve_app.examples:build_qa", lm=lm,
                      breaker={"min_calls": 2, "failure_rate_threshold": 0.5, "open_s": 60, "max_open_s": 120,
                               "jitter_ratio": 0}),
        ],
    )
    config = serve_config(app)
    config["logging_config"] = {"encoding": "JSON", "log_level": "DEBUG", "enable_access_log": True}
    return config


@pytest.fixture(scope="module")
def deployed(cluster: ServeCluster, lmsim: LMSim) -> Iterator[ServeCluster]:
    cluster.deploy(_config(lmsim))
    yield cluster


def scrape(cluster: ServeCluster) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_dspy_") and sample.labels.get("application") == APP:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(v for labels, v in metrics.get(name, []) if all(labels.get(k) == w for k, w in match.items()))


def test_every_family_moves_by_exactly_what_was_sent(deployed: ServeCluster, http: httpx.Client,
                                                     sim: LMSim) -> None:
    stamp = time.time_ns()
    responses: list[httpx.Response] = []

    def predict(model: str, inputs: dict[str, Any], **extra: Any) -> httpx.Response:
        r = http.post("/obs/v1/predict", json={"model": model, "inputs": inputs, **extra})
        responses.append(r)
        return r

    # The router skips the Cache lookup of a first-time input once its key index is on
    # (serve_app/key_index.py: no Redis, one router); it syncs at start, then every 2 s.
    wait_for(lambda: http.get("/obs/ready").json()["router"]["lookup_index"] == "on", 30, "the key index")
    before = scrape(deployed)
    # 5 qa misses, 3 hits of the first, 1 bypass; 2 pipeline misses (two LM calls each).
    for i in range(5):
        assert predict("qa", {"question": f"q{i} {stamp}"}).headers["X-Cache"] == "MISS"
    for _ in range(3):
        assert predict("qa", {"question": f"q0 {stamp}"}).headers["X-Cache"] == "HIT-MEMORY"
    assert predict("qa", {"question": f"bypass {stamp}"}, cache=False).headers["X-Cache"] == "BYPASS"
    for i in range(2):
        assert predict("pipeline", {"document": f"doc {i} {stamp}"}).status_code == 200
    wait_for(lambda: sim.ledger()["by_outcome"].get("ok") == 5 + 1 + 4, 10, "the LM calls")
    ledger = sim.ledger()  # successful calls only, so far
    # Then a failing model: 2 provider errors trip its breaker, the 3rd is refused by it.
    sim.set_knobs(model="sim-flaky", error_rate=1.0, error_status=500)
    codes = [predict("flaky", {"question": f"f{i} {stamp}"}).json()["error"]["code"] for i in range(3)]
    assert codes == ["upstream_error", "upstream_error", "circuit_open"]
    # Admission errors at the door.
    assert http.post("/obs/v1/predict", json={"model": "nope", "inputs": {}}).status_code == 404
    assert http.post("/obs/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400

    # What every replica must have exported, as (family, labels) -> delta. Ray exports each
    # replica's series on its own clock (every second in tests), so the wait covers a series
    # from every replica that moved (Router, Cache, each predictor); then each is exact.
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        ("ray_dspy_predictions_total", (("model", "qa"), ("outcome", "ok"), ("cache", "MISS"))): 5,
        ("ray_dspy_predictions_total", (("model", "qa"), ("outcome", "ok"), ("cache", "HIT-MEMORY"))): 3,
        ("ray_dspy_predictions_total", (("model", "qa"), ("outcome", "ok"), ("cache", "BYPASS"))): 1,
        ("ray_dspy_predictions_total", (("model", "pipeline"), ("outcome", "ok"))): 2,
        ("ray_dspy_predictions_total", (("model", "flaky"), ("outcome", "error"))): 3,
        ("ray_dspy_errors_total", (("model", "flaky"), ("code", "upstream_error"))): 2,
        ("ray_dspy_errors_total", (("model", "flaky"), ("code", "circuit_open"))): 1,
        ("ray_dspy_errors_total", (("model", "-"), ("code", "unknown_model"))): 1,
        ("ray_dspy_errors_total", (("model", "-"), ("code", "invalid_request"))): 1,
        # every predict the core saw
        ("ray_dspy_prediction_latency_ms_count", ()): 5 + 3 + 1 + 2 + 3 + 1,
        # Cache: the 3 repeated hits are answered by the router's near cache, without a hop;
        # the 10 first-time cache-through inputs (qa 5, pipeline 2, flaky 3) by the key index,
        # without a hop either (the Cache never saw them); writes for the 7 cached successes.
        ("ray_dspy_cache_operations_total", (("tier", "near"), ("op", "get"), ("result", "hit"))): 3,
        ("ray_dspy_cache_operations_total", (("tier", "index"), ("op", "get"), ("result", "skip"))): 10,
        ("ray_dspy_cache_operations_total", (("tier", "memory"), ("op", "get"), ("result", "hit"))): 0,
        ("ray_dspy_cache_operations_total", (("tier", "memory"), ("op", "get"), ("result", "miss"))): 0,
        ("ray_dspy_cache_operations_total", (("tier", "memory"), ("op", "set"), ("result", "ok"))): 7,
        # Tokens equal the simulator's ledger of successful calls.
        ("ray_dspy_tokens_total", (("type", "input"),)): ledger["prompt_tokens"],
        ("ray_dspy_tokens_total", (("type", "output"),)): ledger["completion_tokens"],
    }

    def deltas(now: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
        return {f"{name}{dict(labels)}": total(now, name, **dict(labels)) - total(before, name, **dict(labels))
                for name, labels in expected}

    want = {f"{name}{dict(labels)}": v for (name, labels), v in expected.items()}

    def flaky_breaker_open(now: dict[str, list[tuple[dict[str, str], float]]]) -> bool:
        return any(labels.get("model") == "flaky" and v == 2 for labels, v in now.get("ray_dspy_breaker_state", []))

    header_usd = sum(float(r.headers["X-Cost-USD"]) for r in responses if r.status_code == 200)

    def exported() -> bool:
        now = scrape(deployed)
        got = deltas(now)
        usd = total(now, "ray_dspy_cost_usd_total") - total(before, "ray_dspy_cost_usd_total")
        return (flaky_breaker_open(now) and usd >= header_usd * (1 - 1e-6)
                and all(got[k] >= v for k, v in want.items()))

    wait_for(exported, 30, "every replica's metrics export")
    after = scrape(deployed)
    assert deltas(after) == want

    def d(name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    # Dollars equal the headers, and the headers the simulator's ledger at the configured prices.
    expected_usd = (ledger["prompt_tokens"] * 0.15 + ledger["completion_tokens"] * 0.60) / 1e6
    assert math.isclose(header_usd, expected_usd, rel_tol=1e-6)
    assert math.isclose(d("ray_dspy_cost_usd_total"), header_usd, rel_tol=1e-6)
    # Gauges: flaky's breaker is open, nothing is running.
    assert max(v for labels, v in after["ray_dspy_breaker_state"] if labels.get("model") == "flaky") == 2
    assert total(after, "ray_dspy_active_predictions") == 0

    # /costs: by model and module, since start and today (this app has no Redis: replica scope).
    costs = http.get("/obs/costs").json()
    assert costs["scope"].startswith("replica")
    pipeline = costs["today"]["pipeline"]["default"]
    assert pipeline["requests"] == 2
    assert set(pipeline["modules"]) == {"summarize", "extract"}
    assert sum(m["input_tokens"] for m in pipeline["modules"].values()) == pipeline["input_tokens"]
    assert math.isclose(sum(c["default"]["cost_usd"] for c in costs["total"].values()), header_usd, rel_tol=1e-6)
    # A pipeline response itemizes its two stages.
    usage = next(r for r in responses if r.json().get("model") == "pipeline").json()["usage"]
    assert set(usage["by_module"]) == {"summarize", "extract"}
    assert all(m["calls"] == 1 for m in usage["by_module"].values())


def _log_lines(cluster: ServeCluster) -> list[str]:
    return session_log_lines()


def test_json_log_line_per_prediction_and_no_secret_anywhere(deployed: ServeCluster, http: httpx.Client,
                                                             sim: LMSim) -> None:
    r = http.post("/obs/v1/predict", json={"model": "qa", "inputs": {"question": f"log me {time.time_ns()}"}})
    assert r.status_code == 200
    rid = r.headers["X-Request-ID"]

    def prediction_line() -> dict[str, Any] | None:
        for line in _log_lines(deployed):
            if rid in line and '"prediction"' in line:
                record = json.loads(line)
                if record.get("message") == "prediction":
                    return record
        return None

    record = wait_for(prediction_line, 15, "the prediction's JSON log line")
    assert record["request_id"] == rid
    assert record["model"] == "qa" and record["outcome"] == "ok" and record["cache"] == "MISS"
    assert record["input_tokens"] > 0 and record["cost_usd"] > 0 and record["latency_ms"] > 0

    # Provider failures and timeouts with debug logging on: the key leaks nowhere.
    sim.set_knobs(model="sim-qa", error_rate=1.0, error_status=500)
    bad = http.post("/obs/v1/predict", json={"model": "qa", "inputs": {"question": f"fail {time.time_ns()}"}})
    assert bad.status_code == 502
    seen = [r, bad, http.get("/obs/config"), http.get("/obs/costs"), http.get("/obs/ready"), http.get("/obs/")]
    for resp in seen:
        assert CANARY not in resp.text
        assert all(CANARY not in v for v in resp.headers.values())
    assert http.get("/obs/config").json()["models"][0]["lm"]["api_key_env"] == CANARY_ENV
    wait_until_logged(bad.headers["X-Request-ID"])  # the replicas flushed what came before
    leaks = [line[:200] for line in _log_lines(deployed) if CANARY in line]
    assert leaks == [], f"canary key in {len(leaks)} log lines, e.g. {leaks[:3]}"
