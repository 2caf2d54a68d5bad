"""The model-metadata memo answers exactly what DSPy's own lookup answers."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.dspy_speedups import _memoized, memoize_model_metadata, size_connection_pool


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
