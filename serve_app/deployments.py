"""The Ray Serve deployments: thin shims that delegate to the plain-Python cores.

Defaults here suit LLM-bound work (a predictor mostly waits on its LM, so it takes many
concurrent requests); replica counts, autoscaling and actor options belong to the YAML's
``deployments:`` section, which overrides these.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import uuid
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette

from .cache import CacheLookup, TieredCache
from .costs import CostBook
from . import dspy_speedups
from .metrics import Counters, RaySink
from .config import AppArgs, CacheConfig, ModelConfig, ProgramRelease, TrafficWeights
from .keys import KeyRing
from .policy import TrafficPolicy
from .policy_store import PolicyStore
from .redis_tier import redis_from_url
from .errors import Overloaded
from .http import build_http_app
from .key_index import IndexSync
from .logs import setup_replica_logging
from .lmsim import Knobs, SimCore, build_sim_app
from .predictor import ModelInfoPayload, PredictionPayload, PredictorCore
from .router import RouterCore

__all__ = ["Cache", "Predictor", "Router", "LMSimulator", "HandlePredictor", "HandleCache"]


@serve.deployment(name="Cache", max_ongoing_requests=1000, graceful_shutdown_timeout_s=5)
class Cache:
    """The prediction cache and the cost book (both share its Redis tier)."""

    def __init__(self, config: CacheConfig) -> None:
        self._log_flusher = setup_replica_logging(
            _env_values([config.redis.url_env] if config.redis and config.redis.url_env else []))
        self.core = TieredCache.from_config(config, counters=Counters(sink=RaySink()))
        self.costs = CostBook(config.key_prefix, self.core.redis)

    async def get_many(self, keys: list[str]) -> list[CacheLookup | None]:
        return await self.core.get_many(keys)

    async def set_many(self, items: list[tuple[str, dict[str, Any], float | None]]) -> list[bool]:
        return await self.core.set_many(items)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    async def index_sync(self, writer: str, want_keys: bool) -> IndexSync | None:
        return self.core.index_sync(writer, want_keys)

    async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
        await self.costs.record_many(records)

    async def cost_report(self) -> dict[str, Any]:
        return await self.costs.report()

    def check_health(self) -> None:
        """Healthy while the replica runs: Redis being down is a degraded cache, not a dead one."""


@serve.deployment(max_ongoing_requests=128, graceful_shutdown_timeout_s=45)
class Predictor:
    """One per model variant: named after the model (``<model>.<variant>`` with variants).
    ``user_config`` is a ``ProgramRelease``."""

    def __init__(self, model: ModelConfig, variant: str = "default") -> None:
        self._log_flusher = setup_replica_logging(_env_values([model.lm.api_key_env] if model.lm.api_key_env else []))
        dspy_speedups.install(model.lm.max_connections)
        self.variant = variant
        self.core = PredictorCore(model, counters=Counters(sink=RaySink()))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(ProgramRelease.model_validate(user_config))

    async def predict(self, inputs: dict[str, Any]) -> PredictionPayload:
        return await self.core.predict(inputs, self.variant)

    def info(self) -> ModelInfoPayload:
        return self.core.info()

    def check_health(self) -> None:
        """Checks the replica only, never the LM: an LM outage must not become a restart loop."""


def _policy_redis(args: AppArgs) -> Any:
    """The router's own Redis client for limits and budgets (the cache's server), or None.

    Its socket timeout is the policy deadline (``policy.store_timeout_s``), not the cache's
    50 ms: a socket timeout under the deadline fails a script call whose reply is merely slow
    (a burst on a busy router), and the call then falls back to the local share although Redis
    applied it: over-admission (A1) and budget drift (A4)."""
    redis_cfg = args.cache.redis
    if redis_cfg is None:
        return None
    url = redis_cfg.url if redis_cfg.url is not None else os.environ.get(redis_cfg.url_env or "", "")
    if not url:
        return None
    return redis_from_url(url, max(redis_cfg.socket_timeout_s, args.policy.store_timeout_s), redis_cfg.connect_timeout_s)


def _env_values(names: list[str]) -> list[str]:
    return [v for v in (os.environ.get(n) for n in names) if v]


def _unlinked_serve_context() -> None:
    """Run inside the copied context: replace Serve's request context by one that keeps the
    request id (logs) but is no child of the current request."""
    from ray.serve import context as serve_context

    current = serve_context._get_serve_request_context()
    serve_context._serve_request_context.set(
        dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex, cancel_on_parent_request_cancel=False)
    )


def detached_context() -> contextvars.Context:
    """The current contextvars, unlinked from the current request's cancellation.

    A coalesced predictor call serves every waiter, so the leader's client leaving must not
    cancel it. Two mechanisms would: Ray cancels the calls a cancelled actor task made by
    following the ``async_task_id`` contextvar (ray-project/ray#52476; Serve's own long-poll
    client clears it the same way), and Serve, in direct-ingress mode, cancels the child
    requests it tracked under the request's internal id. The copy clears the first and gives
    the second a fresh id; the public request id stays for logs."""
    ctx = contextvars.copy_context()
    task_id_var = getattr(ray._raylet, "async_task_id", None)
    if task_id_var is not None:
        ctx.run(task_id_var.set, None)
    try:
        ctx.run(_unlinked_serve_context)
    except Exception:  # noqa: BLE001 - private Serve API: without it only ray's link is cut
        pass
    return ctx


class HandlePredictor:
    """``PredictorClient`` over a deployment handle.

    - A replica that died mid-request is retried once (Serve only retries scheduling); the
      router deadline bounds both tries, and at most one duplicate LM call can result.
    - Serve's back-pressure (the predictor's ``max_queued_requests`` reached) is a fast
      503 ``overloaded`` with ``Retry-After``; it never reaches the model's breaker.
    """

    def __init__(self, handle: DeploymentHandle, name: str) -> None:
        self._h = handle
        self._name = name

    async def predict(self, inputs: Mapping[str, Any]) -> PredictionPayload:
        try:
            try:
                return await self._h.predict.remote(dict(inputs))
            except (RayActorError, ActorUnavailableError):
                return await self._h.predict.remote(dict(inputs))
        except BackPressureError:
            raise Overloaded(f"model '{self._name}' is at capacity; retry shortly", retry_after_s=1.0) from None

    async def info(self) -> ModelInfoPayload:
        return await self._h.info.remote()


class HandleCache:
    """``CacheClient`` over the Cache deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._h = handle

    async def get_many(self, keys: list[str]) -> list[CacheLookup | None]:
        return await self._h.get_many.remote(keys)

    async def set_many(self, items: list[tuple[str, dict[str, Any], float | None]]) -> list[bool]:
        return await self._h.set_many.remote(items)

    async def stats(self) -> dict[str, Any]:
        return await self._h.stats.remote()

    async def index_sync(self, writer: str, want_keys: bool) -> IndexSync | None:
        return await self._h.index_sync.remote(writer, want_keys)

    async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
        await self._h.record_usage_many.remote(records)

    async def cost_report(self) -> dict[str, Any]:
        return await self._h.cost_report.remote()


@serve.deployment(name="Router", max_ongoing_requests=512, graceful_shutdown_timeout_s=45)
@serve.ingress()
class Router:
    """The ingress. ``user_config`` is ``TrafficWeights``: variant weights, changed live."""

    async def __init__(self, args: AppArgs, cache: DeploymentHandle, predictors: dict[str, DeploymentHandle]) -> None:
        self._log_flusher = setup_replica_logging(_env_values(args.secret_env_names()))
        counters = Counters(sink=RaySink())
        store = PolicyStore(
            _policy_redis(args),
            args.cache.key_prefix,
            call_timeout_s=args.policy.store_timeout_s,
            counters=counters,
            min_replicas=args.policy.expected_router_replicas,
        )
        keys = KeyRing.load(args.policy.auth, models=[m.name for m in args.models])
        policy = TrafficPolicy(args, store, keys, counters=counters)
        self.core = RouterCore(
            args,
            {name: HandlePredictor(h, name) for name, h in predictors.items()},
            HandleCache(cache),
            flight_context=detached_context,
            counters=counters,
            policy=policy,
        )
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self.core.refresh_loop())
        self._indexer = loop.create_task(self.core.index_loop())
        self._heartbeat = loop.create_task(store.heartbeat_loop()) if store.shared else None

    async def __del__(self) -> None:
        """Graceful shutdown: the last queued usage records reach the cost book."""
        await self.core.flush_usage()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        weights = TrafficWeights.model_validate(user_config or {})
        self.core.policy.picker.set_weights(weights.weights, self.core.args.models)

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_http_app(self.core)


@serve.deployment(name="LMSimulator", max_ongoing_requests=2000, graceful_shutdown_timeout_s=2)
@serve.ingress()
class LMSimulator:
    def __init__(self, knobs: Knobs) -> None:
        self.core = SimCore(knobs, models=("sim-qa", "sim-classify", "sim-pipeline"))

    def __serve_build_asgi_app__(self) -> Starlette:
        return build_sim_app(self.core)
