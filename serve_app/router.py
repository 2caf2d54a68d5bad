"""The router core: admission, cache-through, coalescing, and the prediction answer.

Plain Python: the Router deployment hands it clients for the predictors and the cache
(handles in production, fakes in unit tests) and a clock.

Contract of ``RouterCore.predict(request, request_id)``:
- unknown model -> 404; inputs checked against the model's input fields before any hop
  (422 naming the field, no LM call);
- ``cache: false`` (or a disabled cache) goes straight to the predictor (``X-Cache: BYPASS``);
- otherwise the router's near cache answers repeated hits without a hop (a hit whose model
  info is known without any await); then the Cache deployment is asked, unless the key index
  says it cannot hold the key (``serve_app.router_cache``: near cache, key index, batched
  hops); a slow or failing cache, or a value that is not a prediction, is a miss plus a
  counter, never a failed request;
- identical concurrent misses share one predictor call (``SingleFlight``);
- a successful prediction is written back after the waiters are answered, under the key of
  the program version that actually answered; errors are never cached;
- the whole call has the router deadline (``limits.request_timeout_s``);
- when a model with a ``fallback`` fails retryably (breaker open, provider error, timeout,
  rate limit), the fallback model answers through the same cache-through path and the
  response says ``degraded: true``, ``served_by`` and ``X-Degraded``.

The program version used in cache keys comes from each predictor's ``info()``, refreshed
every ``info_refresh_s`` and immediately whenever a prediction reports a newer version.
After a hot swap, a lookup may use the old version for at most one refresh interval; the
answer then carries the old version in ``program_version``, so it is labelled honestly.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

from .budget import Reservation
from .codec import cache_key_with, canonical_json
from .config import DEFAULT_VARIANT, AppArgs, ModelConfig, Variant
from .directory import ModelDirectory
from .errors import (
    CircuitOpen,
    Overloaded,
    ServeAppError,
    UnknownModel,
    UpstreamError,
    UpstreamTimeout,
)
from .keys import KeyRing
from .logs import log_prediction
from .metrics import Counters
from .policy import OPEN_DOOR, Admission, TrafficPolicy
from .policy_store import PolicyStore
from .predictor import ModelInfoPayload, PredictionPayload, validate_inputs
from .router_cache import CacheClient, RouterCache
from .schemas import CacheStatus, PredictRequest
from .singleflight import SingleFlight
from .usage_queue import UsageQueue

__all__ = ["DEFAULT_VARIANT", "CacheClient", "PredictOutcome", "PredictorClient", "RouterCore"]
_FREE: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "by_module": {}}

# Failures of a model that another model can cover (all retryable, none the client's fault).
_FALLBACK_ON = (CircuitOpen, UpstreamError, UpstreamTimeout, Overloaded)
# Failures that move a request to the model's next variant: fast ones (no deadline spent).
_NEXT_VARIANT_ON = (CircuitOpen, Overloaded)


class PredictorClient(Protocol):
    async def predict(self, inputs: Mapping[str, Any]) -> PredictionPayload: ...
    async def info(self) -> ModelInfoPayload: ...


class PredictOutcome:
    """A finished prediction: the JSON body and the headers to send with it."""

    __slots__ = ("body", "headers")

    def __init__(self, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.body = body
        self.headers = headers


class RouterCore:
    def __init__(
        self,
        args: AppArgs,
        predictors: Mapping[str, PredictorClient],
        cache: CacheClient | None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        counters: Counters | None = None,
        info_refresh_s: float = 1.0,
        info_timeout_s: float = 5.0,
        flight_context: Callable[[], contextvars.Context] | None = None,
        policy: TrafficPolicy | None = None,
        usage_flush_s: float = 0.5,
    ) -> None:
        self.args = args
        self._predictors = dict(predictors)
        self._cache = cache if args.cache.enabled else None
        self._ledger = cache  # the cost book lives in the Cache deployment even with caching off
        self._clock = clock
        self.counters = counters or Counters()
        self.policy = policy or TrafficPolicy(
            args, PolicyStore(None, args.cache.key_prefix), KeyRing.load(args.policy.auth), counters=self.counters
        )
        self._info_timeout_s = info_timeout_s
        self.directory = ModelDirectory(self._predictors, self.counters, refresh_s=info_refresh_s,
                                        timeout_s=info_timeout_s, clock=clock)
        self._flight: SingleFlight[PredictionPayload] = SingleFlight(flight_context)
        self._background: set[asyncio.Task[Any]] = set()
        # The near cache, the key index and the batched hops (serve_app.router_cache).
        self.cache = None if self._cache is None else RouterCache(args.cache, self._cache, self.counters, clock,
                                                                  flight_context)
        # The cost book (in the Cache deployment) gets usage in batches, not a hop per miss.
        self._usage = UsageQueue(cache, self.counters, flush_s=usage_flush_s, timeout_s=args.cache.hop_timeout_s)
        # Derived once from the frozen config (not per request): the models whose every
        # variant has a predictor, and each deployment's LM settings that enter cache keys (as
        # canonical JSON: encoded once here, not per request).
        self._servable = {m.name: m for m in args.models
                          if all(v.deployment in self._predictors for v in m.served_variants())}
        self._lm_json = {v.deployment: canonical_json(dict(m.for_variant(v.name).lm.cache_identity()))
                         for m in args.models for v in m.served_variants()}

    # ---- model directory (serve_app.directory) ---------------------------------------

    async def refresh_info(self, name: str) -> ModelInfoPayload:
        return await self.directory.refresh(name)

    async def model_info(self, name: str) -> ModelInfoPayload:
        return await self.directory.get(name)

    async def refresh_loop(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Keep every deployment's info fresh; never raises."""
        await self.directory.refresh_loop(sleep)

    async def index_loop(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                         interval_s: float = 2.0) -> None:
        """Keep the key index honest (``RouterCache.index_loop``); never raises."""
        if self.cache is not None:
            await self.cache.index_loop(sleep, interval_s)

    # ---- predictions -----------------------------------------------------------------

    def _model(self, name: str) -> ModelConfig:
        model = self._servable.get(name)
        if model is None:
            raise UnknownModel(f"unknown model '{name}'")
        return model

    def _key(self, model: ModelConfig, variant: Variant, version: str, inputs: Mapping[str, Any]) -> str:
        return cache_key_with(self.args.cache.key_prefix, model.name, variant.name, version,
                              self._lm_json[variant.deployment], inputs)

    async def predict(self, request: PredictRequest, request_id: str, admission: Admission = OPEN_DOOR) -> PredictOutcome:
        """Answer one prediction and account for it (metrics, log line), whatever happens."""
        started = self._clock()
        try:
            outcome = await self._predict_outcome(request, request_id, started, admission)
        except ServeAppError as exc:
            self._account_error(request.model, exc.code, started, request_id, admission)
            raise
        except Exception:
            self._account_error(request.model, "internal", started, request_id, admission)
            raise
        return outcome

    def record_error(self, model: str | None, code: str) -> None:
        """Count an error raised before the core (admission at the HTTP layer)."""
        self.counters.inc("errors", model=self._model_label(model), code=code)

    def _model_label(self, name: str | None) -> str:
        # Only configured names become label values: a client cannot mint series.
        return name if name is not None and self.args.model(name) is not None else "-"

    def _account_error(self, model: str, code: str, started: float, request_id: str, admission: Admission) -> None:
        label = self._model_label(model)
        latency_ms = (self._clock() - started) * 1000.0
        self.counters.inc("errors", model=label, code=code)
        self.counters.inc("predictions", model=label, variant="-", outcome="error", cache="NONE")
        self.counters.observe("prediction_latency_ms", latency_ms, model=label, variant="-")
        log_prediction(request_id=request_id, model=label, outcome="error", error_code=code,
                       latency_ms=latency_ms, api_key=admission.principal.id)

    def _plan(self, model: ModelConfig, request: PredictRequest, admission: Admission) -> list[tuple[ModelConfig, Variant]]:
        """Where to send this request, in order: the chosen variant, the model's other healthy
        variants (only on fast failures), then the fallback model's variants."""
        plan = [(model, v) for v in self.policy.order(model, admission, request.variant, self.directory.unhealthy)]
        if model.fallback is not None:
            fallback = self.args.model(model.fallback)
            if fallback is not None and admission.principal.may_call(fallback.name):
                plan += [(fallback, v) for v in self.policy.order(fallback, admission, None, self.directory.unhealthy)]
        return plan

    async def _predict_outcome(
        self, request: PredictRequest, request_id: str, started: float, admission: Admission
    ) -> PredictOutcome:
        model = self._model(request.model)
        admission.principal.require_model(model.name)
        plan = self._plan(model, request, admission)
        served, variant = plan[0]
        timing: dict[str, float] = {}
        near, checked = self._near_hit(served, variant, request)
        if near is not None:
            payload, status, shared = near, "HIT-MEMORY", False
        else:
            payload, status, shared, served, variant, timing = await self._answer(model, plan, request, admission,
                                                                                   checked)
        cached = status.startswith("HIT")
        degraded = served is not model
        # Usage is what THIS request cost: a hit or a coalesced follower made no LM call.
        paid = not cached and not shared
        usage = payload["usage"] if paid else _FREE
        latency_ms = round((self._clock() - started) * 1000.0, 3)
        body = {
            "request_id": request_id,
            "model": model.name,
            "variant": variant.name,
            "program_version": payload["program_version"],
            "outputs": payload["outputs"],
            "cached": cached,
            "usage": usage,
            "latency_ms": latency_ms,
            "degraded": degraded,
            "served_by": served.name,
        }
        outcome = "degraded" if degraded else "ok"
        self.counters.inc("predictions", model=model.name, variant=variant.name, outcome=outcome, cache=status)
        self.counters.observe("prediction_latency_ms", latency_ms, model=model.name, variant=variant.name)
        cost = usage.get("cost_usd")
        headers = {
            "X-Cache": status,
            "X-Model-Variant": variant.name,
            "X-Response-Time": f"{latency_ms:.1f}ms",
            "X-Cost-USD": "unknown" if cost is None else f"{cost:.10f}".rstrip("0").rstrip(".") or "0",
            **admission.headers(),
        }
        if degraded:
            headers["X-Degraded"] = f"fallback={served.name}"
        if shared:
            headers["X-Coalesced"] = "true"
        if not cached:
            timing["program"] = float(payload.get("latency_ms") or 0.0)
        timing["total"] = latency_ms
        headers["Server-Timing"] = ", ".join(f"{name};dur={ms:.1f}" for name, ms in timing.items())
        log_prediction(request_id=request_id, model=model.name, variant=variant.name, outcome=outcome,
                       served_by=served.name, cache=status, input_tokens=usage["input_tokens"],
                       output_tokens=usage["output_tokens"], cost_usd=cost, latency_ms=latency_ms,
                       api_key=admission.principal.id)
        return PredictOutcome(body, headers)

    def _near_hit(self, model: ModelConfig, variant: Variant,
                  request: PredictRequest) -> tuple[PredictionPayload | None, str | None]:
        """``(answer, key)`` when the first choice's answer is in the near cache and nothing
        needs an await (its info is known): a hit then costs no deadline timer and no
        coroutine chain. ``(None, key)``: the key missed the near cache just now; ``(None,
        None)``: not looked up (caching off, info not known yet). Inputs are checked first,
        as on the full path."""
        if self.cache is None or not request.cache:
            return None, None
        info = self.directory.known(variant.deployment)
        if info is None:
            return None, None
        validate_inputs((f["name"] for f in info["inputs"]), request.inputs)
        key = self._key(model, variant, info["program_version"], request.inputs)
        near = self.cache.near.get(key)
        if near is not None:
            self.counters.inc("cache_ops", tier="near", op="get", result="hit")
        return cast("PredictionPayload | None", near), key

    async def _answer(
        self, model: ModelConfig, plan: list[tuple[ModelConfig, Variant]], request: PredictRequest,
        admission: Admission, near_missed: str | None,
    ) -> tuple[PredictionPayload, CacheStatus, bool, ModelConfig, Variant, dict[str, float]]:
        """The plan tried in order within the router deadline: ``(payload, status, shared,
        served model, variant, timing)``. ``near_missed``: the first choice's key, which just
        missed the near cache."""
        try:
            async with asyncio.timeout(self.args.limits.request_timeout_s):
                i = 0
                while True:
                    served, variant = plan[i]
                    try:
                        timing: dict[str, float] = {}
                        payload, status, shared = await self._predict(served, variant, request, admission, timing,
                                                                      near_missed if i == 0 else None)
                        return payload, status, shared, served, variant, timing
                    except ServeAppError as exc:
                        if isinstance(exc, CircuitOpen):
                            self.directory.mark_open(variant.deployment, exc.retry_after_s)
                        i = next((j for j in range(i + 1, len(plan)) if self._may_move(served, plan[j][0], exc)), -1)
                        if i < 0:
                            raise
                        if plan[i][0] is not served:
                            self.counters.inc("fallbacks", model=model.name, fallback=plan[i][0].name, code=exc.code)
                        else:
                            self.counters.inc("variant_shifts", model=model.name, variant=variant.name, code=exc.code)
        except TimeoutError:
            raise UpstreamTimeout(f"model '{model.name}' did not answer within the request deadline") from None

    @staticmethod
    def _may_move(current: ModelConfig, nxt: ModelConfig, exc: ServeAppError) -> bool:
        """Another variant of the same model on fast failures; the fallback model on any
        failure another model can cover (breaker open, provider error, timeout, overload)."""
        if nxt is current:
            return isinstance(exc, _NEXT_VARIANT_ON)
        return isinstance(exc, _FALLBACK_ON)

    async def _predict(
        self, model: ModelConfig, variant: Variant, request: PredictRequest, admission: Admission,
        timing: dict[str, float], near_missed: str | None = None,
    ) -> tuple[PredictionPayload, CacheStatus, bool]:
        """``(payload, X-Cache status, shared)``; ``shared`` marks a coalesced follower.
        ``timing`` gets the milliseconds of the Cache deployment lookup (``cache``) and of the
        predictor call as the router waited for it (``predictor``), when they happen.
        ``near_missed``: this request's key, which missed the near cache with no await since."""
        info = await self.model_info(variant.deployment)
        validate_inputs((f["name"] for f in info["inputs"]), request.inputs)
        cache = self.cache
        if cache is None or not request.cache:
            self._short_circuit(model, variant, None)
            reservation = await self.policy.reserve(model, variant, admission)
            t0 = self._clock()
            payload = await self._paid_call(model, variant, request.inputs, reservation, admission)
            timing["predictor"] = (self._clock() - t0) * 1000.0
            return payload, "BYPASS", False
        key = near_missed or self._key(model, variant, info["program_version"], request.inputs)
        near = None if near_missed else cache.near.get(key)
        if near is not None:
            self.counters.inc("cache_ops", tier="near", op="get", result="hit")
            return cast(PredictionPayload, near), "HIT-MEMORY", False
        found, status = await cache.lookup(key, model.cache_ttl_s, timing)
        if found is not None and status is not None:
            return cast(PredictionPayload, found), status, False
        self._short_circuit(model, variant, key)
        # A miss costs money: reserve the budget first, unless an identical flight is already
        # paying for it (a follower costs nothing).
        reservation = None if self._flight.in_flight(key) else await self.policy.reserve(model, variant, admission)
        # An identical flight may have finished while we waited on the Cache deployment or the
        # budget: its answer is already in the near cache (written before the Cache hop). From
        # here to joining or starting a flight there is no await, so no second LM call slips in.
        near = cache.near.get(key)
        if near is not None:
            self._spawn(self.policy.release(reservation))
            return cast(PredictionPayload, near), "HIT-MEMORY", False
        if reservation is not None and self._flight.in_flight(key):
            # A flight started while we reserved: we will follow it and pay nothing.
            self._spawn(self.policy.release(reservation))
            reservation = None
        t0 = self._clock()
        payload, shared = await self._flight.do(
            key,
            lambda: self._paid_call(model, variant, request.inputs, reservation, admission),
            # The write-back runs inside the flight: waiters already have the answer, and a
            # request arriving before the write lands joins the flight instead of the LM.
            then=lambda p: cache.write_back(self._key(model, variant, p["program_version"], request.inputs),
                                            dict(p), model.cache_ttl_s),
        )
        timing["predictor"] = (self._clock() - t0) * 1000.0
        return payload, "MISS", shared

    def _short_circuit(self, model: ModelConfig, variant: Variant, key: str | None) -> None:
        """A miss for a deployment whose breaker is known to be open is answered here, without
        a hop (unless an identical call is already in flight: then it joins that)."""
        remaining = self.directory.open_for(variant.deployment)
        if remaining > 0 and (key is None or not self._flight.in_flight(key)):
            self.counters.inc("short_circuits", model=model.name, variant=variant.name)
            raise CircuitOpen(f"model '{model.name}' is failing; calls are paused", retry_after_s=remaining)

    async def _paid_call(
        self, model: ModelConfig, variant: Variant, inputs: Mapping[str, Any],
        reservation: Reservation | None, admission: Admission,
    ) -> PredictionPayload:
        """One LM-backed prediction (a leader's); books its cost, budget and tokens in the
        background, or gives the budget reservation back when it failed."""
        try:
            payload = await self._predictors[variant.deployment].predict(inputs)
        except BaseException:
            self._spawn(self.policy.release(reservation))
            raise
        self.directory.mark_ok(variant.deployment)
        known = self.directory.known(variant.deployment)
        if known is not None and known["program_version"] != payload["program_version"]:
            # The predictor was reconfigured: learn the new version now, not at next refresh.
            self._spawn(self.directory.refresh_quietly(variant.deployment))
        usage = dict(payload["usage"])
        self._usage.add(model.name, variant.name, usage,
                        admission.principal.id if admission.principal.authenticated else None)
        self._spawn(self.policy.settle(reservation, variant, usage, admission))
        return payload

    async def flush_usage(self) -> None:
        """Send queued write-backs and usage records now (graceful shutdown)."""
        if self.cache is not None:
            await self.cache.flush()
        await self._usage.flush()

    async def costs(self) -> dict[str, Any]:
        """``GET /costs``: the cost book's report (cluster-wide with Redis)."""
        if self._ledger is None:
            return {"scope": "none", "total": {}, "today": {}}
        async with asyncio.timeout(self._info_timeout_s):
            return await self._ledger.cost_report()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for flights, their write-backs, background work and refreshes, then send queued
        usage (tests, shutdown)."""
        while True:
            if self.cache is not None:
                await self.cache.flush()
            pending = [*self._background, *self._flight.tasks()]
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        await self._usage.flush()

    # ---- other endpoints -------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        out = []
        for model in self.args.models:
            variants = self.policy.picker.weighted(model)
            infos = [await self.model_info(v.deployment) for v in variants]
            info = infos[0]
            out.append(
                {
                    "name": model.name,
                    "description": model.description,
                    "program_version": info["program_version"],
                    "inputs": info["inputs"],
                    "outputs": info["outputs"],
                    "lm": {"model": model.lm.model},
                    "variants": [
                        {"name": v.name, "weight": v.weight, "program_version": i["program_version"],
                         "lm": {"model": model.for_variant(v.name).lm.model}}
                        for v, i in zip(variants, infos)
                    ],
                    "pin_variants": model.pin_variants,
                }
            )
        return out

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ask every predictor and the cache; ``(all answered, detail)``."""
        index = "off" if self.cache is None else self.cache.index_state
        detail: dict[str, Any] = {"models": {}, "cache": None,
                                  "router": {"ops": self.counters.snapshot(), "lookup_index": index}}
        ok = True
        for name in self._predictors:
            try:
                info = await self.directory.fetch(name)
                detail["models"][name] = {
                    "ready": True,
                    "program_version": info["program_version"],
                    "breaker": info["breaker"].get("state"),
                }
            except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
                ok = False
                detail["models"][name] = {"ready": False, "error": type(exc).__name__}
        if self._cache is not None:
            try:
                async with asyncio.timeout(self._info_timeout_s):
                    detail["cache"] = {"ready": True, **(await self._cache.stats())}
            except Exception as exc:  # noqa: BLE001
                ok = False
                detail["cache"] = {"ready": False, "error": type(exc).__name__}
        return ok, detail

