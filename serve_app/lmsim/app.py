"""Starlette app over a :class:`SimCore`: an OpenAI-compatible surface plus admin routes.

Routes (all relative, so the app also works mounted under a prefix / with ``root_path`` set,
as Ray Serve does when it serves this app at ``/lmsim``):

    POST   /v1/chat/completions   OpenAI chat completion (``stream: true`` is refused with 400)
    GET    /v1/models             OpenAI model list
    GET    /health                {"status": "ok"}
    GET    /admin/knobs           defaults, per-model overrides and their effective knobs
    PUT    /admin/knobs           JSON partial knobs, optional "model" key; 422 on bad knobs
    POST   /admin/knobs/reset     optional {"model": ...} (or ?model=) resets one override
    GET    /admin/ledger          summary; ?request_id= / ?prompt_hash= list matching entries
    DELETE /admin/ledger          clear the ledger

Handlers only translate HTTP to ``SimCore`` calls; behaviour lives in the core.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.lmsim.core import KNOB_NAMES, KnobError, SimCore, error_body


def build_sim_app(core: SimCore | None = None) -> Starlette:
    """A Starlette app serving ``core`` (a fresh default ``SimCore`` when omitted).

    The core is also reachable as ``app.state.core`` so hosts and tests can reach the ledger.
    """
    sim = core if core is not None else SimCore()

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return JSONResponse(error_body(400, "The request body is not valid JSON."), status_code=400)
        result = await sim.complete(body, request.headers, disconnected=_disconnect_waiter(request))
        return JSONResponse(result.body, status_code=result.status, headers=result.headers)

    async def models(_: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "lmsim"} for m in sim.list_models()]
        return JSONResponse({"object": "list", "data": data})

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_knobs(_: Request) -> Response:
        return JSONResponse({**sim.knobs_snapshot(), "knob_names": list(KNOB_NAMES)})

    async def put_knobs(request: Request) -> Response:
        payload = await _json_object(request)
        if payload is None:
            return _knob_error("the body must be a JSON object of knobs, e.g. {\"error_rate\": 0.1}")
        model = payload.pop("model", None)
        if model is not None and not isinstance(model, str):
            return _knob_error("'model' must be a string or null")
        try:
            effective = sim.set_knobs(model=model, **payload)
        except KnobError as exc:
            return _knob_error(str(exc))
        return JSONResponse({"model": model, "knobs": effective.model_dump()})

    async def reset_knobs(request: Request) -> Response:
        payload = await _json_object(request) or {}
        model = payload.get("model", request.query_params.get("model"))
        if model is not None and not isinstance(model, str):
            return _knob_error("'model' must be a string or null")
        sim.reset_knobs(model)
        return JSONResponse(sim.knobs_snapshot())

    async def get_ledger(request: Request) -> Response:
        request_id = request.query_params.get("request_id")
        prompt_hash = request.query_params.get("prompt_hash")
        if request_id is None and prompt_hash is None:
            return JSONResponse(sim.ledger.summary())
        entries = [
            e.to_dict()
            for e in sim.ledger.entries()
            if (request_id is None or e.request_id == request_id)
            and (prompt_hash is None or e.prompt_hash == prompt_hash)
        ]
        return JSONResponse({"count": len(entries), "entries": entries})

    async def clear_ledger(_: Request) -> Response:
        return JSONResponse({"cleared": sim.ledger.clear()})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/admin/knobs", get_knobs, methods=["GET"]),
            Route("/admin/knobs", put_knobs, methods=["PUT"]),
            Route("/admin/knobs/reset", reset_knobs, methods=["POST"]),
            Route("/admin/ledger", get_ledger, methods=["GET"]),
            Route("/admin/ledger", clear_ledger, methods=["DELETE"]),
        ]
    )
    app.state.core = sim
    return app


def _disconnect_waiter(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine factory that returns once the client disconnects.

    After the body is read, the ASGI server's next ``receive`` message is ``http.disconnect``;
    ``SimCore`` races this against a hang's timer so hung calls end with their client.
    """

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


async def _json_object(request: Request) -> dict[str, Any] | None:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _knob_error(message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_knobs", "code": "invalid_knobs"}}
    return JSONResponse(body, status_code=422)
