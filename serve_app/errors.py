"""Every error a client can see, and the one mapping from exception to HTTP.

The tree::

    ServeAppError                      code              HTTP  retryable
    ├── InvalidRequest                 invalid_request   400 (413/415/422 via status)  no
    ├── Unauthorized                   unauthorized      401   no
    ├── Forbidden                      forbidden         403   no
    ├── UnknownModel                   unknown_model     404   no
    ├── RateLimited                    rate_limited      429 + Retry-After  yes
    ├── BudgetExceeded                 budget_exceeded   429 + Retry-After  later
    ├── Overloaded                     overloaded        503 + Retry-After  yes
    ├── CircuitOpen                    circuit_open      503 + Retry-After  yes
    ├── UpstreamTimeout                upstream_timeout  504   yes
    ├── UpstreamError                  upstream_error    502   yes
    ├── ProgramOutputError             bad_program_output 502  no
    └── InternalError                  internal          500   no

Contract:
- ``code`` is stable and machine-readable; ``message`` is for humans and never carries a
  traceback, a file path, a provider's error text or a secret.
- Errors cross Ray Serve handles, so they must survive pickling: every constructor passes
  its own arguments to ``super().__init__`` (``BaseException.__reduce__`` replays ``args``).
- ``to_http`` is the only place an exception becomes a status, headers and a JSON body.
  Anything that is not a ``ServeAppError`` becomes ``internal`` with the request id and no
  detail, so nothing internal leaks.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "ServeAppError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "UnknownModel",
    "RateLimited",
    "BudgetExceeded",
    "Overloaded",
    "CircuitOpen",
    "UpstreamTimeout",
    "UpstreamError",
    "ProgramOutputError",
    "InternalError",
    "ALL_ERRORS",
    "to_http",
    "error_body",
]


class ServeAppError(Exception):
    """Base of every client-visible error."""

    code: ClassVar[str] = "internal"
    default_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        field: str | None = None,
    ) -> None:
        # Positional + keyword args are both replayed by __reduce__ below, so the error
        # survives pickling across Serve handles with every attribute intact.
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else self.default_status
        self.retry_after_s = retry_after_s
        self.field = field
        # Extra response headers set where the error is raised (X-RateLimit-* on a 429);
        # process-local: not carried through pickling.
        self.rate_headers: dict[str, str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), self.message, self.status, self.retry_after_s, self.field),
        )

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


def _rebuild(
    cls: type[ServeAppError],
    message: str,
    status: int,
    retry_after_s: float | None,
    field: str | None,
) -> ServeAppError:
    return cls(message, status=status, retry_after_s=retry_after_s, field=field)


class InvalidRequest(ServeAppError):
    """The request is malformed: bad JSON (400), too large (413), wrong type (415), or
    failing validation (422). ``field`` names the offending field where there is one."""

    code = "invalid_request"
    default_status = 400


class Unauthorized(ServeAppError):
    code = "unauthorized"
    default_status = 401


class Forbidden(ServeAppError):
    code = "forbidden"
    default_status = 403


class UnknownModel(ServeAppError):
    code = "unknown_model"
    default_status = 404


class RateLimited(ServeAppError):
    code = "rate_limited"
    default_status = 429
    retryable = True


class BudgetExceeded(ServeAppError):
    code = "budget_exceeded"
    default_status = 429
    retryable = True


class Overloaded(ServeAppError):
    code = "overloaded"
    default_status = 503
    retryable = True


class CircuitOpen(ServeAppError):
    code = "circuit_open"
    default_status = 503
    retryable = True


class UpstreamTimeout(ServeAppError):
    code = "upstream_timeout"
    default_status = 504
    retryable = True


class UpstreamError(ServeAppError):
    code = "upstream_error"
    default_status = 502
    retryable = True


class ProgramOutputError(ServeAppError):
    """The LM answered, but the program could not turn the answer into its outputs."""

    code = "bad_program_output"
    default_status = 502


class InternalError(ServeAppError):
    code = "internal"
    default_status = 500


MAX_RETRY_AFTER_S = 3600

ALL_ERRORS: tuple[type[ServeAppError], ...] = (
    InvalidRequest,
    Unauthorized,
    Forbidden,
    UnknownModel,
    RateLimited,
    BudgetExceeded,
    Overloaded,
    CircuitOpen,
    UpstreamTimeout,
    UpstreamError,
    ProgramOutputError,
    InternalError,
)


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    """The wire shape of every error: ``{"error": {"code", "message", "request_id"}}``."""
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def to_http(exc: BaseException, request_id: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Map any exception to ``(status, headers, body)``.

    A ``RayTaskError`` wrapping one of ours is also an instance of it, so handle errors map
    like local ones. Anything else is ``internal`` with no detail beyond the request id.
    """
    if not isinstance(exc, ServeAppError):
        return (
            500,
            {},
            error_body("internal", f"internal error (request {request_id})", request_id),
        )
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        # Retry-After is whole seconds; round up so a client never retries too early, and
        # bound it: a provider's absurd hint must not break the answer or park a client.
        hint = exc.retry_after_s if math.isfinite(exc.retry_after_s) else MAX_RETRY_AFTER_S
        headers["Retry-After"] = str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(hint))))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return exc.status, headers, error_body(exc.code, exc.message, request_id)
