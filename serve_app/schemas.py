"""Wire models of the HTTP API.

Requests are validated with pydantic (unknown fields rejected); responses are built as plain
dicts on the hot path and documented by the models below (``GET /openapi.json`` would use
them; tests check responses against them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PredictRequest",
    "PredictResponse",
    "UsageOut",
    "ErrorBody",
    "ErrorDetail",
    "CacheStatus",
]

CacheStatus = Literal["HIT-MEMORY", "HIT-REDIS", "MISS", "BYPASS"]


class PredictRequest(BaseModel):
    """``POST /v1/predict`` body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=64)
    inputs: dict[str, Any]
    cache: bool = True
    variant: str | None = Field(default=None, min_length=1, max_length=64,
                                description="Pin a variant (only where the model allows it).")


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int


class PredictResponse(BaseModel):
    """``POST /v1/predict`` answer. ``cached`` is true for a hit in either tier; the
    ``X-Cache`` header says which (``HIT-MEMORY``, ``HIT-REDIS``, ``MISS``, ``BYPASS``)."""

    request_id: str
    model: str
    variant: str
    program_version: str
    outputs: dict[str, Any]
    cached: bool
    usage: UsageOut
    latency_ms: float
    degraded: bool = Field(description="True when a fallback model answered instead of `model`.")
    served_by: str = Field(description="The model that produced the outputs (`model`, or its fallback).")


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
