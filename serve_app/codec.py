"""Cache keys and stored values: everything that decides what a cached answer is.

- ``cache_key`` covers everything that changes an answer: model, variant, program version,
  the LM settings that matter, and the canonical JSON of the inputs (key order and
  whitespace do not matter). Keys live under the configured prefix.
- Values are JSON envelopes ``{"v": 1, "exp": <wall-clock expiry>, "value": {...}}``, never
  pickle; ``decode_*`` return None for anything else (corrupt, foreign, pickled, another schema
  version, nested too deeply), and never raise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEMA_VERSION", "canonical_json", "cache_key", "encode_value", "decode_envelope", "decode_value"]

SCHEMA_VERSION = 1

def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(
    prefix: str,
    model: str,
    variant: str,
    program_version: str,
    lm_settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
) -> str:
    """``<prefix>:p:<model>:<variant>:<version>:<sha256(lm settings + inputs)>``."""
    digest = hashlib.sha256(
        canonical_json({"lm": dict(lm_settings), "inputs": dict(inputs)}).encode()
    ).hexdigest()
    return f"{prefix}:p:{model}:{variant}:{program_version}:{digest}"


def encode_value(value: Mapping[str, Any], expires_at: float | None = None) -> bytes:
    """The stored envelope; ``exp`` (wall-clock seconds) lets another replica that promotes the
    value to its memory tier keep the original expiry instead of starting a fresh one."""
    envelope: dict[str, Any] = {"v": SCHEMA_VERSION, "value": dict(value)}
    if expires_at is not None:
        envelope["exp"] = round(expires_at, 3)
    # Not canonical_json: a value keeps its key order (a program's output fields in their
    # declared order), so an answer from Redis reads like the miss that produced it.
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def decode_envelope(raw: bytes | str) -> tuple[dict[str, Any], float | None] | None:
    """``(value, expires_at)``, or None for anything that is not our current envelope."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("v") != SCHEMA_VERSION or not isinstance(obj.get("value"), dict):
        return None
    exp = obj.get("exp")
    return obj["value"], float(exp) if isinstance(exp, int | float) else None


def decode_value(raw: bytes | str) -> dict[str, Any] | None:
    """The stored value, or None for anything that is not our current envelope."""
    decoded = decode_envelope(raw)
    return None if decoded is None else decoded[0]
