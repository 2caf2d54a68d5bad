"""Predictions over real HTTP through Ray Serve, the LM simulator answering (issue 2)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from serve_app.schemas import PredictResponse

from .harness import LMSim, ServeCluster, body_of, dspy_app, serve_config, sim_model

pytestmark = pytest.mark.integration

PREFIX = "/p"
MAX_BODY = 4096


def _config(sim: LMSim, qa_state: str = "configs/states/qa_v1.json") -> dict[str, Any]:
    models = [
        sim_model("qa", sim.api_base, "serve_app.examples:build_qa"),
        sim_model("classify", sim.api_base, "serve_app.examples:build_classifier",
                  state="configs/states/classify.json"),
        sim_model("pipeline", sim.api_base, "serve_app.examples:build_pipeline"),
    ]
    return serve_config(
        dspy_app(
            "predict_http", PREFIX, models,
            limits={"max_body_bytes": MAX_BODY, "request_timeout_s": 20},
            deployments=[{"name": "qa", "user_config": {"state": qa_state}}],
        )
    )


@pytest.fixture(scope="module")
def deployed(cluster: ServeCluster, lmsim: LMSim) -> Iterator[ServeCluster]:
    cluster.deploy(_config(lmsim))
    yield cluster


def predict(http: httpx.Client, model: str, inputs: dict[str, Any], **extra: Any) -> httpx.Response:
    return http.post(f"{PREFIX}/v1/predict", json={"model": model, "inputs": inputs, **extra})


EXPECTED_TYPES = {
    "qa": {"reasoning": str, "answer": str},
    "classify": {"sentiment": str, "confidence": float},
    "pipeline": {"summary": str, "title": str, "keywords": list, "word_count": int, "is_technical": bool},
}
INPUTS = {
    "qa": {"question": "What is Ray Serve?"},
    "classify": {"text": "The update broke everything."},
    "pipeline": {"document": "Ray Serve scales DSPy programs across a cluster."},
}


@pytest.mark.parametrize("model", ["qa", "classify", "pipeline"])
def test_every_example_program_predicts_over_http(deployed: ServeCluster, http: httpx.Client, sim: LMSim,
                                                   model: str) -> None:
    r = predict(http, model, INPUTS[model], cache=False)
    assert r.status_code == 200, r.text
    body = PredictResponse.model_validate(r.json())
    assert body.model == model and body.variant == "default" and not body.cached
    assert r.headers["X-Request-ID"] == body.request_id
    assert r.headers["X-Cache"] == "BYPASS"
    for field, typ in EXPECTED_TYPES[model].items():
        assert isinstance(body.outputs[field], typ), (field, body.outputs)
    if model == "classify":
        assert body.outputs["sentiment"] in {"positive", "negative", "neutral"}
    assert body.usage.input_tokens > 0 and body.usage.output_tokens > 0
    # The pipeline calls its LM twice; usage covers both calls.
    assert sim.calls() == (2 if model == "pipeline" else 1)


def test_fifty_concurrent_distinct_requests_all_correct(deployed: ServeCluster, http: httpx.Client,
                                                        sim: LMSim) -> None:
    questions = [f"Question number {i}?" for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda q: predict(http, "qa", {"question": q}), questions))
    assert [r.status_code for r in responses] == [200] * 50, [body_of(r) for r in responses if r.status_code != 200]
    for q, r in zip(questions, responses):
        assert q in r.json()["outputs"]["answer"]  # the simulator's answer names its input
    assert len({r.json()["request_id"] for r in responses}) == 50
    assert sim.calls() == 50


def test_repeated_request_is_served_from_cache_without_lm_calls(deployed: ServeCluster, http: httpx.Client,
                                                                sim: LMSim) -> None:
    inputs = {"question": f"cache me {time.time_ns()}"}
    first = predict(http, "qa", inputs)
    assert first.status_code == 200 and first.headers["X-Cache"] == "MISS"
    calls = sim.calls()
    for _ in range(5):
        again = predict(http, "qa", inputs)
        assert again.status_code == 200
        assert again.headers["X-Cache"] == "HIT-MEMORY"
        assert again.json()["cached"] is True
        assert again.json()["outputs"] == first.json()["outputs"]
        assert again.json()["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "by_module": {}}
        assert again.headers["X-Cost-USD"] == "0"
    assert sim.calls() == calls


@pytest.mark.parametrize(
    ("content", "headers", "status", "field"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, None),
        (b'{"model": "qa", "inputs": {"question": "x"}}', {"content-type": "text/plain"}, 415, None),
        (b'{"model": "nope", "inputs": {"question": "x"}}', {"content-type": "application/json"}, 404, None),
        (b'{"model": "qa", "inputs": {}}', {"content-type": "application/json"}, 422, "inputs.question"),
        (b'{"model": "qa", "inputs": {"question": "x", "extra": 1}}', {"content-type": "application/json"}, 422,
         "inputs.extra"),
        (b'{"model": "qa", "inputs": {"question": "x"}, "tenant": 1}', {"content-type": "application/json"}, 422,
         "tenant"),
        (b"[" * 50_000, {"content-type": "application/json"}, 413, None),
        (b'{"model": "qa", "inputs": {"question": "' + b"x" * MAX_BODY + b'"}}',
         {"content-type": "application/json"}, 413, None),
    ],
    ids=["invalid-json", "text-plain", "unknown-model", "missing-field", "unknown-input", "extra-field",
         "deep-json-over-limit", "body-over-limit"],
)
def test_bad_requests_get_their_own_4xx_and_no_lm_call(deployed: ServeCluster, http: httpx.Client, sim: LMSim,
                                                       content: bytes, headers: dict[str, str], status: int,
                                                       field: str | None) -> None:
    r = http.post(f"{PREFIX}/v1/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "request_id"}
    assert err["request_id"] == r.headers["X-Request-ID"]
    if field:
        assert field.split(".")[-1] in err["message"]
    assert sim.calls() == 0


def test_chunked_body_over_limit_is_413(deployed: ServeCluster, http: httpx.Client, sim: LMSim) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "qa", "inputs": {"question": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'"}}'

    r = http.post(f"{PREFIX}/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "invalid_request"
    assert sim.calls() == 0


def test_models_health_ready_and_index(deployed: ServeCluster, http: httpx.Client) -> None:
    models = {m["name"]: m for m in http.get(f"{PREFIX}/v1/models").json()["models"]}
    assert set(models) == {"qa", "classify", "pipeline"}
    assert models["classify"]["outputs"][0] == {
        "name": "sentiment", "type": "Literal['positive', 'negative', 'neutral']", "description": ""}
    assert models["classify"]["inputs"][0]["description"] == "the text to classify"
    assert http.get(f"{PREFIX}/health").json() == {"status": "ok"}
    ready = http.get(f"{PREFIX}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    index = http.get(f"{PREFIX}/").json()
    assert index["models"] == ["qa", "classify", "pipeline"]


def test_hot_swap_of_program_version_without_restart_or_failure(deployed: ServeCluster, http: httpx.Client,
                                                                lmsim: LMSim) -> None:
    before_version = http.get(f"{PREFIX}/v1/models").json()["models"][0]["program_version"]
    replicas = deployed.actor_ids("predict_http:qa")
    assert replicas, "no qa replica found"

    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=deployed.base_url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post(f"{PREFIX}/v1/predict",
                                json={"model": "qa", "inputs": {"question": f"swap {i}"}, "cache": False})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["program_version"])
                i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deployed.deploy(_config(lmsim, qa_state="configs/states/qa_v2.json"))

        def swapped() -> bool:
            return http.get(f"{PREFIX}/v1/models").json()["models"][0]["program_version"] != before_version

        deadline = time.monotonic() + 30
        while not swapped() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # keep the load running across the swap for a moment
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    after_version = http.get(f"{PREFIX}/v1/models").json()["models"][0]["program_version"]
    assert after_version != before_version
    assert statuses and set(statuses) == {200}, f"failed requests during swap: {sorted(set(statuses))}"
    assert after_version in versions and before_version in versions
    assert deployed.actor_ids("predict_http:qa") == replicas, "the swap restarted a replica"
    # Swap back so the module's other tests see v1 whatever their order.
    deployed.deploy(_config(lmsim))
