"""Config tree: every shipped Serve config parses and loads; bad configs fail naming the field."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from pydantic import ValidationError

from serve_app.config import (
    AppArgs,
    CacheConfig,
    LMConfig,
    ModelConfig,
    ProgramRelease,
    RedisConfig,
)
from serve_app.lmsim import Knobs
from serve_app.programs import load_program

from .conftest import RayInitForbidden

REPO = Path(__file__).resolve().parents[2]
BUILD_APP = "serve_app.app:build_app"
BUILD_LMSIM = "serve_app.app:build_lmsim"


# ----------------------------------------------------------------------------- discovery


def _yaml_files() -> list[Path]:
    files = [REPO / "serve_config.yaml"]
    for folder in ("configs", "cluster"):
        root = REPO / folder
        if root.is_dir():
            files += sorted(p for ext in ("yaml", "yml") for p in root.glob(f"**/*.{ext}"))
    return [f for f in files if f.is_file()]


def _serve_configs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Serve config in the repo: plain files with ``applications:`` and the
    ``serveConfigV2`` string of any KubeRay ``RayService``."""
    for path in _yaml_files():
        rel = path.relative_to(REPO)
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not isinstance(doc, dict):
                continue
            if "applications" in doc:
                yield f"{rel}#{i}", doc
            elif doc.get("kind") == "RayService":
                embedded = (doc.get("spec") or {}).get("serveConfigV2")
                if isinstance(embedded, str):
                    yield f"{rel}#{i}:serveConfigV2", yaml.safe_load(embedded)


SERVE_CONFIGS = dict(_serve_configs())


def _applications() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{label}:{app.get('name', '?')}", doc, app)
        for label, doc in SERVE_CONFIGS.items()
        for app in doc.get("applications") or []
    ]


APPLICATIONS = _applications()
SERVE_APP_APPLICATIONS = [a for a in APPLICATIONS if a[2]["import_path"] == BUILD_APP]


def test_default_serve_config_is_discovered() -> None:
    assert any(label.startswith("serve_config.yaml") for label in SERVE_CONFIGS)
    assert {app["import_path"] for _, _, app in APPLICATIONS} >= {BUILD_APP, BUILD_LMSIM}


def _app_args(app: dict[str, Any]) -> AppArgs:
    return AppArgs.model_validate(app.get("args") or {})


@pytest.mark.parametrize(("label", "doc", "app"), APPLICATIONS, ids=[a[0] for a in APPLICATIONS])
def test_application_args_parse(label: str, doc: dict[str, Any], app: dict[str, Any]) -> None:
    path = app["import_path"]
    if path == BUILD_APP:
        args = _app_args(app)
        assert args.models, label
    elif path == BUILD_LMSIM:
        Knobs.model_validate(app.get("args") or {})
    else:  # another builder: at least it must resolve
        module, _, attr = path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), f"{label}: {path} is not callable"


@pytest.mark.parametrize(("label", "doc", "app"), SERVE_APP_APPLICATIONS, ids=[a[0] for a in SERVE_APP_APPLICATIONS])
def test_application_programs_and_user_configs_load(label: str, doc: dict[str, Any], app: dict[str, Any]) -> None:
    """Each model's program + state loads, and every predictor ``user_config`` is a valid
    ``ProgramRelease`` whose state fits that model's program (what ``reconfigure`` will do)."""
    args = _app_args(app)
    served = {v.deployment: m.for_variant(v.name) for m in args.models for v in m.served_variants()}
    for model in served.values():
        assert load_program(model.program, model.release()).version
    known = {"Router", "Cache"} | set(served)
    for dep in app.get("deployments") or []:
        assert dep["name"] in known, f"{label}: deployment '{dep['name']}' matches no deployment of the app"
        if dep["name"] == "Router" and "user_config" in dep:
            # The Router's user_config is its variant weights: valid, and naming real variants.
            from serve_app.config import TrafficWeights
            from serve_app.variants import VariantPicker

            VariantPicker().set_weights(TrafficWeights.model_validate(dep["user_config"]).weights, args.models)
            continue
        if "user_config" in dep:
            predictor = served.get(dep["name"])
            assert predictor is not None, f"{label}: user_config on non-predictor '{dep['name']}'"
            release = ProgramRelease.model_validate(dep["user_config"])
            assert load_program(predictor.program, release).version


@pytest.mark.parametrize(("label", "doc", "app"), SERVE_APP_APPLICATIONS, ids=[a[0] for a in SERVE_APP_APPLICATIONS])
def test_timeout_ladder_from_config(label: str, doc: dict[str, Any], app: dict[str, Any]) -> None:
    """S6: LM timeout < predictor deadline < router deadline < proxy timeout < graceful shutdown."""
    from serve_app.deployments import Predictor, Router

    args = _app_args(app)
    router_deadline = args.limits.request_timeout_s
    for m in args.models:
        assert m.lm.timeout_s < m.timeout_s < router_deadline, m.name
    proxy_timeout = (doc.get("http_options") or {}).get("request_timeout_s")
    deps = {d["name"]: d for d in app.get("deployments") or []}

    def default_grace(deployment: Any) -> float:
        return float(deployment._deployment_config.graceful_shutdown_timeout_s)  # the decorator's value

    def grace(name: str, default: float) -> float:
        return float(deps.get(name, {}).get("graceful_shutdown_timeout_s", default))

    router_grace = grace("Router", default_grace(Router))
    top = router_deadline
    if proxy_timeout is not None:
        assert router_deadline < proxy_timeout, "limits.request_timeout_s must be below http_options.request_timeout_s"
        top = proxy_timeout
    assert top < router_grace
    for m in args.models:
        assert m.timeout_s < grace(m.name, default_grace(Predictor))


def test_build_app_binds_the_default_config_without_starting_ray() -> None:
    from ray.serve import Application

    from serve_app.app import build_app, build_lmsim

    was_initialized = ray.is_initialized()  # true only if an integration session ran first
    doc = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    for app in doc["applications"]:
        if app["import_path"] == BUILD_APP:
            assert isinstance(build_app(_app_args(app)), Application)
        elif app["import_path"] == BUILD_LMSIM:
            assert isinstance(build_lmsim(Knobs.model_validate(app.get("args") or {})), Application)
    assert ray.is_initialized() == was_initialized


def test_build_app_names_the_model_whose_state_is_missing() -> None:
    from serve_app.app import build_app

    raw = _valid_raw()
    raw["models"][0]["state"] = "configs/states/does_not_exist.json"
    with pytest.raises(ValueError, match=r"models\[qa\].*not found"):
        build_app(AppArgs.model_validate(raw))


def test_unit_tests_cannot_start_ray() -> None:
    with pytest.raises(RayInitForbidden):
        ray.init(num_cpus=1)


# ----------------------------------------------------------------------------- bad configs


def _valid_raw() -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "qa",
                "program": "serve_app.examples:build_qa",
                "lm": {"model": "openai/sim-qa", "api_base": "http://127.0.0.1:8000/lmsim/v1"},
            },
            {
                "name": "classify",
                "program": "serve_app.examples:build_classifier",
                "state": "configs/states/classify.json",
                "lm": {"model": "openai/sim-classify", "api_key_env": "OPENAI_API_KEY"},
            },
        ],
        "cache": {"redis": {"url": "redis://127.0.0.1:6379/0"}},
        "limits": {"request_timeout_s": 30},
    }


def test_valid_raw_config_parses() -> None:
    args = AppArgs.model_validate(_valid_raw())
    assert [m.name for m in args.models] == ["qa", "classify"]
    assert args.model("classify") is args.models[1]
    assert args.model("nope") is None
    assert args.models[1].release() == ProgramRelease(state="configs/states/classify.json")


def _mutated(path: str, value: Any) -> dict[str, Any]:
    """A copy of the valid config with ``value`` set at dotted ``path`` (list indexes as ints)."""
    raw = copy.deepcopy(_valid_raw())
    node: Any = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[parts[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "names"),
    [
        ("models.0.temprature", 0.5, ["models.0.temprature", "Extra inputs are not permitted"]),
        ("models.0.lm.temprature", 0.5, ["models.0.lm.temprature"]),
        ("cache.redis.pasword", "x", ["cache.redis.pasword"]),
        ("limits.max_body_byte", 10, ["limits.max_body_byte"]),
        ("models.0.name", "Bad Name!", ["models.0.name", "must match"]),
        ("models.0.name", "Router", ["models.0.name"]),
        ("models.0.name", "", ["models.0.name"]),
        ("models.0.program", "serve_app.examples.build_qa", ["models.0.program", "import path"]),
        ("models.0.program", "serve_app/examples.py:build_qa", ["models.0.program"]),
        ("models.0.lm.api_key_env", "sk-abc123def456", ["models.0.lm.api_key_env", "environment variable NAME"]),
        ("models.0.lm.api_base", "https://user:secret@api.example.com/v1", ["models.0.lm.api_base", "credentials"]),
        ("models.0.lm.temperature", 3.0, ["models.0.lm.temperature"]),
        ("models.0.lm.num_retries", 10, ["models.0.lm.num_retries"]),
        ("cache.redis", {"url": "redis://:secret@redis:6379/0"}, ["cache.redis", "password"]),
        ("cache.redis", {"url": "redis://default:secret@redis:6379"}, ["cache.redis", "password"]),
        ("cache.redis", {"url": "redis://r:6379", "url_env": "REDIS_URL"}, ["cache.redis", "exactly one"]),
        ("cache.redis", {}, ["cache.redis", "exactly one"]),
        ("cache.key_prefix", "has space", ["cache.key_prefix"]),
        ("cache.max_value_bytes", 10, ["cache.max_value_bytes"]),
        ("limits.max_body_bytes", 10, ["limits.max_body_bytes"]),
        ("models", [], ["models"]),
    ],
)
def test_bad_config_names_the_field(path: str, value: Any, names: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(_mutated(path, value))
    text = str(info.value)
    for name in names:
        assert name in text, f"{name!r} not in error:\n{text}"


def test_duplicate_model_names_are_refused() -> None:
    raw = _valid_raw()
    raw["models"][1]["name"] = "qa"
    with pytest.raises(ValidationError, match=r"duplicate name\(s\) \['qa'\]"):
        AppArgs.model_validate(raw)


def test_lm_timeout_must_be_below_model_timeout() -> None:
    raw = _mutated("models.0.lm", {"model": "openai/x", "timeout_s": 25.0})
    raw["models"][0]["timeout_s"] = 25.0
    with pytest.raises(ValidationError, match=r"models\.0\n.*lm\.timeout_s \(25\.0\) must be below timeout_s"):
        AppArgs.model_validate(raw)


def test_model_timeout_must_be_below_router_deadline() -> None:
    raw = _mutated("limits.request_timeout_s", 20)  # default model timeout_s is 25
    with pytest.raises(
        ValidationError, match=r"models\[qa\]\.timeout_s \(25\.0\) must be below limits\.request_timeout_s"
    ):
        AppArgs.model_validate(raw)


def test_ladder_at_the_boundary() -> None:
    ok = AppArgs.model_validate(_mutated("limits.request_timeout_s", 25.001))
    assert ok.limits.request_timeout_s == 25.001
    with pytest.raises(ValidationError):
        AppArgs.model_validate(_mutated("limits.request_timeout_s", 25))


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "_KEY", "key2"])
def test_api_key_env_accepts_variable_names(name: str) -> None:
    assert LMConfig(model="openai/x", api_key_env=name).api_key_env == name


def test_passwordless_redis_urls_are_accepted() -> None:
    assert RedisConfig(url="redis://127.0.0.1:6379/0").url
    assert RedisConfig(url="rediss://user@redis.example:6380").url
    assert RedisConfig(url_env="REDIS_URL").url_env == "REDIS_URL"


def test_redis_url_with_password_in_query_is_refused() -> None:
    with pytest.raises(ValidationError):
        RedisConfig(url="redis://redis:6379/0?password=secret")


@pytest.mark.parametrize(
    "build",
    [
        lambda: RedisConfig(url="REDIS://:secret@redis:6379/0"),
        lambda: LMConfig(model="openai/x", api_base="HTTPS://user:secret@api.example.com/v1"),
    ],
    ids=["redis-url", "api-base"],
)
def test_credentials_in_upper_case_scheme_urls_are_refused(build: Any) -> None:
    with pytest.raises(ValidationError):
        build()


def test_models_are_frozen() -> None:
    args = AppArgs.model_validate(_valid_raw())
    with pytest.raises(ValidationError, match="frozen"):
        args.service_name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        args.models[0].timeout_s = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        args.models[0].lm.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        args.cache.enabled = False  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        ProgramRelease().allow_pickle = True  # type: ignore[misc]


def test_cache_identity_covers_answer_changing_settings_only() -> None:
    lm = LMConfig(model="openai/x", temperature=0.3, max_tokens=64, timeout_s=5, api_key_env="K")
    assert lm.cache_identity() == {"model": "openai/x", "temperature": 0.3, "max_tokens": 64}


def test_defaults_form_a_valid_ladder() -> None:
    model = ModelConfig(name="m", program="a.b:c", lm=LMConfig(model="openai/x"))
    assert model.lm.timeout_s < model.timeout_s < AppArgs(models=[model]).limits.request_timeout_s
    assert CacheConfig().redis is None
