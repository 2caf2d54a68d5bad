"""Per-process speed-ups for DSPy's hot path, applied in predictor replicas only.

``memoize_model_metadata()``: DSPy 3.4 prices every LM response (``clients/costs.py``) and
checks capabilities through ``model_metadata.model_info``, which deep-copies the matching
entry of its bundled metadata snapshot, and for a model it does not know by name (a
self-hosted or simulated model) scans the whole snapshot for aliases: in the profile
(``benchmarks/results/profile.md``) this was ~12 % of a predictor's CPU per request. The
snapshot is static for the process, so the answer for ``(provider, model, namespaces)``
never changes: this wraps ``model_info`` with a memo (returning a fresh deep copy each time,
as the original does, so callers may still mutate it) in the modules that imported it.
Idempotent; if DSPy's layout differs, nothing is patched and DSPy runs as shipped.

``size_connection_pool(n)``: DSPy 3.4's native engine builds its lm15 router without
``max_connections``, so every LM's connection pool (one per event loop) holds lm15's default
of 100 connections, and no ``dspy.LM`` argument changes it. A predictor replica admitting more
than 100 concurrent calls (``max_ongoing_requests``) then queues the rest inside DSPy: with a
1 s LM and 200 concurrent clients a replica served ~90 requests/s at a p50 of 2 s
(``benchmarks/results/perf.md``, ``lm1s``). This makes every lm15 engine built afterwards in
the process size its pool to ``n`` (``lm.max_connections``, default 256); a config that sets
its own ``max_connections`` or ``transport`` is left alone. The last call wins; if DSPy's
layout differs, nothing is patched.

Three more, measured with ``python -m benchmarks.predictor_cpu`` (CPU per LM call of one
``PredictorCore`` against the simulator, no Ray; figures in the README):

``cache_json_adapters()``: DSPy's ``serialize_for_json`` builds a pydantic ``TypeAdapter`` (a
schema and a validator) for every input value it formats, four per call of a one-input
program. This keeps one adapter per type (at most 256 types); values, results and the
fallback to ``str`` are unchanged.

``memoize_proxy_routes()``: lm15 resolves the HTTP proxy for every LM request by reading the
whole environment (``urllib.request.getproxies``). The environment of a replica does not
change while it runs, so the answer per target (scheme, host, port) and proxy setting is kept
(at most 256 targets). A proxy variable changed afterwards is seen by new replicas only.

``inline_warm_offloads()``: an LM call makes four ``asyncio.to_thread`` hops (request
preparation, provider lookup, pricing, capability planning) so that a first call that loads
credentials or metadata cannot block the event loop. After a function's first call has
completed in a thread (the loading is done), its later calls run inline in a copy of the
context, as ``to_thread`` would have run them: a thread hop costs more CPU than the work.
Only those four DSPy functions are affected; every other ``to_thread`` call in the process goes
to the thread pool as before. Left on the thread pool: credential refreshes that make network
calls (lm15 offloads those itself), DSPy's disk cache (off in replicas).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["cache_json_adapters", "inline_warm_offloads", "install", "memoize_model_metadata",
           "memoize_proxy_routes", "size_connection_pool"]

_T = TypeVar("_T")
_MEMO_MAX = 256

_MODULES = ("dspy.clients.model_metadata", "dspy.clients.costs", "dspy.clients.capabilities")


def _memoized(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.lru_cache(maxsize=1024)
    def lookup(provider: Any, model: Any, namespaces: Any) -> Any:
        return original(provider, model, namespaces=None if namespaces is None else list(namespaces))

    @functools.wraps(original)
    def model_info(provider: Any, model: Any, *, namespaces: Any = None) -> Any:
        try:
            key = None if namespaces is None else tuple(namespaces)
            return copy.deepcopy(lookup(provider, model, key))
        except TypeError:  # unhashable arguments: ask the original
            return original(provider, model, namespaces=namespaces)

    model_info.__serve_app_memo__ = True  # type: ignore[attr-defined]
    return model_info


def _swap(attr: str, current: Any, replacement: Any, modules: tuple[str, ...]) -> None:
    """Point ``attr`` at ``replacement`` in each of ``modules`` that imported ``current`` by name."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, attr, None) is current:
            setattr(module, attr, replacement)


def _installed(module_name: str, attr: str) -> Any:
    """DSPy's ``attr`` of ``module_name``: None when DSPy's layout differs, True when already ours."""
    try:
        current = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None
    return True if getattr(current, "__serve_app_memo__", False) else current


def memoize_model_metadata() -> bool:
    """Install the memo; True when ``model_info`` is memoized in every module using it."""
    current = _installed(_MODULES[0], "model_info")
    if current is None or current is True:
        return current is True
    _swap("model_info", current, _memoized(current), _MODULES)
    return True


def size_connection_pool(max_connections: int) -> bool:
    """Pool size for lm15 engines built from now on in this process; True when installed."""
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    try:
        routing = importlib.import_module("dspy.clients.engines.lm15_engine")._Routing
        current = routing._init_routing
    except (ImportError, AttributeError):
        return False
    original = getattr(current, "__serve_app_original__", current)

    def _init_routing(self: Any, config: Any, model_type: Any) -> Any:
        if (dataclasses.is_dataclass(config) and not isinstance(config, type)
                and getattr(config, "max_connections", 0) is None and getattr(config, "transport", 0) is None):
            config = dataclasses.replace(config, max_connections=max_connections)
        return original(self, config, model_type)

    _init_routing.__serve_app_original__ = original  # type: ignore[attr-defined]
    _init_routing.__serve_app_pool__ = max_connections  # type: ignore[attr-defined]
    routing._init_routing = _init_routing
    return True


def cache_json_adapters() -> bool:
    """One pydantic ``TypeAdapter`` per type in DSPy's ``serialize_for_json``; True when installed."""
    from pydantic import TypeAdapter

    current = _installed("dspy.adapters.utils", "serialize_for_json")
    if current is None or current is True:
        return current is True

    @functools.lru_cache(maxsize=_MEMO_MAX)
    def adapter(kind: Any) -> Any:
        return TypeAdapter(kind)

    @functools.wraps(current)
    def serialize_for_json(value: Any) -> Any:
        try:
            return adapter(cast(Any, type(value))).dump_python(value, mode="json", fallback=str)
        except Exception:  # noqa: BLE001 - DSPy's own fallback: the value's string form
            return str(value)

    serialize_for_json.__serve_app_memo__ = True  # type: ignore[attr-defined]
    _swap("serialize_for_json", current, serialize_for_json,
          ("dspy.adapters.utils", "dspy.adapters.json_adapter", "dspy.adapters.xml_adapter",
           "dspy.primitives.repl_types"))
    return True


def _memo_routes(current: Callable[..., Any]) -> Callable[..., Any]:
    memo: dict[tuple[Any, ...], Any] = {}

    @functools.wraps(current)
    def proxy_route_for(parsed: Any, *, proxy: str | None, trust_env: bool) -> Any:
        key = (parsed.scheme, parsed.host, parsed.port, proxy, trust_env)
        try:
            return memo[key]
        except KeyError:
            route = current(parsed, proxy=proxy, trust_env=trust_env)
            if len(memo) < _MEMO_MAX:  # bounded: past it, every lookup is DSPy's own
                memo[key] = route
            return route
        except TypeError:  # an unhashable part: ask the original
            return current(parsed, proxy=proxy, trust_env=trust_env)

    proxy_route_for.__serve_app_memo__ = True  # type: ignore[attr-defined]
    return proxy_route_for


def memoize_proxy_routes() -> bool:
    """lm15's proxy resolution, kept per target; True when installed."""
    current = _installed("dspy._vendor.lm15.transports._proxy", "proxy_route_for")
    if current is None or current is True:
        return current is True
    _swap("proxy_route_for", current, _memo_routes(current),
          ("dspy._vendor.lm15.transports._proxy", "dspy._vendor.lm15.transports._async",
           "dspy._vendor.lm15.transports._sync"))
    return True


# DSPy 3.4's own offloads that only load something on their first call (module, qualname).
WARM_OFFLOADS = frozenset({
    ("dspy.clients.execution", "prepare"),
    ("dspy.clients.execution", "_price_result"),
    ("dspy.clients.execution", "_price_legacy"),
    ("dspy.clients.capabilities", "capabilities"),
    ("dspy.clients.engines.lm15_engine", "_Routing._target"),
})


def _offload_name(func: Any) -> tuple[str, str]:
    target = getattr(func, "__func__", func)  # a bound method's function
    return getattr(target, "__module__", "") or "", getattr(target, "__qualname__", "") or ""


def inline_warm_offloads(names: frozenset[tuple[str, str]] = WARM_OFFLOADS) -> bool:
    """Run ``names``' ``asyncio.to_thread`` calls inline once each has completed one; True when installed.

    ``asyncio.to_thread`` is wrapped for the process; the wrapper passes every other function
    to the original untouched.
    """
    current = asyncio.to_thread
    original = getattr(current, "__serve_app_original__", current)
    warm: set[tuple[str, str]] = set()

    async def to_thread(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        name = _offload_name(func)
        if name in warm:
            return contextvars.copy_context().run(func, *args, **kwargs)
        result = await original(func, *args, **kwargs)
        if name in names:
            warm.add(name)
        return result

    functools.update_wrapper(to_thread, cast(Callable[..., Any], original))
    to_thread.__serve_app_original__ = original  # type: ignore[attr-defined]
    to_thread.__serve_app_warm__ = warm  # type: ignore[attr-defined]
    asyncio.to_thread = to_thread  # type: ignore[assignment]
    return True


def install(max_connections: int) -> dict[str, bool]:
    """Every speed-up above, for a predictor replica; which ones took (by name)."""
    return {
        "memoize_model_metadata": memoize_model_metadata(),
        "size_connection_pool": size_connection_pool(max_connections),
        "cache_json_adapters": cache_json_adapters(),
        "memoize_proxy_routes": memoize_proxy_routes(),
        "inline_warm_offloads": inline_warm_offloads(),
    }
