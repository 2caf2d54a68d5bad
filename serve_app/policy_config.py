"""The traffic-policy part of the config tree: variants, API keys, rate limits, budgets, HTTP.

Part of the one frozen tree rooted at ``config.AppArgs`` (split out only to keep modules
small). Secrets follow the tree's rule: an API key is configured as its SHA-256 hash, or
named by the env var or mounted file that holds it; never as a value.

What changes without a restart: variant weights live in the Router deployment's
``user_config`` (``TrafficWeights``), so a redeploy that only changes them reconfigures
live router replicas. Everything else here is ``args:`` (a change rolls replicas).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .config_base import Frozen, LMConfig, Name, duplicates

__all__ = [
    "VariantConfig",
    "RateLimitConfig",
    "BudgetConfig",
    "ApiKeyConfig",
    "AuthConfig",
    "HttpConfig",
    "PolicyConfig",
    "TrafficWeights",
]

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class VariantConfig(Frozen):
    """One A/B variant of a model: its own predictor deployment ``<model>.<name>``, with its
    own saved program state and/or LM (the model's when unset)."""

    name: Name
    weight: float = Field(default=1.0, ge=0, description="Relative share of traffic (sticky per client).")
    state: str | None = Field(default=None, description="Saved program state; the model's when unset.")
    lm: LMConfig | None = Field(default=None, description="This variant's LM; the model's when unset.")


class RateLimitConfig(Frozen):
    """Per-subject limits over a sliding minute (cluster-wide through Redis). ``None`` = no limit."""

    requests_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=10_000_000_000)


class BudgetConfig(Frozen):
    """Spend limits in US dollars over a UTC day or calendar month.

    ``soft_usd`` crossing is a metric, a log line and an alert; ``hard_usd`` is a 429
    ``budget_exceeded`` until the window ends. Each LM call reserves ``reserve_usd`` (or the
    largest cost seen so far for the model, or a price-based bound) before it runs and
    settles the real cost after, so concurrent calls overshoot by at most the in-flight
    calls' cost above their reservation."""

    window: Literal["day", "month"] = "day"
    soft_usd: float | None = Field(default=None, gt=0)
    hard_usd: float | None = Field(default=None, gt=0)
    reserve_usd: float | None = Field(default=None, gt=0, description="Fixed reservation per LM call.")

    @model_validator(mode="after")
    def _order(self) -> "BudgetConfig":
        if self.soft_usd is None and self.hard_usd is None:
            raise ValueError("set soft_usd, hard_usd or both")
        if self.soft_usd is not None and self.hard_usd is not None and self.soft_usd > self.hard_usd:
            raise ValueError("soft_usd must not exceed hard_usd")
        return self


class ApiKeyConfig(Frozen):
    """One API key. Exactly one source: ``sha256`` (hex digest of the key), ``key_env`` (env
    var holding the key) or ``key_file`` (a mounted secret file holding the key)."""

    id: Name = Field(description="Stable name of the key: logs, metrics and /costs show this, never the key.")
    sha256: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    models: Annotated[list[str], Field(min_length=1)] = ["*"]
    admin: bool = Field(default=False, description="May read /config and /costs and reset costs.")
    rate_limit: RateLimitConfig | None = Field(default=None, description="Overrides policy.rate_limit.")
    budget: BudgetConfig | None = None

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_RE.match(v.lower()):
            raise ValueError("must be a 64-character hex SHA-256 digest of the key (never the key)")
        return None if v is None else v.lower()

    @field_validator("key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_RE.match(v):
            raise ValueError("must be an environment variable NAME, not a key")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKeyConfig":
        if sum(x is not None for x in (self.sha256, self.key_env, self.key_file)) != 1:
            raise ValueError(f"api key '{self.id}': set exactly one of sha256, key_env, key_file")
        return self


class AuthConfig(Frozen):
    """API keys: off by default (the offline demo); on in production."""

    enabled: bool = False
    keys: list[ApiKeyConfig] = []
    keys_file: str | None = Field(
        default=None, description="A mounted JSON/YAML file with more key entries (same fields as keys[])."
    )

    @model_validator(mode="after")
    def _unique(self) -> "AuthConfig":
        dupes = duplicates([k.id for k in self.keys])
        if dupes:
            raise ValueError(f"auth.keys: duplicate id(s) {dupes}")
        if self.enabled and not self.keys and self.keys_file is None:
            raise ValueError("auth.enabled needs keys or keys_file")
        return self


class HttpConfig(Frozen):
    """Browser-facing HTTP options."""

    cors_origins: list[str] = Field(default=[], description="Allowed CORS origins ('*' for any); none = CORS off.")
    gzip_min_bytes: int | None = Field(default=None, ge=0, description="GZip responses at least this large.")
    max_string_chars: int = Field(default=100_000, ge=1, le=64 * 1024 * 1024,
                                  description="Longest string allowed anywhere in a request body.")


class PolicyConfig(Frozen):
    """Who may call what, how often and at what cost."""

    auth: AuthConfig = AuthConfig()
    rate_limit: RateLimitConfig = Field(
        default=RateLimitConfig(), description="Default per-key limits (per client address with auth off)."
    )
    trusted_proxy_hops: int = Field(
        default=0, ge=0, le=8,
        description="Proxies in front of Serve that append to X-Forwarded-For; the client address is "
                    "the entry that many hops from the right (0: the connection's peer).",
    )
    session_header: str = Field(default="x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$",
                                description="Header whose value makes variant assignment sticky.")
    expected_router_replicas: int = Field(
        default=1, ge=1, le=1000,
        description="Floor for the local share of limits while Redis is unreachable (each replica "
                    "then allows limit / replicas; the live count seen in Redis is used when larger).",
    )

    store_timeout_s: float = Field(
        default=0.5, gt=0, le=5,
        description="Deadline of one limit or budget call to Redis, after which the replica falls back "
                    "to its local share. Longer than the cache's read deadline: a budget script whose "
                    "reply is lost after Redis applied it is booked again from the local side.",
    )

    @field_validator("session_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class TrafficWeights(Frozen):
    """The Router's ``user_config``: variant weights by model, changed with no restart.
    Models not named keep their configured weights."""

    weights: dict[str, dict[str, float]] = {}

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, ws in v.items():
            if any(w < 0 for w in ws.values()) or not any(w > 0 for w in ws.values()):
                raise ValueError(f"weights[{model}]: weights must be >= 0 with at least one > 0")
        return v
