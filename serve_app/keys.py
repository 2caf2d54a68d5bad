"""API keys: loading, constant-time checking, and what a key may do.

Contract:
- ``KeyRing.load(auth, env, read)`` builds the ring from ``auth.keys`` (a SHA-256 hex
  digest, or the env var / mounted file that holds the key) and ``auth.keys_file`` (a JSON or
  YAML list of the same entries). A raw key is hashed as soon as it is read and never kept;
  a key source that is missing or empty fails the replica's start with the key's id named
  (never its value).
- ``authenticate(headers)`` takes ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
  it hashes the presented key and compares it with every configured digest using
  ``hmac.compare_digest`` (no early exit), so timing tells nothing about which digest was
  close. Missing -> ``Unauthorized`` ("missing API key"), no match -> ``Unauthorized``
  ("invalid API key"); both answer 401 with ``WWW-Authenticate: Bearer``.
- ``Principal.require_model(name)`` -> ``Forbidden`` (403) for a model the key may not call.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ApiKeyConfig, AuthConfig, BudgetConfig, RateLimitConfig, resolve_path
from .config_base import duplicates
from .errors import Forbidden, Unauthorized

__all__ = ["KeyRing", "Principal", "hash_key", "KeyConfigError"]


class KeyConfigError(ValueError):
    """A configured key source is missing or malformed (names the key id, never a value)."""


def hash_key(raw: str) -> str:
    """The digest a key is configured as: ``sha256(key).hexdigest()``."""
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key's id and rights (``anonymous`` with auth off)."""

    id: str
    models: frozenset[str]
    admin: bool
    rate_limit: RateLimitConfig | None
    budget: BudgetConfig | None
    authenticated: bool = True

    def may_call(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def require_model(self, model: str) -> None:
        if not self.may_call(model):
            raise Forbidden(f"this API key may not call model '{model}'")

    def require_admin(self) -> None:
        if self.authenticated and not self.admin:
            raise Forbidden("this endpoint needs an admin API key")


ANONYMOUS = Principal("anonymous", frozenset({"*"}), admin=True, rate_limit=None, budget=None, authenticated=False)


def _read_text(path: str) -> str:
    return resolve_path(path).read_text()


class KeyRing:
    def __init__(self, entries: list[tuple[str, ApiKeyConfig]], enabled: bool) -> None:
        self.enabled = enabled
        self._entries = [(bytes.fromhex(digest), cfg) for digest, cfg in entries]

    @classmethod
    def load(
        cls,
        auth: AuthConfig,
        env: Mapping[str, str] | None = None,
        read: Callable[[str], str] = _read_text,
        models: Collection[str] | None = None,
    ) -> "KeyRing":
        """``models``: the app's model names, to check the keys file's entries against."""
        env = os.environ if env is None else env
        configs = list(auth.keys)
        if auth.keys_file is not None:
            configs += cls._file_entries(auth.keys_file, read)
        if models is not None:
            for cfg in configs:
                unknown = sorted(set(cfg.models) - set(models) - {"*"})
                if unknown:
                    raise KeyConfigError(f"api key '{cfg.id}': models: no model named {unknown}")
        dupes = duplicates([c.id for c in configs])
        if dupes:
            raise KeyConfigError(f"api keys: duplicate id(s) {dupes}")
        entries: list[tuple[str, ApiKeyConfig]] = []
        for cfg in configs:
            if cfg.sha256 is not None:
                entries.append((cfg.sha256, cfg))
                continue
            if cfg.key_env is not None:
                raw = env.get(cfg.key_env, "")
                where = f"env var {cfg.key_env}"
            else:
                assert cfg.key_file is not None
                try:
                    raw = read(cfg.key_file)
                except OSError:
                    raise KeyConfigError(f"api key '{cfg.id}': cannot read key_file {cfg.key_file}") from None
                where = f"file {cfg.key_file}"
            raw = raw.strip()
            if len(raw) < 16:
                raise KeyConfigError(f"api key '{cfg.id}': {where} is empty or shorter than 16 characters")
            entries.append((hash_key(raw), cfg))
        if auth.enabled and not entries:
            raise KeyConfigError("auth is enabled but no API key is configured")
        return cls(entries, auth.enabled)

    @staticmethod
    def _file_entries(path: str, read: Callable[[str], str]) -> list[ApiKeyConfig]:
        try:
            text = read(path)
        except OSError:
            raise KeyConfigError(f"auth.keys_file: cannot read {path}") from None
        try:
            data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            raise KeyConfigError(f"auth.keys_file: {path} is not valid JSON/YAML") from None
        if isinstance(data, dict) and "keys" in data:
            data = data["keys"]
        if not isinstance(data, list):
            raise KeyConfigError(f"auth.keys_file: {path} must hold a list of key entries")
        out = []
        for i, item in enumerate(data):
            try:
                out.append(ApiKeyConfig.model_validate(item))
            except ValueError as exc:
                # pydantic's message names fields, never echoes a key (entries hold digests)
                first = getattr(exc, "errors", lambda: [{}])()[0]
                loc = ".".join(str(p) for p in first.get("loc", ())) or "entry"
                raise KeyConfigError(f"auth.keys_file: entry {i}: {loc}: {first.get('msg', 'invalid')}") from None
        return out

    @property
    def ids(self) -> list[str]:
        return [cfg.id for _, cfg in self._entries]

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        raw = _presented_key(headers)
        if raw is None:  # "" (an empty or non-Bearer credential) is checked, and fails, below
            raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
        digest = hashlib.sha256(raw.encode(errors="surrogateescape")).digest()
        found: ApiKeyConfig | None = None
        for expected, cfg in self._entries:  # every digest is compared: no early exit
            if hmac.compare_digest(digest, expected):
                found = cfg
        if found is None:
            raise Unauthorized("invalid API key")
        return Principal(found.id, frozenset(found.models), found.admin, found.rate_limit, found.budget)


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""  # another scheme: a key was offered, and it is not a valid one
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None
