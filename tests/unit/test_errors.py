"""The error tree: pickling across handles, the one HTTP mapping, and exception classification."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle
import pytest
import ray.cloudpickle
from dspy.utils.exceptions import (
    AdapterParseError,
    ContextWindowExceededError,
    LMAuthError,
    LMError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)
from ray.exceptions import RayTaskError

from serve_app import errors
from serve_app.classify import Classified, classify
from serve_app.errors import (
    ALL_ERRORS,
    BudgetExceeded,
    CircuitOpen,
    Forbidden,
    InternalError,
    InvalidRequest,
    Overloaded,
    ProgramOutputError,
    RateLimited,
    ServeAppError,
    Unauthorized,
    UnknownModel,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    to_http,
)
from serve_app.examples import Classify

CANARY = "sk-canary-123"

# ----------------------------------------------------------------------------- the tree


def test_all_errors_lists_every_public_error_class() -> None:
    public = {
        obj
        for name in errors.__all__
        if isinstance(obj := getattr(errors, name), type)
        and issubclass(obj, ServeAppError)
        and obj is not ServeAppError
    }
    assert set(ALL_ERRORS) == public
    assert len({cls.code for cls in ALL_ERRORS}) == len(ALL_ERRORS), "codes must be unique"


@pytest.mark.parametrize(
    ("cls", "code", "status", "retryable"),
    [
        (InvalidRequest, "invalid_request", 400, False),
        (Unauthorized, "unauthorized", 401, False),
        (Forbidden, "forbidden", 403, False),
        (UnknownModel, "unknown_model", 404, False),
        (RateLimited, "rate_limited", 429, True),
        (BudgetExceeded, "budget_exceeded", 429, True),
        (Overloaded, "overloaded", 503, True),
        (CircuitOpen, "circuit_open", 503, True),
        (UpstreamTimeout, "upstream_timeout", 504, True),
        (UpstreamError, "upstream_error", 502, True),
        (ProgramOutputError, "bad_program_output", 502, False),
        (InternalError, "internal", 500, False),
    ],
)
def test_design_table(cls: type[ServeAppError], code: str, status: int, retryable: bool) -> None:
    exc = cls("m")
    assert (exc.code, exc.status, exc.retryable) == (code, status, retryable)
    assert to_http(exc, "r")[0] == status


# ----------------------------------------------------------------------------- pickling


Dumper = Callable[[Any], bytes]
Loader = Callable[[bytes], Any]
PICKLERS: list[tuple[str, Dumper, Loader]] = [
    ("pickle", pickle.dumps, pickle.loads),
    ("cloudpickle", cloudpickle.dumps, cloudpickle.loads),
    ("ray.cloudpickle", ray.cloudpickle.dumps, ray.cloudpickle.loads),
]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("_name", "dumps", "loads"), PICKLERS, ids=[p[0] for p in PICKLERS])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"status": 422, "retry_after_s": 2.5, "field": "inputs.question"}],
    ids=["defaults", "all-fields"],
)
def test_errors_survive_pickling(
    cls: type[ServeAppError], _name: str, dumps: Dumper, loads: Loader, kwargs: dict[str, Any]
) -> None:
    original = cls("model 'qa' said no", **kwargs)
    copy = loads(dumps(original))
    assert type(copy) is cls
    assert (copy.message, copy.status, copy.retry_after_s, copy.field) == (
        original.message,
        original.status,
        original.retry_after_s,
        original.field,
    )
    assert str(copy) == "model 'qa' said no"
    assert copy.args == original.args
    assert to_http(copy, "r") == to_http(original, "r")


def test_a_ray_task_error_wrapping_ours_maps_like_ours() -> None:
    cause = CircuitOpen("model 'qa' is failing; calls are paused", retry_after_s=2.2)
    wrapped = RayTaskError("predict", "Traceback (most recent call last): ... /srv/app.py", cause).as_instanceof_cause()
    assert isinstance(wrapped, CircuitOpen)
    status, headers, body = to_http(wrapped, "rid-1")
    assert (status, headers["Retry-After"], body["error"]["code"]) == (503, "3", "circuit_open")
    assert "Traceback" not in body["error"]["message"]


# ----------------------------------------------------------------------------- to_http


def test_error_body_shape() -> None:
    assert error_body("c", "m", None) == {"error": {"code": "c", "message": "m", "request_id": None}}


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (2.5, "3"), (9.999, "10"), (10.0, "10"), (120.0, "120")],
)
def test_retry_after_rounds_up_to_whole_seconds_at_least_one(retry_after_s: float, header: str) -> None:
    status, headers, _ = to_http(Overloaded("busy", retry_after_s=retry_after_s), "r")
    assert status == 503
    assert headers == {"Retry-After": header}


def test_no_retry_after_without_a_hint() -> None:
    assert to_http(UpstreamTimeout("slow"), "r")[1] == {}


def test_unauthorized_carries_www_authenticate() -> None:
    status, headers, body = to_http(Unauthorized("missing API key"), "rid")
    assert status == 401
    assert headers == {"WWW-Authenticate": "Bearer"}
    assert body == {"error": {"code": "unauthorized", "message": "missing API key", "request_id": "rid"}}
    assert "WWW-Authenticate" not in to_http(Forbidden("no"), "rid")[1]


def test_status_override_is_kept() -> None:
    status, _, body = to_http(InvalidRequest("too big", status=413), "rid")
    assert status == 413
    assert body["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(f"db password {CANARY} at /srv/secret/path.py"),
        KeyError(CANARY),
        LMServerError(f"provider said {CANARY}", status=500),
        asyncio.TimeoutError(CANARY),
    ],
    ids=["runtime", "keyerror", "raw-lm-error", "timeout"],
)
def test_foreign_exceptions_are_internal_and_say_nothing(exc: BaseException) -> None:
    status, headers, body = to_http(exc, "req-42")
    assert status == 500
    assert headers == {}
    assert body["error"]["code"] == "internal"
    assert body["error"]["request_id"] == "req-42"
    assert "req-42" in body["error"]["message"]
    assert CANARY not in repr(body)
    assert "/srv" not in repr(body)


def test_to_http_never_raises_on_a_non_finite_retry_hint() -> None:
    status, headers, _ = to_http(Overloaded("busy", retry_after_s=float("inf")), "r")
    assert status == 503
    assert int(headers["Retry-After"]) >= 1


# ----------------------------------------------------------------------------- classify


def _adapter_parse_error() -> AdapterParseError:
    return AdapterParseError("ChatAdapter", Classify, lm_response=f"garbage {CANARY}", message=f"bad {CANARY}")


@pytest.mark.parametrize(
    ("exc", "cls", "status", "counts", "retry_after"),
    [
        (TimeoutError(), UpstreamTimeout, 504, True, None),
        (asyncio.TimeoutError(), UpstreamTimeout, 504, True, None),
        (LMTimeoutError(f"timed out {CANARY}"), UpstreamTimeout, 504, True, None),
        (LMRateLimitError(f"slow down {CANARY}", retry_after=10), Overloaded, 503, True, 10.0),
        (LMServerError(f"500 {CANARY}", status=500), UpstreamError, 502, True, None),
        (LMServerError(f"529 {CANARY}", status=529), UpstreamError, 502, True, None),
        (LMTransportError(f"connection reset {CANARY}"), UpstreamError, 502, True, None),
        (LMTransportError(f"Read timed out {CANARY}"), UpstreamTimeout, 504, True, None),
        (LMAuthError(f"bad key {CANARY}", status=401), UpstreamError, 502, True, None),
        (LMError(f"something {CANARY}"), UpstreamError, 502, True, None),
        (ContextWindowExceededError(model="openai/x"), InvalidRequest, 422, False, None),
        (LMInvalidRequestError(f"content policy {CANARY}", status=400), InvalidRequest, 422, False, None),
        (_adapter_parse_error(), ProgramOutputError, 502, False, None),
        (RuntimeError(f"bug {CANARY}"), InternalError, 500, False, None),
        (KeyError(CANARY), InternalError, 500, False, None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_classify_table(
    exc: BaseException, cls: type[ServeAppError], status: int, counts: bool, retry_after: float | None
) -> None:
    result = classify(exc, "qa")
    assert isinstance(result, Classified)
    assert type(result.error) is cls
    assert result.error.status == status
    assert result.counts_as_failure is counts
    assert result.retry_after_s == retry_after
    assert "qa" in result.error.message
    # No provider text reaches the client: it may quote the request or carry a key.
    assert CANARY not in result.error.message
    assert CANARY not in repr(to_http(result.error, "r"))


def test_provider_rate_limit_becomes_retry_after_for_the_client() -> None:
    result = classify(LMRateLimitError("x", retry_after=10), "qa")
    assert result.error.retry_after_s == 10.0
    assert to_http(result.error, "r")[1] == {"Retry-After": "10"}


@pytest.mark.parametrize("hint", [None, 0, -3, "soon", float("nan")])
def test_rate_limit_without_a_usable_hint_still_tells_the_client_to_retry(hint: Any) -> None:
    result = classify(LMRateLimitError("x", retry_after=hint), "qa")
    assert result.counts_as_failure
    assert result.retry_after_s is None  # the breaker gets no forced-open hint
    assert result.error.retry_after_s == 1.0
    assert to_http(result.error, "r")[1] == {"Retry-After": "1"}


@pytest.mark.parametrize(
    "ours", [InvalidRequest("bad", status=422, field="inputs.x"), RateLimited("slow", retry_after_s=3)]
)
def test_our_own_errors_pass_through_and_never_count(ours: ServeAppError) -> None:
    result = classify(ours, "qa")
    assert result.error is ours
    assert result.counts_as_failure is False


def test_classify_never_raises_on_odd_exceptions() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    assert type(classify(Weird(), "qa").error) is InternalError
