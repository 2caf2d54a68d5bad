"""The one configuration tree, parsed from a Serve application's ``args:``.

Every model here is frozen and forbids unknown fields, so a typo in the YAML fails
``serve deploy`` with a message that names the field. Units are in the names (``_s``,
``_bytes``). Secrets are never values here: a config names the environment variable that
holds them (``api_key_env``, ``url_env``), because Ray stores the config in the GCS and
shows it in ``serve config`` and the dashboard.

What lives where:
- ``args:`` (this tree): what to serve. Changing it is a code change to Serve (it hashes
  ``args`` into the app's code version), so replicas are rolled.
- ``deployments[].user_config`` of a predictor (``ProgramRelease``): the program state it
  runs. Changing it calls ``reconfigure`` on live replicas: no restart.
- ``deployments[]`` otherwise: replicas, autoscaling, actor options (Serve owns them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .breaker import BreakerConfig

__all__ = [
    "Frozen",
    "LMConfig",
    "ProgramRelease",
    "ModelConfig",
    "RedisConfig",
    "CacheConfig",
    "LimitsConfig",
    "AppArgs",
    "PROJECT_ROOT",
    "resolve_path",
    "RESERVED_DEPLOYMENT_NAMES",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESERVED_DEPLOYMENT_NAMES = frozenset({"Router", "Cache", "LMSimulator"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_IMPORT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def resolve_path(path: str) -> Path:
    """Resolve a config path: absolute as is; relative against the working directory, then
    against the project root (Ray workers may run in another directory than ``serve``)."""
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / p).exists():
            return base / p
    return PROJECT_ROOT / p


def _carries_credentials(url: str, *, user_too: bool) -> bool:
    """True if ``url`` holds a password (in the authority or a ``password=`` query parameter),
    or with ``user_too`` any user info at all. Scheme case does not matter."""
    parts = urlsplit(url)
    if parts.password is not None or (user_too and parts.username is not None):
        return True
    return any(k.lower() == "password" for k, _ in parse_qsl(parts.query, keep_blank_values=True))


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LMConfig(Frozen):
    """How a predictor reaches its LM. Serving a real provider is a change of this block."""

    model: str = Field(description="DSPy/LiteLLM model string, e.g. 'openai/gpt-4o-mini'.")
    api_base: str | None = Field(default=None, description="OpenAI-compatible base URL.")
    api_key_env: str | None = Field(
        default=None, description="Name of the env var holding the API key (never the key)."
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1, le=200_000)
    timeout_s: float = Field(default=20.0, gt=0, le=600)
    num_retries: int = Field(
        default=0,
        ge=0,
        le=3,
        description="Retries inside dspy.LM. Default 0: Serve-level retry is our one layer.",
    )
    input_usd_per_mtok: float | None = Field(default=None, ge=0, description="Price override; else litellm's table.")
    output_usd_per_mtok: float | None = Field(default=None, ge=0, description="Price override; else litellm's table.")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be an environment variable NAME, not a key")
        return v

    @field_validator("api_base")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v is not None and _carries_credentials(v, user_too=True):
            raise ValueError("must not carry credentials; use api_key_env")
        return v

    def cache_identity(self) -> dict[str, Any]:
        """The LM settings that change an answer (part of every cache key)."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}


class ProgramRelease(Frozen):
    """The hot-swappable part of a predictor: its Serve ``user_config``.

    ``state`` is a saved program state (JSON written by ``program.save``). Whole-program
    pickles (``.pkl`` files or ``dspy.save`` directories) run arbitrary code when loaded,
    so they are refused unless ``allow_pickle`` is true.
    """

    state: str | None = None
    allow_pickle: bool = False


class ModelConfig(Frozen):
    """One served model: a DSPy program, its LM, and its deadline."""

    name: str = Field(description="Model name in requests; also the predictor deployment's name.")
    program: str = Field(description="Import path of a factory returning a dspy.Module: 'pkg.mod:build'.")
    state: str | None = Field(default=None, description="Saved JSON state loaded on top of the program.")
    allow_pickle: bool = False
    lm: LMConfig
    timeout_s: float = Field(default=25.0, gt=0, le=3600, description="Predictor deadline per request.")
    cache_ttl_s: float | None = Field(default=None, gt=0, description="Overrides cache TTLs for this model.")
    breaker: BreakerConfig = BreakerConfig()
    fallback: str | None = Field(
        default=None,
        description="Model that answers (marked degraded) when this one's breaker is open or its call fails retryably.",
    )
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in RESERVED_DEPLOYMENT_NAMES:
            raise ValueError(f"'{v}' is reserved (a deployment of its own)")
        if not _NAME_RE.match(v):
            raise ValueError("must match ^[a-z][a-z0-9_-]{0,62}$")
        return v

    @field_validator("program")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not _IMPORT_RE.match(v):
            raise ValueError("must be an import path 'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _ladder(self) -> "ModelConfig":
        if self.lm.timeout_s >= self.timeout_s:
            raise ValueError(
                f"lm.timeout_s ({self.lm.timeout_s}) must be below timeout_s ({self.timeout_s})"
            )
        return self

    def release(self) -> ProgramRelease:
        """The default ``user_config`` of this model's predictor."""
        return ProgramRelease(state=self.state, allow_pickle=self.allow_pickle)


class RedisConfig(Frozen):
    """A Redis server for the shared cache tier. The URL may carry a password, so it is
    read from the env var ``url_env`` in production; ``url`` is for passwordless dev use."""

    url: str | None = None
    url_env: str | None = None
    socket_timeout_s: float = Field(default=0.05, gt=0, le=5)
    connect_timeout_s: float = Field(default=0.1, gt=0, le=5)

    @model_validator(mode="after")
    def _one_source(self) -> "RedisConfig":
        if (self.url is None) == (self.url_env is None):
            raise ValueError("set exactly one of url or url_env")
        if self.url is not None and _carries_credentials(self.url, user_too=False):
            raise ValueError("url must not carry a password; put the URL in an env var and use url_env")
        return self


class CacheConfig(Frozen):
    """Prediction cache: a memory tier in the Cache deployment, optionally Redis behind it."""

    enabled: bool = True
    key_prefix: str = Field(default="serve_app", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    memory_max_entries: int = Field(default=10_000, ge=0, le=10_000_000)
    memory_ttl_s: float = Field(default=300.0, gt=0)
    redis: RedisConfig | None = None
    redis_ttl_s: float = Field(default=86_400.0, gt=0)
    max_value_bytes: int = Field(default=256 * 1024, ge=1024)
    timeout_s: float = Field(
        default=0.1, gt=0, le=5, description="Budget for one Redis call inside the Cache deployment."
    )
    near_max_entries: int = Field(
        default=10_000, ge=0, le=1_000_000,
        description="Router-local near cache in front of the Cache deployment (0 turns it off).",
    )
    near_ttl_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="Near-cache TTL: short, since each router replica keeps its own copy.",
    )
    hop_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description=(
            "Budget for the router's call to the Cache deployment. It includes Serve's queueing, "
            "so it must sit well above timeout_s: under load a late hit beats a new LM call."
        ),
    )


class LimitsConfig(Frozen):
    """Admission limits at the door."""

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_json_depth: int = Field(default=32, ge=2, le=256, description="Deepest nesting a request may have.")
    request_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Router deadline.")


class AppArgs(Frozen):
    """The application's ``args:``: everything ``build_app`` needs."""

    service_name: str = "serve_app"
    models: Annotated[list[ModelConfig], Field(min_length=1)]
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _checks(self) -> "AppArgs":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate name(s) {dupes}")
        by_name = {m.name: m for m in self.models}
        for m in self.models:
            if m.fallback is not None:
                target = by_name.get(m.fallback)
                if target is None:
                    raise ValueError(f"models[{m.name}].fallback: no model named '{m.fallback}'")
                if target.name == m.name or target.fallback is not None:
                    # One level only: a fallback chain could loop, and each level spends deadline.
                    raise ValueError(f"models[{m.name}].fallback: '{m.fallback}' must be another model without a fallback")
            if m.timeout_s >= self.limits.request_timeout_s:
                raise ValueError(
                    f"models[{m.name}].timeout_s ({m.timeout_s}) must be below "
                    f"limits.request_timeout_s ({self.limits.request_timeout_s})"
                )
        return self

    def secret_env_names(self) -> list[str]:
        """Names of the environment variables that hold secrets (values are masked in logs)."""
        names = [m.lm.api_key_env for m in self.models if m.lm.api_key_env]
        if self.cache.redis is not None and self.cache.redis.url_env:
            names.append(self.cache.redis.url_env)
        return names

    def public_view(self) -> dict[str, Any]:
        """The effective configuration for ``GET /config``, by allow-list: every field shown is
        named here, so a field added later stays hidden until someone decides it is safe.
        Secrets are never values in this tree, and URLs that could carry credentials
        (``cache.redis.url``) are reduced to whether they are set."""
        lm_fields = ("model", "api_base", "api_key_env", "temperature", "max_tokens", "timeout_s", "num_retries",
                     "input_usd_per_mtok", "output_usd_per_mtok")
        model_fields = ("name", "description", "program", "state", "allow_pickle", "timeout_s", "cache_ttl_s",
                        "fallback")
        cache_fields = ("enabled", "key_prefix", "memory_max_entries", "memory_ttl_s", "redis_ttl_s",
                        "max_value_bytes", "timeout_s", "hop_timeout_s", "near_max_entries", "near_ttl_s")
        return {
            "service_name": self.service_name,
            "models": [
                {
                    **{f: getattr(m, f) for f in model_fields},
                    "lm": {f: getattr(m.lm, f) for f in lm_fields},
                    "breaker": m.breaker.model_dump(mode="json"),
                }
                for m in self.models
            ],
            "cache": {
                **{f: getattr(self.cache, f) for f in cache_fields},
                "redis": None
                if self.cache.redis is None
                else {"configured": True, "url_env": self.cache.redis.url_env,
                      "url_set_in_config": self.cache.redis.url is not None},
            },
            "limits": self.limits.model_dump(mode="json"),
        }

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

