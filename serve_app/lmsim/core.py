"""SimCore: the simulator's state and behaviour, free of HTTP and of global state.

Contract:
    * ``Knobs`` (frozen, validated) shape every call: fixed + jittered latency, injected errors
      (429/500/503/529, optional ``Retry-After``), hangs, malformed replies, and a seed.
      Defaults apply to every model; a partial override may be scoped to one model name.
      Knob sets are replaced atomically; a bad knob raises :class:`KnobError` and changes nothing.
    * Per call, outcomes are drawn in order error -> hang -> malformed, each with its own
      uniform draw from a per-model RNG seeded by ``seed`` (reproducible per model).
    * Every call is recorded in the :class:`Ledger` before any waiting, so a call cancelled
      mid-latency or mid-hang is still counted.
    * ``sleep`` and ``clock`` are injected, so tests never really wait.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.lmsim import answers

Sleep = Callable[[float], Awaitable[Any]]
RngFactory = Callable[[int, str], random.Random]

_ERROR_TYPES: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "Invalid request"),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached (simulated)"),
    499: ("client_closed_request", "client_closed", "Client closed the request while it hung (simulated)"),
    500: ("server_error", "internal_error", "Internal server error (simulated)"),
    503: ("server_error", "service_unavailable", "Service unavailable (simulated)"),
    504: ("timeout_error", "hang_timeout", "The request hung until hang_s elapsed (simulated)"),
    529: ("overloaded_error", "overloaded", "Overloaded (simulated)"),
}


class KnobError(ValueError):
    """Invalid knob names or values; the message names each offending knob."""


class Knobs(BaseModel):
    """Behaviour of the simulator for one scope (defaults, or one model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0, description="fixed delay added to every answered call")
    jitter_ms: float = Field(default=0.0, ge=0, description="uniform extra delay in [0, jitter_ms]")
    error_rate: float = Field(default=0.0, ge=0, le=1, description="probability of an HTTP error reply")
    error_status: Literal[429, 500, 503, 529] = Field(default=500, description="status of injected errors")
    retry_after_s: float | None = Field(default=None, ge=0, description="Retry-After sent with 429/503")
    hang_rate: float = Field(default=0.0, ge=0, le=1, description="probability a call hangs")
    hang_s: float = Field(default=3600.0, gt=0, description="a hang ends (504) after this, or on disconnect")
    malformed_rate: float = Field(default=0.0, ge=0, le=1, description="probability of an unparseable 200 reply")
    seed: int = Field(default=0, description="seeds the per-model outcome/jitter RNG")


KNOB_NAMES: tuple[str, ...] = tuple(Knobs.model_fields)


def validate_knobs(values: Mapping[str, Any]) -> Knobs:
    """A full :class:`Knobs` from ``values`` or a :class:`KnobError` naming every problem."""
    try:
        return Knobs.model_validate(dict(values))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "knobs"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown knob {name!r} (known: {', '.join(KNOB_NAMES)})")
            else:
                problems.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise KnobError("invalid knobs: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class SimResponse:
    """What the HTTP layer sends: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape ``{"error": {"message", "type", "code"}}``."""
    kind, code, default = _ERROR_TYPES.get(status, ("server_error", str(status), "Error (simulated)"))
    return {"error": {"message": message or default, "type": kind, "code": code, "param": None}}


def _default_rng(seed: int, model: str) -> random.Random:
    # String seeds hash with sha512 inside random, so streams are stable across processes.
    return random.Random(f"lmsim:{seed}:{model}")


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded call. ``outcome`` is "ok", "error:<status>", "hang" or "malformed"."""

    seq: int
    timestamp: float
    request_id: str | None
    model: str
    prompt_hash: str
    outcome: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """Record of calls: the last ``max_entries`` entries, plus exact running counters.

    ``total``/``by_outcome``/``by_model``/token totals count every call since the last clear;
    lookups by request id or prompt hash see only the retained entries.
    """

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._entries: deque[LedgerEntry] = deque(maxlen=max_entries)
        self._clock = clock
        self._lock = threading.Lock()
        self._clear_counters()

    def _clear_counters(self) -> None:
        self._seq = 0
        self._by_outcome: Counter[str] = Counter()
        self._by_model: Counter[str] = Counter()
        self._tokens = [0, 0]

    def record(self, *, request_id: str | None, model: str, prompt_hash: str, outcome: str,
               prompt_tokens: int = 0, completion_tokens: int = 0) -> LedgerEntry:
        with self._lock:
            self._seq += 1
            entry = LedgerEntry(self._seq, self._clock(), request_id, model, prompt_hash, outcome,
                                prompt_tokens, completion_tokens)
            self._entries.append(entry)
            self._by_outcome[outcome] += 1
            self._by_model[model] += 1
            self._tokens[0] += prompt_tokens
            self._tokens[1] += completion_tokens
            return entry

    @property
    def total(self) -> int:
        """Exact number of calls since the last clear."""
        return self._seq

    def entries(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._entries)

    def by_request_id(self, request_id: str) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.request_id == request_id]

    def by_prompt_hash(self, prompt_hash: str) -> list[LedgerEntry]:
        return [e for e in self.entries() if e.prompt_hash == prompt_hash]

    def count(self, *, request_id: str | None = None, prompt_hash: str | None = None) -> int:
        """Retained calls matching every given filter (all retained calls when none given)."""
        return sum(
            1 for e in self.entries()
            if (request_id is None or e.request_id == request_id)
            and (prompt_hash is None or e.prompt_hash == prompt_hash)
        )

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self._seq,
                "retained": len(self._entries),
                "max_entries": self._entries.maxlen,
                "by_outcome": dict(self._by_outcome),
                "by_model": dict(self._by_model),
                "prompt_tokens": self._tokens[0],
                "completion_tokens": self._tokens[1],
            }

    def clear(self) -> int:
        """Forget everything; returns how many calls had been counted."""
        with self._lock:
            total = self._seq
            self._entries.clear()
            self._clear_counters()
            return total


class SimCore:
    """Simulator state: knobs, per-model RNGs, ledger. One instance per server (no globals)."""

    def __init__(
        self,
        knobs: Knobs | Mapping[str, Any] | None = None,
        *,
        ledger_size: int = 100_000,
        models: tuple[str, ...] = ("sim-model",),
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        rng_factory: RngFactory = _default_rng,
    ) -> None:
        self._initial = knobs if isinstance(knobs, Knobs) else validate_knobs(knobs or {})
        # (defaults, raw per-model overrides, effective per-model knobs), swapped as one object.
        self._state: tuple[Knobs, dict[str, dict[str, Any]], dict[str, Knobs]] = (self._initial, {}, {})
        self._rngs: dict[tuple[str, int], random.Random] = {}
        self._lock = threading.Lock()
        self._clock, self._sleep, self._rng_factory = clock, sleep, rng_factory
        self._models = tuple(models)
        self._ids = itertools.count(1)  # response ids stay unique across ledger clears
        self.ledger = Ledger(ledger_size, clock=clock)

    # ------------------------------------------------------------------ knobs

    @property
    def knobs(self) -> Knobs:
        """The default knobs (models without an override use these)."""
        return self._state[0]

    def knobs_for(self, model: str | None) -> Knobs:
        """Effective knobs for ``model``: defaults updated by its partial override, if any."""
        # One dict lookup per call: effective sets are precomputed whenever knobs change.
        defaults, _, effective = self._state
        return effective.get(model, defaults) if model is not None else defaults

    def set_knobs(self, model: str | None = None, **partial: Any) -> Knobs:
        """Update knobs for ``model`` (``None``: the defaults) and return its effective knobs.

        Validates the whole resulting state first; on error nothing changes. A model override is
        partial: knobs it does not name keep following the defaults.
        """
        with self._lock:
            defaults, overrides, _ = self._state
            if model is None:
                defaults = validate_knobs({**defaults.model_dump(), **partial})
            else:
                overrides = {**overrides, model: {**overrides.get(model, {}), **partial}}
            self._install(defaults, overrides)
            if "seed" in partial:
                self._rngs.clear()
            return self.knobs_for(model)

    def reset_knobs(self, model: str | None = None) -> None:
        """Drop ``model``'s override, or (``None``) restore construction-time defaults and drop all."""
        with self._lock:
            defaults, overrides, _ = self._state
            if model is None:
                self._install(self._initial, {})
            else:
                self._install(defaults, {k: v for k, v in overrides.items() if k != model})
            self._rngs.clear()

    def _install(self, defaults: Knobs, overrides: dict[str, dict[str, Any]]) -> None:
        """Validate every effective set, then swap state in (readers never see a mix)."""
        effective = {m: validate_knobs({**defaults.model_dump(), **o}) for m, o in overrides.items()}
        self._state = (defaults, overrides, effective)

    def knobs_snapshot(self) -> dict[str, Any]:
        """JSON-ready view: defaults, raw per-model overrides, and their effective knob sets."""
        defaults, overrides, effective = self._state
        return {
            "defaults": defaults.model_dump(),
            "overrides": {m: dict(v) for m, v in overrides.items()},
            "effective": {m: k.model_dump() for m, k in effective.items()},
        }

    def list_models(self) -> list[str]:
        """Configured model names, plus any with an override or seen in the ledger."""
        seen = [m for m in self.ledger.summary()["by_model"] if m]
        return list(dict.fromkeys([*self._models, *self._state[1], *seen]))

    # ------------------------------------------------------------------ calls

    async def complete(
        self,
        body: Any,
        headers: Mapping[str, str] | None = None,
        *,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> SimResponse:
        """Answer one chat-completions ``body``.

        ``headers`` supplies ``X-Request-ID`` (case-insensitive) for the ledger. ``disconnected``
        returns when the client goes away; a hang ends then (499) or after ``hang_s`` (504).
        Outcomes: 200 answer, injected error, hang, or a 200 whose content is garbage.
        """
        request_id = _header(headers or {}, "x-request-id")
        problem = _invalid(body)
        if problem is not None:
            model = str(body.get("model") or "") if isinstance(body, Mapping) else ""
            phash = answers.prompt_hash(body.get("messages") if isinstance(body, Mapping) else None)
            self.ledger.record(request_id=request_id, model=model, prompt_hash=phash, outcome="error:400")
            return self._error(400, request_id, problem)
        model = str(body["model"])
        knobs = self.knobs_for(model)
        rng = self._rng(model, knobs.seed)
        outcome = _draw(knobs, rng)
        phash = answers.prompt_hash(body["messages"])
        if outcome in ("ok", "malformed"):
            ans = answers.answer(body)
            content = ans.content if outcome == "ok" else answers.malformed(body)
            prompt_tokens, completion_tokens = ans.prompt_tokens, answers.count_tokens(content)
        else:
            content = ""
            prompt_tokens, completion_tokens = answers.count_tokens(_prompt_text(body)), 0
        n = _choices(body)
        self.ledger.record(
            request_id=request_id, model=model, prompt_hash=phash, outcome=outcome,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens * n,
        )
        if outcome == "hang":
            gone = await self._hang(knobs.hang_s, disconnected)
            return self._error(499 if gone else 504, request_id)
        delay_ms = knobs.latency_ms + (rng.uniform(0.0, knobs.jitter_ms) if knobs.jitter_ms > 0 else 0.0)
        if delay_ms > 0:
            await self._sleep(delay_ms / 1000.0)
        if outcome.startswith("error:"):
            extra = {}
            if knobs.error_status in (429, 503) and knobs.retry_after_s is not None:
                extra["Retry-After"] = f"{knobs.retry_after_s:g}"
            return self._error(knobs.error_status, request_id, headers=extra)
        choice = {"role": "assistant", "content": content}
        body_out = {
            "id": f"chatcmpl-lmsim-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(self._clock()),
            "model": model,
            "system_fingerprint": "lmsim",
            "choices": [
                {"index": i, "message": dict(choice), "logprobs": None, "finish_reason": "stop"} for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens * n,
                "total_tokens": prompt_tokens + completion_tokens * n,
            },
        }
        return SimResponse(200, body_out, _echo(request_id, outcome))

    # ------------------------------------------------------------------ helpers

    def _rng(self, model: str, seed: int) -> random.Random:
        with self._lock:
            rng = self._rngs.get((model, seed))
            if rng is None:
                rng = self._rngs[(model, seed)] = self._rng_factory(seed, model)
            return rng

    async def _hang(self, hang_s: float, disconnected: Callable[[], Awaitable[Any]] | None) -> bool:
        """Wait ``hang_s`` or until ``disconnected`` returns; True when the client left first."""
        if disconnected is None:
            await self._sleep(hang_s)
            return False
        timer = asyncio.ensure_future(self._sleep(hang_s))
        gone = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({timer, gone}, return_when=asyncio.FIRST_COMPLETED)
            return gone in done and timer not in done
        finally:
            for task in (timer, gone):
                task.cancel()
            await asyncio.gather(timer, gone, return_exceptions=True)

    def _error(
        self, status: int, request_id: str | None, message: str | None = None, *, headers: dict[str, str] | None = None
    ) -> SimResponse:
        outcome = "hang" if status in (499, 504) else f"error:{status}"
        return SimResponse(status, error_body(status, message), {**_echo(request_id, outcome), **(headers or {})})


def _draw(knobs: Knobs, rng: random.Random) -> str:
    # Independent draws in a fixed order keep each rate meaningful when set to 1.0 and
    # keep the RNG stream (hence reproducibility) independent of which knobs are zero.
    error, hang, bad = rng.random(), rng.random(), rng.random()
    if error < knobs.error_rate:
        return f"error:{knobs.error_status}"
    if hang < knobs.hang_rate:
        return "hang"
    if bad < knobs.malformed_rate:
        return "malformed"
    return "ok"


def _invalid(body: Any) -> str | None:
    if not isinstance(body, Mapping):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required and must be a non-empty string."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
        return "'messages' must be a non-empty list of message objects."
    if body.get("stream"):
        return "Streaming is not supported by lmsim; send stream=false (DSPy does not stream here)."
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16):
        return "'n' must be an integer between 1 and 16."
    return None


def _choices(body: Mapping[str, Any]) -> int:
    return int(body.get("n") or 1)


def _prompt_text(body: Mapping[str, Any]) -> str:
    return "\n\n".join(m["content"] for m in answers.canonical_messages(body.get("messages")))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value or None


def _echo(request_id: str | None, outcome: str) -> dict[str, str]:
    headers = {"x-lmsim-outcome": outcome}
    if request_id:
        headers["x-request-id"] = request_id
    return headers
