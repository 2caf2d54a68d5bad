"""The base of the config tree: the frozen model, names, paths and the LM block.

Split from ``config`` so ``policy_config`` can build on it without an import cycle; both are
re-exported by ``config``, the tree's one entry point.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = ["Frozen", "LMConfig", "Name", "PROJECT_ROOT", "resolve_path", "RESERVED_DEPLOYMENT_NAMES", "duplicates"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESERVED_DEPLOYMENT_NAMES = frozenset({"Router", "Cache", "LMSimulator"})
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def _check_name(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError("must match ^[a-z][a-z0-9_-]{0,62}$")
    return v


def duplicates(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted (for "duplicate name(s) [...]" errors)."""
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


# A name that becomes part of deployment names, metric labels and Redis keys.
Name = Annotated[str, AfterValidator(_check_name)]
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
    max_connections: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Connections to the LM per predictor replica. DSPy's own pool stops at 100: calls past "
        "it wait for a free connection, whatever max_ongoing_requests admits.",
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
