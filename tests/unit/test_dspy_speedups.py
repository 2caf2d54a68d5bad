"""The model-metadata memo answers exactly what DSPy's own lookup answers."""

from __future__ import annotations

import importlib

import pytest

from serve_app.dspy_speedups import _memoized, memoize_model_metadata


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
