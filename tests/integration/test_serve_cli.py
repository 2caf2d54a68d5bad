"""The shipped configs through the real ``serve`` CLI (issue 2, items 1 and 2).

The files are deployed as written except for the HTTP port: the test cluster's proxy listens
on a free port, so ``8000`` is rewritten to it (the simulator's ``api_base`` goes through the
same proxy)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from .harness import REPO, ServeCluster

pytestmark = pytest.mark.integration


def _with_port(cluster: ServeCluster, name: str, tmp_path: Path) -> Path:
    text = (REPO / name).read_text()
    assert "8000" in text
    out = tmp_path / Path(name).name
    out.write_text(text.replace("8000", str(cluster.http_port)))
    return out


def test_serve_deploy_default_config_then_another(cluster: ServeCluster, http: httpx.Client,
                                                  tmp_path: Path) -> None:
    cluster.deploy(_with_port(cluster, "serve_config.yaml", tmp_path))

    status = cluster.cli("status", "--address", cluster.dashboard_url)
    assert status.returncode == 0, status.stderr
    for expected in ("dspy:", "lmsim:", "status: RUNNING", "Router:", "Cache:", "qa:", "classify:", "pipeline:"):
        assert expected in status.stdout, status.stdout

    r = http.post("/v1/predict", json={"model": "qa", "inputs": {"question": "What is Ray Serve?"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["outputs"]["answer"] and body["outputs"]["reasoning"]
    assert body["usage"]["input_tokens"] > 0
    assert {m["name"] for m in http.get("/v1/models").json()["models"]} == {"qa", "classify", "pipeline"}

    # `serve deploy` of another config serves a different set of models.
    cluster.deploy(_with_port(cluster, "configs/local-small.yaml", tmp_path))
    assert {m["name"] for m in http.get("/v1/models").json()["models"]} == {"answer", "sentiment"}
    r = http.post("/v1/predict", json={"model": "sentiment", "inputs": {"text": "great"}})
    assert r.status_code == 200 and r.json()["outputs"]["sentiment"] in {"positive", "negative", "neutral"}
    gone = http.post("/v1/predict", json={"model": "qa", "inputs": {"question": "x"}})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_model"


def test_traffic_policy_demo_config_deploys_and_enforces_keys(cluster: ServeCluster, http: httpx.Client,
                                                              tmp_path: Path) -> None:
    cluster.deploy(_with_port(cluster, "configs/traffic-policy.yaml", tmp_path))
    team = {"Authorization": "Bearer demo-team-key-change-me-0002"}
    body = {"model": "qa", "inputs": {"question": "What is Ray Serve?"}}
    assert http.post("/v1/predict", json=body).status_code == 401
    r = http.post("/v1/predict", json=body, headers={**team, "X-Session-ID": "u42"})
    assert r.status_code == 200, r.text
    assert r.json()["variant"] in {"v1", "v2"} and r.headers["X-RateLimit-Limit"] == "120"
    pinned = http.post("/v1/predict", json={**body, "variant": "v2"}, headers=team)
    assert pinned.status_code == 200 and pinned.json()["variant"] == "v2"
    denied = http.post("/v1/predict", json={"model": "classify", "inputs": {"text": "great"}}, headers=team)
    assert denied.status_code == 403
    admin = {"Authorization": "Bearer demo-admin-key-change-me-0001"}
    assert http.get("/config", headers=admin).status_code == 200
    assert http.get("/config", headers=team).status_code == 403
    preflight = http.options("/v1/predict", headers={"Origin": "http://localhost:3000",
                                                      "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") == "http://localhost:3000"


def test_bad_config_fails_deploy_naming_the_field(cluster: ServeCluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "applications:\n"
        "  - name: badapp\n"
        "    route_prefix: /bad\n"
        "    import_path: serve_app.app:build_app\n"
        "    args:\n"
        "      models:\n"
        "        - name: qa\n"
        "          program: serve_app.examples:build_qa\n"
        "          lm: {model: openai/sim-qa, temprature: 0.5}\n"
    )
    result = cluster.cli("deploy", "--address", cluster.dashboard_url, str(bad))
    assert result.returncode == 0, result.stderr  # the request is accepted; the build fails

    def failed() -> str | None:
        app = cluster.applications().get("badapp")
        return app["message"] if app and app["status"] == "DEPLOY_FAILED" else None

    from .harness import wait_for

    message = wait_for(failed, 120, "badapp DEPLOY_FAILED")
    assert "temprature" in message
