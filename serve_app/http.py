"""The HTTP API as a Starlette app over a ``RouterCore``.

Routes: ``POST /v1/predict``, ``GET /v1/models``, ``GET /health`` (liveness),
``GET /ready`` (every predictor and the cache answer), ``GET /costs`` (tokens and dollars by
model, variant and module), ``GET /config`` (the effective config, allow-listed), ``GET /``.

Admission order on ``POST /v1/predict`` (cheapest first; nothing here touches an LM or a
breaker): API key (401, before any body is read) -> rate limit (429) -> content type (415)
-> declared length (413, before reading) -> streamed length (413, stops reading at the
limit) -> JSON syntax, nesting depth and string length (400) -> request shape (422 naming
the field) -> the router core (404 unknown model, 403 model not allowed for the key, 429
budget). ``X-RateLimit-*`` headers go on every prediction response once the rate limit was
checked, errors included.

Keys: ``/v1/predict`` and ``/v1/models`` need a key when auth is on (the model list shows
what the key may call); ``/config`` and ``/costs`` need an admin key; ``/health``,
``/ready`` and ``/`` need none. CORS and GZip are middleware, configured in ``http:``.

Every error leaves through ``errors.to_http`` as ``{"error": {code, message, request_id}}``.
The request id is Serve's (the proxy sets ``x-request-id`` on the request and adds
``X-Request-ID`` to the response); outside Serve a fresh one is made.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Route

from . import __version__
from .errors import InvalidRequest, ServeAppError, to_http
from .keys import Principal
from .router import RouterCore
from .schemas import PredictRequest

__all__ = ["build_http_app", "read_json_body"]

logger = logging.getLogger("ray.serve")

Handler = Callable[[Request, str], Awaitable[Response]]


class JSONResponse(StarletteJSONResponse):
    """Starlette's ``JSONResponse``, byte for byte, with one encoder for every response:
    ``json.dumps`` with options builds a new encoder per call, a visible share of a hit."""

    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))

    def render(self, content: Any) -> bytes:
        return self._encoder.encode(content).encode("utf-8")


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json_body(request: Request, limit: int, max_depth: int = 32, max_string: int = 1 << 62) -> Any:
    """Read and parse a JSON body of at most ``limit`` bytes, ``max_depth`` levels of nesting
    and strings of at most ``max_string`` characters, or raise ``InvalidRequest``."""
    if not _is_json(request.headers.get("content-type", "")):
        raise InvalidRequest("content type must be application/json", status=415)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length", status=400)
        if int(declared) > limit:
            raise InvalidRequest(f"request body over {limit} bytes", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body with no length is cut off here
            raise InvalidRequest(f"request body over {limit} bytes", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InvalidRequest("request JSON is nested too deeply", status=400) from None
    except ValueError:
        raise InvalidRequest("request body is not valid JSON", status=400) from None
    if _may_break_shape(raw, max_depth, max_string):
        problem = _shape_problem(data, max_depth, max_string)
        if problem:
            raise InvalidRequest(problem, status=400)
    return data


def _may_break_shape(raw: bytes, max_depth: int, max_string: int) -> bool:
    """False when the body's bytes alone rule out a shape problem (most bodies, checked in C):
    every nesting level opens with ``[`` or ``{`` and no string is longer than the body."""
    return len(raw) > max_string or raw.count(b"[") + raw.count(b"{") > max_depth


def _shape_problem(data: Any, max_depth: int, max_string: int) -> str | None:
    """Iterative (no recursion) check of nesting depth and string lengths (keys too)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if len(node) > max_string:
                return f"request JSON has a string longer than {max_string} characters"
        elif isinstance(node, dict | list):
            if depth > max_depth:
                return f"request JSON is nested deeper than {max_depth} levels"
            if isinstance(node, dict):
                stack.extend((k, depth) for k in node)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | str))
    return None


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    msg = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    return InvalidRequest(f"field '{loc}': {msg}", status=422, field=loc)


class HttpApi:
    """Bound-method route handlers over a router core."""

    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def _guard(self, request: Request, handler: Handler) -> Response:
        request_id = _request_id(request)
        try:
            return await handler(request, request_id)
        except Exception as exc:  # noqa: BLE001 - the one place exceptions become responses
            status, headers, body = to_http(exc, request_id)
            if status >= 500 and body["error"]["code"] == "internal":
                logger.error("request %s failed: %s", request_id, type(exc).__name__, exc_info=exc)
            # Rate-limit headers of an admitted (or refused) request go on its error too.
            headers.update(getattr(request.state, "rate_headers", None) or getattr(exc, "rate_headers", None) or {})
            return JSONResponse(body, status_code=status, headers=headers)

    def _principal(self, request: Request) -> Principal:
        return self.core.policy.keys.authenticate(request.headers)

    async def predict(self, request: Request) -> Response:
        return await self._guard(request, self._predict)

    async def _predict(self, request: Request, request_id: str) -> Response:
        limits = self.core.args.limits
        try:
            peer = request.client.host if request.client else None
            admission = await self.core.policy.admit(request.headers, peer)
        except ServeAppError as exc:
            self.core.record_error(None, exc.code)
            raise
        request.state.rate_headers = admission.headers()
        try:
            raw = await read_json_body(request, limits.max_body_bytes, limits.max_json_depth,
                                       self.core.args.http.max_string_chars)
            try:
                body = PredictRequest.model_validate(raw)
            except ValidationError as exc:
                raise _validation_error(exc) from None
        except InvalidRequest as exc:
            self.core.record_error(None, exc.code)  # the core never saw this request
            raise
        outcome = await self.core.predict(body, request_id, admission)
        return JSONResponse(outcome.body, headers=outcome.headers)

    async def models(self, request: Request) -> Response:
        async def handler(_: Request, __: str) -> Response:
            principal = self._principal(request)
            models = [m for m in await self.core.models() if principal.may_call(m["name"])]
            return JSONResponse({"models": models})

        return await self._guard(request, handler)

    async def costs(self, request: Request) -> Response:
        async def handler(_: Request, __: str) -> Response:
            self._principal(request).require_admin()
            return JSONResponse(await self.core.costs())

        return await self._guard(request, handler)

    async def config(self, request: Request) -> Response:
        async def handler(_: Request, __: str) -> Response:
            self._principal(request).require_admin()
            return JSONResponse(self.core.args.public_view())

        return await self._guard(request, handler)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        async def handler(_: Request, __: str) -> Response:
            ok, detail = await self.core.ready()
            return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

        return await self._guard(request, handler)

    async def index(self, request: Request) -> Response:
        return JSONResponse(
            {
                "service": self.core.args.service_name,
                "version": __version__,
                "models": [m.name for m in self.core.args.models],
                "links": {
                    "predict": "POST /v1/predict",
                    "models": "/v1/models",
                    "health": "/health",
                    "ready": "/ready",
                    "costs": "/costs",
                    "config": "/config",
                },
            }
        )


def _middleware(core: RouterCore) -> list[Middleware]:
    cfg = core.args.http
    out = []
    if cfg.cors_origins:
        out.append(Middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id",
                           core.args.policy.session_header],
            expose_headers=["X-Request-ID", "X-Cache", "X-Model-Variant", "X-Cost-USD", "X-Response-Time",
                            "X-Degraded", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                            "Retry-After", "Server-Timing"],
            max_age=600,
        ))
    if cfg.gzip_min_bytes is not None:
        out.append(Middleware(GZipMiddleware, minimum_size=cfg.gzip_min_bytes))
    return out


def build_http_app(core: RouterCore) -> Starlette:
    api = HttpApi(core)
    return Starlette(
        middleware=_middleware(core),
        routes=[
            Route("/v1/predict", api.predict, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/costs", api.costs, methods=["GET"]),
            Route("/config", api.config, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/ready", api.ready, methods=["GET"]),
            Route("/", api.index, methods=["GET"]),
        ]
    )
