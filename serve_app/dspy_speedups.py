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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["memoize_model_metadata", "size_connection_pool"]

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


def memoize_model_metadata() -> bool:
    """Install the memo; True when ``model_info`` is memoized in every module using it."""
    try:
        source = importlib.import_module(_MODULES[0])
        original = source.model_info
    except (ImportError, AttributeError):
        return False
    if getattr(original, "__serve_app_memo__", False):
        return True
    memo = _memoized(original)
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "model_info", None) is original:
            module.model_info = memo
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
