"""The one place that decides what an exception from a program call means.

``classify(exc)`` returns the client-visible error and whether the call counts against the
model's circuit breaker:

| raised by the call                                   | client sees            | breaker  |
|------------------------------------------------------|------------------------|----------|
| our deadline, ``LMTimeoutError``, a transport timeout | 504 upstream_timeout  | failure  |
| ``LMRateLimitError`` (provider 429)                  | 503 overloaded + R-A   | failure, open >= Retry-After |
| ``LMServerError`` (5xx, 529), ``LMTransportError``,  | 502 upstream_error     | failure  |
| ``LMAuthError``, other provider/unexpected LM errors |                        |          |
| ``ContextWindowExceededError``, ``LMInvalidRequestError`` (bad input, content policy) | 422 invalid_request | untouched |
| ``AdapterParseError`` (LM answered, program could not parse) | 502 bad_program_output | untouched |
| one of our own errors (bad input, rate limit, ...)   | itself                 | untouched |
| anything else (a bug in the program)                 | 500 internal           | untouched |

Client cancellation (``asyncio.CancelledError``) is never classified: it propagates and the
breaker permit is released without an outcome. No provider text reaches the client: it may
quote the request or carry a key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dspy.utils.exceptions import (
    AdapterParseError,
    ContextWindowExceededError,
    LMError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMTimeoutError,
    LMTransportError,
)

from .errors import (
    InternalError,
    InvalidRequest,
    Overloaded,
    ProgramOutputError,
    ServeAppError,
    UpstreamError,
    UpstreamTimeout,
)

__all__ = ["Classified", "classify"]


@dataclass(frozen=True)
class Classified:
    error: ServeAppError
    counts_as_failure: bool
    retry_after_s: float | None = None


def classify(exc: BaseException, model: str) -> Classified:
    """Map an exception raised while running ``model``'s program. Never raises."""
    if isinstance(exc, ServeAppError):
        return Classified(exc, counts_as_failure=False)
    if isinstance(exc, TimeoutError | LMTimeoutError) or _transport_timeout(exc):
        return Classified(UpstreamTimeout(f"model '{model}' did not answer in time"), True)
    if isinstance(exc, LMRateLimitError):
        retry = _positive(exc.retry_after)
        return Classified(
            Overloaded(f"model '{model}' provider is rate limiting; retry later", retry_after_s=retry or 1.0),
            True,
            retry,
        )
    if isinstance(exc, ContextWindowExceededError):
        return Classified(
            InvalidRequest(f"the inputs are too long for model '{model}'s context window", status=422), False
        )
    if isinstance(exc, LMInvalidRequestError):
        return Classified(InvalidRequest(f"model '{model}' provider rejected these inputs", status=422), False)
    if isinstance(exc, AdapterParseError):
        return Classified(ProgramOutputError(f"model '{model}' answered, but its output could not be parsed"), False)
    if isinstance(exc, LMError):
        return Classified(UpstreamError(f"model '{model}' provider failed"), True)
    return Classified(InternalError(f"model '{model}' program failed"), False)


def _transport_timeout(exc: BaseException) -> bool:
    # DSPy's native engine reports its client timeout as a transport error ("read timed
    # out"), not as LMTimeoutError; to the client it is a timeout all the same.
    return isinstance(exc, LMTransportError) and "timed out" in str(exc).lower()


def _positive(value: object) -> float | None:
    """A usable provider Retry-After: finite, positive, at most an hour."""
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return min(f, 3600.0) if math.isfinite(f) and f > 0 else None
