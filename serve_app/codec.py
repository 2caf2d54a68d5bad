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

__all__ = ["SCHEMA_VERSION", "cache_key", "cache_key_with", "canonical_json", "decode_envelope", "decode_value",
           "encode_value"]

SCHEMA_VERSION = 1

# One encoder for every call: ``json.dumps`` with options builds a new encoder each time,
# which cost more than encoding a request's inputs.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept."""
    return _CANONICAL.encode(obj)


def cache_key(
    prefix: str,
    model: str,
    variant: str,
    program_version: str,
    lm_settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
) -> str:
    """``<prefix>:p:<model>:<variant>:<version>:<sha256(lm settings + inputs)>``."""
    return cache_key_with(prefix, model, variant, program_version, canonical_json(dict(lm_settings)), inputs)


def cache_key_with(prefix: str, model: str, variant: str, program_version: str, lm_json: str,
                   inputs: Mapping[str, Any]) -> str:
    """``cache_key`` with the LM settings already in canonical JSON (``lm_json``): a router
    encodes each deployment's settings once, not per request. The digest covers the canonical
    JSON of ``{"lm": ..., "inputs": ...}``, whose sorted keys put ``inputs`` first."""
    body = canonical_json(inputs if isinstance(inputs, dict) else dict(inputs))
    digest = hashlib.sha256(f'{{"inputs":{body},"lm":{lm_json}}}'.encode()).hexdigest()
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
