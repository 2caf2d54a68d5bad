"""The DSPy speed-ups answer exactly what DSPy's own code answers."""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.dspy_speedups import (
    WARM_OFFLOADS,
    _memo_routes,
    _memoized,
    _offload_name,
    cache_json_adapters,
    inline_warm_offloads,
    memoize_model_metadata,
    memoize_proxy_routes,
    size_connection_pool,
)


@pytest.mark.parametrize(("provider", "model"), [("openai", "gpt-4o-mini"), ("openai", "sim-qa"),
                                                 ("anthropic", "claude-3-5-sonnet-latest"), ("nope", "x")])
def test_memo_matches_the_original_and_returns_fresh_copies(provider: str, model: str) -> None:
    metadata = importlib.import_module("dspy.clients.model_metadata")
    original = getattr(metadata.model_info, "__wrapped__", metadata.model_info)
    memo = _memoized(original)
    first = memo(provider, model)
    assert first == original(provider, model)
    if isinstance(first, dict):
        first["mutated"] = True  # a caller mutating its copy must not change the next answer
        assert "mutated" not in memo(provider, model)
    assert memo(provider, model, namespaces=("openai",)) == original(provider, model, namespaces=["openai"])


def test_install_patches_every_module_that_imported_it_and_is_idempotent() -> None:
    assert memoize_model_metadata() is True
    assert memoize_model_metadata() is True
    for name in ("dspy.clients.model_metadata", "dspy.clients.costs", "dspy.clients.capabilities"):
        assert getattr(importlib.import_module(name).model_info, "__serve_app_memo__", False), name


@pytest.fixture
def routing() -> Iterator[Any]:
    """DSPy's lm15 routing mixin, restored after the test (the patch is per process)."""
    cls = importlib.import_module("dspy.clients.engines.lm15_engine")._Routing
    saved = cls._init_routing
    yield cls
    cls._init_routing = saved


def _engine(**config: Any) -> Any:
    from dspy._vendor.lm15.router import RouterConfig
    from dspy.clients.engines.lm15_engine import AsyncLM15Engine

    return AsyncLM15Engine(RouterConfig(**config))


def test_pool_is_dspys_100_by_default_and_sized_once_patched(routing: Any) -> None:
    from dspy._vendor.lm15.transports._limits import DEFAULT_MAX_CONNECTIONS

    assert DEFAULT_MAX_CONNECTIONS == 100  # what DSPy's native engine gets: the reason for the patch
    assert _engine().config.max_connections is None
    assert size_connection_pool(300) is True
    engine = _engine(base_urls={"openai": "http://127.0.0.1:9/v1"})
    assert engine.config.max_connections == 300
    assert engine.config.base_urls == {"openai": "http://127.0.0.1:9/v1"}  # the rest is kept


def test_pool_patch_is_idempotent_last_wins_and_respects_explicit_settings(routing: Any) -> None:
    original = routing._init_routing
    size_connection_pool(300)
    size_connection_pool(500)
    assert routing._init_routing.__serve_app_original__ is original  # one layer, not two
    assert _engine().config.max_connections == 500
    assert _engine(max_connections=50).config.max_connections == 50
    with pytest.raises(ValueError):
        size_connection_pool(0)


# ---- serialize_for_json: one TypeAdapter per type ------------------------------------------------


class _Unserializable:
    def __str__(self) -> str:
        return "<unserializable>"


def test_json_adapter_cache_answers_what_dspy_answers() -> None:
    import pydantic

    utils = importlib.import_module("dspy.adapters.utils")
    original = getattr(utils.serialize_for_json, "__wrapped__", utils.serialize_for_json)

    class Item(pydantic.BaseModel):
        name: str
        tags: list[str]

    values: list[Any] = ["text", 3, 2.5, None, ["a", 1], {"k": [1, 2]}, Item(name="x", tags=["t"]),
                         {"nested": _Unserializable()}, _Unserializable()]
    assert cache_json_adapters() is True
    assert cache_json_adapters() is True  # idempotent
    patched = utils.serialize_for_json
    assert getattr(patched, "__serve_app_memo__", False)
    for _ in range(2):  # the second pass answers from the cached adapters
        for value in values:
            assert patched(value) == original(value), value
    for name in ("dspy.adapters.json_adapter", "dspy.adapters.xml_adapter"):
        assert importlib.import_module(name).serialize_for_json is patched, name


# ---- lm15's proxy resolution, kept per target ----------------------------------------------------


def test_proxy_memo_matches_the_original_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspy._vendor.lm15.transports import _proxy
    from dspy._vendor.lm15.transports._url import parse_url

    original = getattr(_proxy.proxy_route_for, "__wrapped__", _proxy.proxy_route_for)
    monkeypatch.setenv("HTTP_PROXY", "http://user:pw@proxy.local:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,internal.example")
    memo = _memo_routes(original)
    targets = [parse_url(u) for u in ("http://127.0.0.1:8000/v1", "http://api.example.com/v1",
                                      "http://internal.example/v1")]
    for _ in range(2):
        for parsed in targets:
            for proxy, trust_env in ((None, True), (None, False), ("http://other:8080", True)):
                assert memo(parsed, proxy=proxy, trust_env=trust_env) == original(
                    parsed, proxy=proxy, trust_env=trust_env)
    assert memo(targets[0], proxy=None, trust_env=True) is None  # NO_PROXY bypass kept
    assert memo(targets[1], proxy=None, trust_env=True).host == "proxy.local"
    # the environment is read once per target: a later change is not seen by this process
    monkeypatch.delenv("HTTP_PROXY")
    assert memo(targets[1], proxy=None, trust_env=True).host == "proxy.local"


def test_proxy_memo_installs_where_lm15_imported_it() -> None:
    assert memoize_proxy_routes() is True
    assert memoize_proxy_routes() is True
    for name in ("_proxy", "_async", "_sync"):
        module = importlib.import_module(f"dspy._vendor.lm15.transports.{name}")
        assert getattr(module.proxy_route_for, "__serve_app_memo__", False), name


# ---- DSPy's offloads: inline once warm -----------------------------------------------------------

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("_seen", default="unset")


def _listed(fail: bool = False) -> int:
    _seen.set("set inside")
    if fail:
        raise ValueError("boom")
    return threading.get_ident()


def _unlisted() -> int:
    return threading.get_ident()


@pytest.fixture
def restore_to_thread() -> Iterator[None]:
    saved = asyncio.to_thread
    yield
    asyncio.to_thread = saved  # type: ignore[assignment]


def test_listed_offload_runs_in_a_thread_once_then_inline(restore_to_thread: None) -> None:
    assert inline_warm_offloads(frozenset({(__name__, "_listed")})) is True

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        assert await asyncio.to_thread(_listed) != loop_thread  # the first call loads: a thread
        assert await asyncio.to_thread(_listed) == loop_thread  # then inline
        assert _seen.get() == "unset"  # in a copy of the context, as to_thread runs it
        with pytest.raises(ValueError, match="boom"):
            await asyncio.to_thread(_listed, fail=True)
        for _ in range(2):
            assert await asyncio.to_thread(_unlisted) != loop_thread  # everything else: the pool

    asyncio.run(scenario())


def test_a_failed_first_call_does_not_warm(restore_to_thread: None) -> None:
    inline_warm_offloads(frozenset({(__name__, "_listed")}))

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        with pytest.raises(ValueError):
            await asyncio.to_thread(_listed, fail=True)
        assert await asyncio.to_thread(_listed) != loop_thread
        assert await asyncio.to_thread(_listed) == loop_thread

    asyncio.run(scenario())


def test_install_is_idempotent_and_wraps_the_original_once(restore_to_thread: None) -> None:
    original = getattr(asyncio.to_thread, "__serve_app_original__", asyncio.to_thread)
    inline_warm_offloads()
    inline_warm_offloads()
    assert asyncio.to_thread.__serve_app_original__ is original  # type: ignore[attr-defined]


def test_the_listed_names_exist_in_this_dspy() -> None:
    """Each listed offload names a real DSPy function: a rename would silently disable the patch."""
    found = set()
    for module_name, qualname in WARM_OFFLOADS:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        found.add(_offload_name(obj))
    assert found == set(WARM_OFFLOADS)
