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

from typing import Annotated, Any, NamedTuple

from pydantic import Field, field_validator, model_validator

from .breaker import BreakerConfig
from .config_base import (
    _IMPORT_RE,
    PROJECT_ROOT,
    RESERVED_DEPLOYMENT_NAMES,
    Frozen,
    LMConfig,
    Name,
    _carries_credentials,
    duplicates,
    resolve_path,
)
from .policy_config import (
    ApiKeyConfig,
    AuthConfig,
    BudgetConfig,
    HttpConfig,
    PolicyConfig,
    RateLimitConfig,
    TrafficWeights,
    VariantConfig,
)

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
    "Variant",
    "DEFAULT_VARIANT",
    "VariantConfig",
    "RateLimitConfig",
    "BudgetConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "HttpConfig",
    "PolicyConfig",
    "TrafficWeights",
]

DEFAULT_VARIANT = "default"


class Variant(NamedTuple):
    """A model's variant as served: its name, its predictor deployment and its weight."""

    name: str
    deployment: str
    weight: float


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

    name: Name = Field(description="Model name in requests; also the predictor deployment's name.")
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
    variants: list[VariantConfig] = Field(
        default=[],
        description="A/B variants, each its own predictor deployment '<model>.<variant>'; none = one "
                    "variant 'default' served by the deployment '<model>'.",
    )
    pin_variants: bool = Field(default=False, description="Requests may pick a variant ('variant' field).")
    budget: BudgetConfig | None = Field(default=None, description="Spend limits for this model (all keys).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v in RESERVED_DEPLOYMENT_NAMES:
            raise ValueError(f"'{v}' is reserved (a deployment of its own)")
        return v

    @field_validator("program")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not _IMPORT_RE.match(v):
            raise ValueError("must be an import path 'package.module:factory'")
        return v

    @model_validator(mode="after")
    def _ladder(self) -> "ModelConfig":
        for lm in [self.lm] + [v.lm for v in self.variants if v.lm is not None]:
            if lm.timeout_s >= self.timeout_s:
                raise ValueError(f"lm.timeout_s ({lm.timeout_s}) must be below timeout_s ({self.timeout_s})")
        dupes = duplicates([v.name for v in self.variants])
        if dupes:
            raise ValueError(f"variants: duplicate name(s) {dupes}")
        if self.variants and not any(v.weight > 0 for v in self.variants):
            raise ValueError("variants: at least one weight must be above 0")
        return self

    def served_variants(self) -> list[Variant]:
        """Every variant with its deployment name; ``default`` on ``<model>`` without variants."""
        if not self.variants:
            return [Variant(DEFAULT_VARIANT, self.name, 1.0)]
        return [Variant(v.name, f"{self.name}.{v.name}", v.weight) for v in self.variants]

    def for_variant(self, name: str) -> "ModelConfig":
        """This model as one variant's predictor runs it (the variant's state and LM)."""
        for v in self.variants:
            if v.name == name:
                update: dict[str, Any] = {"variants": []}
                if v.state is not None:
                    update["state"] = v.state
                if v.lm is not None:
                    update["lm"] = v.lm
                return self.model_copy(update=update)
        if name == DEFAULT_VARIANT and not self.variants:
            return self
        raise KeyError(name)

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
    hop_batch_max: int = Field(
        default=64, ge=1, le=1024,
        description=(
            "Most lookups or write-backs one router call to the Cache deployment carries. "
            "Lookups made in the same event-loop turn share a call; 1 turns batching off."
        ),
    )
    hop_max_inflight: int = Field(
        default=1, ge=0, le=64,
        description=(
            "Most router calls to the Cache deployment out at once, per kind (lookups, "
            "write-backs): more wait for one to answer and then leave together, so batches "
            "grow with load and a lone request is never held. 0: no bound."
        ),
    )
    lookup_index: bool = Field(
        default=True,
        description=(
            "Without Redis, a router that is the Cache deployment's only writer knows every key "
            "it can hold, and skips the lookup hop for any other (every first-time input). "
            "Off by itself with Redis or a second router; false always looks up."
        ),
    )
    write_batch_s: float = Field(
        default=0.02, ge=0, le=1,
        description=(
            "How long the router gathers write-backs into one call to the Cache deployment. "
            "Off the response path: the near cache has the answer at once."
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
    policy: PolicyConfig = PolicyConfig()
    http: HttpConfig = HttpConfig()

    @model_validator(mode="after")
    def _checks(self) -> "AppArgs":
        dupes = duplicates([m.name for m in self.models])
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
        deployments = [v.deployment for m in self.models for v in m.served_variants()]
        clash = sorted(set(duplicates(deployments)) | (set(deployments) & RESERVED_DEPLOYMENT_NAMES))
        if clash:
            raise ValueError(f"models: deployment name(s) {clash} used twice")
        for key in self.policy.auth.keys:
            unknown = sorted(set(key.models) - set(by_name) - {"*"})
            if unknown:
                raise ValueError(f"policy.auth.keys[{key.id}].models: no model named {unknown}")
        return self

    def secret_env_names(self) -> list[str]:
        """Names of the environment variables that hold secrets (values are masked in logs)."""
        lms = [m.lm for m in self.models] + [v.lm for m in self.models for v in m.variants if v.lm is not None]
        names = [lm.api_key_env for lm in lms if lm.api_key_env]
        if self.cache.redis is not None and self.cache.redis.url_env:
            names.append(self.cache.redis.url_env)
        names += [k.key_env for k in self.policy.auth.keys if k.key_env]
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
                        "max_value_bytes", "timeout_s", "hop_timeout_s", "near_max_entries", "near_ttl_s",
                        "hop_batch_max", "hop_max_inflight", "lookup_index", "write_batch_s")
        def lm_view(lm: LMConfig) -> dict[str, Any]:
            return {f: getattr(lm, f) for f in lm_fields}

        auth = self.policy.auth
        return {
            "service_name": self.service_name,
            "models": [
                {
                    **{f: getattr(m, f) for f in model_fields},
                    "lm": lm_view(m.lm),
                    "breaker": m.breaker.model_dump(mode="json"),
                    "variants": [
                        {"name": v.name, "weight": v.weight, "state": v.state,
                         "lm": None if v.lm is None else lm_view(v.lm)}
                        for v in m.variants
                    ],
                    "pin_variants": m.pin_variants,
                    "budget": None if m.budget is None else m.budget.model_dump(mode="json"),
                }
                for m in self.models
            ],
            # Keys by id and rights only: no hash, no env value, no file content.
            "policy": {
                "auth": {
                    "enabled": auth.enabled,
                    "keys_file_set": auth.keys_file is not None,
                    "keys": [
                        {"id": k.id, "models": list(k.models), "admin": k.admin,
                         "source": "sha256" if k.sha256 else ("key_env" if k.key_env else "key_file"),
                         "rate_limit": None if k.rate_limit is None else k.rate_limit.model_dump(mode="json"),
                         "budget": None if k.budget is None else k.budget.model_dump(mode="json")}
                        for k in auth.keys
                    ],
                },
                "rate_limit": self.policy.rate_limit.model_dump(mode="json"),
                "trusted_proxy_hops": self.policy.trusted_proxy_hops,
                "session_header": self.policy.session_header,
                "expected_router_replicas": self.policy.expected_router_replicas,
            },
            "http": self.http.model_dump(mode="json"),
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

