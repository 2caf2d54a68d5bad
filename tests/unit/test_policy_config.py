"""The traffic-policy part of the config tree: variants, keys, budgets, weights, and what /config shows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.config import (
    ApiKeyConfig,
    AppArgs,
    AuthConfig,
    BudgetConfig,
    HttpConfig,
    ModelConfig,
    PolicyConfig,
    RateLimitConfig,
    TrafficWeights,
    VariantConfig,
)
from serve_app.keys import hash_key

DIGEST = hash_key("sk-unit-0123456789abcdef")


def qa(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "qa",
        "program": "serve_app.examples:build_qa",
        "lm": {"model": "openai/sim-qa", "timeout_s": 1.0},
        "timeout_s": 2.0,
    }
    raw.update(over)
    return raw


def args(models: list[dict[str, Any]] | None = None, **over: Any) -> AppArgs:
    return AppArgs.model_validate({"models": models or [qa()], "limits": {"request_timeout_s": 5.0}, **over})


# ----------------------------------------------------------------------------- variants


def test_variants_parse_with_their_deployments() -> None:
    m = ModelConfig.model_validate(qa(variants=[{"name": "a"}, {"name": "b", "weight": 0.5, "state": "s.json"}]))
    assert [(v.name, v.deployment, v.weight) for v in m.served_variants()] == [("a", "qa.a", 1.0), ("b", "qa.b", 0.5)]


def test_duplicate_variant_names() -> None:
    with pytest.raises(ValidationError, match=r"duplicate name\(s\) \['a'\]"):
        ModelConfig.model_validate(qa(variants=[{"name": "a"}, {"name": "a"}]))


def test_all_zero_weights_rejected() -> None:
    with pytest.raises(ValidationError, match="at least one weight"):
        ModelConfig.model_validate(qa(variants=[{"name": "a", "weight": 0}, {"name": "b", "weight": 0}]))


@pytest.mark.parametrize("bad", [{"name": "A"}, {"name": "a.b"}, {"name": "1a"}, {"name": "a", "weight": -1}])
def test_bad_variant_fields(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        VariantConfig.model_validate(bad)


def test_variant_lm_timeout_must_be_below_the_model_deadline() -> None:
    with pytest.raises(ValidationError, match="lm.timeout_s"):
        ModelConfig.model_validate(qa(variants=[{"name": "a", "lm": {"model": "openai/x", "timeout_s": 5.0}}]))


def test_for_variant_uses_the_variants_state_and_lm() -> None:
    m = ModelConfig.model_validate(qa(
        state="base.json",
        variants=[{"name": "a"}, {"name": "b", "state": "b.json", "lm": {"model": "openai/other", "timeout_s": 1.0}}],
    ))
    a, b = m.for_variant("a"), m.for_variant("b")
    assert (a.state, a.lm.model, a.variants) == ("base.json", "openai/sim-qa", [])
    assert (b.state, b.lm.model, b.variants) == ("b.json", "openai/other", [])
    with pytest.raises(KeyError):
        m.for_variant("default")
    with pytest.raises(KeyError):
        m.for_variant("zzz")


def test_for_variant_default_without_variants_is_the_model() -> None:
    m = ModelConfig.model_validate(qa())
    assert m.for_variant("default") is m


@pytest.mark.parametrize("name", ["qa.b", "Router", "Cache", "LMSimulator", "router.x"])
def test_model_names_cannot_clash_with_deployments(name: str) -> None:
    # '.' is reserved for '<model>.<variant>' deployments; the capitalized names are the app's own.
    with pytest.raises(ValidationError):
        ModelConfig.model_validate(qa(name=name))


def test_deployment_names_are_unique_across_models() -> None:
    a = args([qa(variants=[{"name": "x"}, {"name": "y"}]), qa(name="qa-x"), qa(name="other", variants=[{"name": "x"}])])
    deployments = [v.deployment for m in a.models for v in m.served_variants()]
    assert deployments == ["qa.x", "qa.y", "qa-x", "other.x"]


# ----------------------------------------------------------------------------- keys


def test_key_models_must_name_configured_models() -> None:
    with pytest.raises(ValidationError, match=r"keys\[svc\]\.models: no model named \['nope'\]"):
        args(policy={"auth": {"enabled": True, "keys": [{"id": "svc", "sha256": DIGEST, "models": ["qa", "nope"]}]}})


def test_key_models_star_and_known_names_are_fine() -> None:
    a = args(policy={"auth": {"enabled": True, "keys": [
        {"id": "one", "sha256": DIGEST, "models": ["qa"]}, {"id": "all", "key_env": "ALL_KEY"}]}})
    assert [k.models for k in a.policy.auth.keys] == [["qa"], ["*"]]


@pytest.mark.parametrize("sources", [
    {},
    {"sha256": DIGEST, "key_env": "K"},
    {"key_env": "K", "key_file": "/k"},
    {"sha256": DIGEST, "key_env": "K", "key_file": "/k"},
])
def test_api_key_needs_exactly_one_source(sources: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="exactly one of sha256, key_env, key_file"):
        ApiKeyConfig.model_validate({"id": "svc", **sources})


@pytest.mark.parametrize("digest", [
    "abc",
    DIGEST[:-1],
    DIGEST + "0",
    "g" * 64,
    "sk-unit-0123456789abcdef",  # a raw key where a digest belongs
])
def test_sha256_must_be_64_hex(digest: str) -> None:
    with pytest.raises(ValidationError, match="64-character hex"):
        ApiKeyConfig(id="svc", sha256=digest)


def test_sha256_is_normalized_to_lower_case() -> None:
    assert ApiKeyConfig(id="svc", sha256=DIGEST.upper()).sha256 == DIGEST


@pytest.mark.parametrize("env", ["sk-live-123", "MY KEY", "1KEY", "a=b"])
def test_key_env_must_be_a_name(env: str) -> None:
    with pytest.raises(ValidationError, match="NAME"):
        ApiKeyConfig(id="svc", key_env=env)


@pytest.mark.parametrize("key_id", ["Svc", "svc.key", "", "x" * 64])
def test_key_id_pattern(key_id: str) -> None:
    with pytest.raises(ValidationError):
        ApiKeyConfig(id=key_id, sha256=DIGEST)


def test_key_models_cannot_be_empty() -> None:
    with pytest.raises(ValidationError):
        ApiKeyConfig(id="svc", sha256=DIGEST, models=[])


def test_duplicate_key_ids() -> None:
    with pytest.raises(ValidationError, match=r"duplicate id\(s\) \['svc'\]"):
        AuthConfig(keys=[ApiKeyConfig(id="svc", sha256=DIGEST), ApiKeyConfig(id="svc", key_env="K")])


def test_auth_enabled_needs_keys() -> None:
    with pytest.raises(ValidationError, match="needs keys or keys_file"):
        AuthConfig(enabled=True)
    assert AuthConfig(enabled=True, keys_file="/k/keys.yaml").enabled


# ----------------------------------------------------------------------------- budgets, limits, weights


def test_soft_above_hard_rejected() -> None:
    with pytest.raises(ValidationError, match="soft_usd must not exceed hard_usd"):
        BudgetConfig(soft_usd=2.0, hard_usd=1.0)
    assert BudgetConfig(soft_usd=1.0, hard_usd=1.0).hard_usd == 1.0


def test_budget_needs_a_limit() -> None:
    with pytest.raises(ValidationError, match="set soft_usd, hard_usd or both"):
        BudgetConfig(window="month")


@pytest.mark.parametrize("bad", [{"hard_usd": 0}, {"hard_usd": -1}, {"soft_usd": 0}, {"hard_usd": 1, "window": "week"},
                                 {"hard_usd": 1, "reserve_usd": 0}])
def test_budget_field_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BudgetConfig.model_validate(bad)


@pytest.mark.parametrize("bad", [{"requests_per_minute": 0}, {"tokens_per_minute": 0}, {"requests_per_second": 1}])
def test_rate_limit_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RateLimitConfig.model_validate(bad)


@pytest.mark.parametrize("weights", [{"qa": {"a": -1, "b": 2}}, {"qa": {"a": 0, "b": 0}}, {"qa": {}}])
def test_traffic_weights_validation(weights: dict[str, dict[str, float]]) -> None:
    with pytest.raises(ValidationError, match="at least one > 0"):
        TrafficWeights(weights=weights)


def test_session_header_is_lower_cased_and_validated() -> None:
    assert PolicyConfig(session_header="X-Session-ID").session_header == "x-session-id"
    with pytest.raises(ValidationError):
        PolicyConfig(session_header="bad header")


@pytest.mark.parametrize("bad", [{"max_string_chars": 0}, {"gzip_min_bytes": -1}])
def test_http_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HttpConfig.model_validate(bad)


# ----------------------------------------------------------------------------- public view, secrets


def policy_args() -> AppArgs:
    return args(
        [qa(variants=[{"name": "a"}, {"name": "b", "lm": {"model": "openai/b", "api_key_env": "B_LM_KEY",
                                                          "timeout_s": 1.0}}],
            lm={"model": "openai/sim-qa", "api_key_env": "QA_LM_KEY", "timeout_s": 1.0},
            budget={"hard_usd": 5.0})],
        policy={"auth": {"enabled": True, "keys_file": "/k/keys.yaml", "keys": [
            {"id": "by-hash", "sha256": DIGEST, "admin": True},
            {"id": "by-env", "key_env": "SVC_API_KEY", "models": ["qa"], "rate_limit": {"requests_per_minute": 5}},
            {"id": "by-file", "key_file": "/secrets/svc", "budget": {"soft_usd": 1.0}},
        ]}},
        http={"cors_origins": ["https://app.example"]},
    )


def test_public_view_shows_key_ids_and_rights_only() -> None:
    view = policy_args().public_view()
    keys = view["policy"]["auth"]["keys"]
    assert [(k["id"], k["source"], k["admin"]) for k in keys] == [
        ("by-hash", "sha256", True), ("by-env", "key_env", False), ("by-file", "key_file", False)]
    assert keys[1]["rate_limit"]["requests_per_minute"] == 5
    assert view["policy"]["auth"]["keys_file_set"] is True
    dumped = json.dumps(view)
    assert DIGEST not in dumped
    assert "/secrets/svc" not in dumped and "/k/keys.yaml" not in dumped
    for key in keys:
        assert not {"sha256", "key_env", "key_file"} & set(key)


def test_public_view_never_shows_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVC_API_KEY", "sk-env-value-abcdef0123456789")
    monkeypatch.setenv("QA_LM_KEY", "sk-lm-value-abcdef0123456789")
    dumped = json.dumps(policy_args().public_view())
    assert "sk-env-value" not in dumped and "sk-lm-value" not in dumped


def test_public_view_shows_variants_budget_and_http() -> None:
    view = policy_args().public_view()
    (m,) = view["models"]
    assert [v["name"] for v in m["variants"]] == ["a", "b"]
    assert m["variants"][1]["lm"]["model"] == "openai/b"
    assert m["budget"]["hard_usd"] == 5.0
    assert view["http"]["cors_origins"] == ["https://app.example"]


def test_secret_env_names_include_key_envs_and_variant_lm_keys() -> None:
    names = policy_args().secret_env_names()
    assert set(names) == {"QA_LM_KEY", "B_LM_KEY", "SVC_API_KEY"}


def test_policy_store_deadline_defaults_to_half_a_second_and_is_bounded() -> None:
    assert PolicyConfig().store_timeout_s == 0.5
    assert PolicyConfig.model_validate({"store_timeout_s": 0.2}).store_timeout_s == 0.2
    for bad in (0, -1, 6):
        with pytest.raises(ValidationError):
            PolicyConfig.model_validate({"store_timeout_s": bad})
