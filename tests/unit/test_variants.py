"""Variant choice: weights, stickiness, pinning, health, and live weight overrides."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from serve_app.config import ModelConfig
from serve_app.errors import Forbidden, InvalidRequest
from serve_app.variants import VariantPicker


def model(variants: list[dict[str, Any]] | None = None, *, name: str = "qa", pin: bool = False) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": name,
        "program": "serve_app.examples:build_qa",
        "lm": {"model": "openai/sim-qa", "timeout_s": 1.0},
        "timeout_s": 2.0,
        "variants": variants or [],
        "pin_variants": pin,
    })


AB = model([{"name": "a", "weight": 3}, {"name": "b", "weight": 1}])
ABC = model([{"name": "a", "weight": 1}, {"name": "b", "weight": 1}, {"name": "c", "weight": 2}], pin=True)


def seeded(seed: int = 7) -> VariantPicker:
    return VariantPicker(random.Random(seed).random)


def first(picker: VariantPicker, m: ModelConfig, sticky: str | None = None, **kw: Any) -> str:
    return picker.order(m, sticky, **kw)[0].name


def test_model_without_variants_has_one_default() -> None:
    (only,) = VariantPicker().order(model(), None)
    assert (only.name, only.deployment, only.weight) == ("default", "qa", 1.0)


def test_variant_deployments_are_model_dot_variant() -> None:
    assert [(v.name, v.deployment) for v in AB.served_variants()] == [("a", "qa.a"), ("b", "qa.b")]


def test_weights_split_within_tolerance() -> None:
    picker = seeded()
    n = 10_000
    counts = Counter(first(picker, AB) for _ in range(n))
    # 3:1 -> 7500 expected; binomial sd ~ 43, so 5 sd is ~ 220
    assert abs(counts["a"] - 7_500) < 220
    assert counts["a"] + counts["b"] == n


def test_three_way_split() -> None:
    picker = seeded(11)
    counts = Counter(first(picker, ABC) for _ in range(10_000))
    assert abs(counts["c"] - 5_000) < 250 and abs(counts["a"] - 2_500) < 220 and abs(counts["b"] - 2_500) < 220


def test_rand_point_maps_onto_cumulative_weights() -> None:
    for point, want in [(0.0, "a"), (0.74, "a"), (0.75, "b"), (0.9999, "b")]:
        assert first(VariantPicker(lambda p=point: p), AB) == want


def test_sticky_is_stable_and_ignores_rand() -> None:
    calls = 0

    def rand() -> float:
        nonlocal calls
        calls += 1
        return random.random()

    picker = VariantPicker(rand)
    chosen = {first(picker, AB, "session-42") for _ in range(200)}
    assert len(chosen) == 1
    assert calls == 0, "a sticky client never draws a random point"


def test_sticky_sessions_spread_by_weight() -> None:
    picker = VariantPicker()
    counts = Counter(first(picker, AB, f"session-{i}") for i in range(10_000))
    assert abs(counts["a"] - 7_500) < 220


def test_same_session_may_land_differently_per_model() -> None:
    other = model([{"name": "a", "weight": 1}, {"name": "b", "weight": 1}], name="other")
    same = model([{"name": "a", "weight": 1}, {"name": "b", "weight": 1}])
    picker = VariantPicker()
    pairs = {(first(picker, same, f"s{i}"), first(picker, other, f"s{i}")) for i in range(200)}
    assert len(pairs) == 4, "the model name is part of the sticky point"


def test_order_lists_the_rest_by_weight() -> None:
    picker = VariantPicker(lambda: 0.0)  # point 0: 'a'
    assert [v.name for v in picker.order(ABC, None)] == ["a", "c", "b"]


def test_zero_weight_is_never_chosen_nor_tried() -> None:
    m = model([{"name": "a", "weight": 1}, {"name": "off", "weight": 0}])
    picker = seeded()
    for i in range(2_000):
        order = picker.order(m, None if i % 2 else f"s{i}")
        assert [v.name for v in order] == ["a"]


# ----------------------------------------------------------------------------- pinning


def test_pin_allowed() -> None:
    (only,) = VariantPicker().order(ABC, "session", pinned="b")
    assert (only.name, only.deployment) == ("b", "qa.b")


def test_pin_reaches_a_zero_weight_variant() -> None:
    m = model([{"name": "a", "weight": 1}, {"name": "canary", "weight": 0}], pin=True)
    assert [v.name for v in VariantPicker().order(m, None, pinned="canary")] == ["canary"]


def test_pin_forbidden_when_the_model_does_not_allow_it() -> None:
    with pytest.raises(Forbidden, match="variant") as info:
        VariantPicker().order(AB, None, pinned="a")
    assert info.value.status == 403


def test_pin_unknown_variant_is_422_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        VariantPicker().order(ABC, None, pinned="zzz")
    assert (info.value.status, info.value.field) == (422, "variant")


def test_pin_ignores_health() -> None:
    assert first(VariantPicker(), ABC, pinned="a", unhealthy={"qa.a"}) == "a"


# ----------------------------------------------------------------------------- health


def test_unhealthy_variants_clients_move_others_stay() -> None:
    picker = VariantPicker()
    sessions = [f"s{i}" for i in range(600)]
    before = {s: first(picker, ABC, s) for s in sessions}
    after = {s: first(picker, ABC, s, unhealthy={"qa.c"}) for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert moved and all(before[s] == "c" for s in moved), "only the unhealthy variant's clients move"
    assert all(after[s] != "c" for s in sessions)


def test_unhealthy_variants_clients_spread_over_the_healthy_ones_by_weight() -> None:
    picker = VariantPicker()
    sessions = [f"s{i}" for i in range(2_000)]
    moved = [first(picker, ABC, s, unhealthy={"qa.c"}) for s in sessions if first(picker, ABC, s) == "c"]
    spread = Counter(moved)  # a and b weigh 1:1
    assert len(moved) > 800
    assert abs(spread["a"] - len(moved) / 2) < 0.1 * len(moved)


def test_unhealthy_variant_is_dropped_from_the_rest() -> None:
    order = VariantPicker(lambda: 0.0).order(ABC, None, unhealthy={"qa.c"})
    assert [v.name for v in order] == ["a", "b"]


def test_all_unhealthy_keeps_the_weighted_choice() -> None:
    picker = VariantPicker()
    everything = {"qa.a", "qa.b", "qa.c"}
    for s in ("x", "y", "z", "w"):
        order = picker.order(ABC, s, unhealthy=everything)
        assert [v.name for v in order] == [first(picker, ABC, s)]


def test_unhealthy_is_by_deployment_name() -> None:
    picker = VariantPicker(lambda: 0.0)
    assert first(picker, ABC, unhealthy={"a"}) == "a"  # a variant name is not a deployment
    assert first(picker, ABC, unhealthy={"qa.a"}) != "a"


# ----------------------------------------------------------------------------- live weights


def test_set_weights_overrides_the_config() -> None:
    picker = VariantPicker(random.Random(3).random)
    picker.set_weights({"qa": {"a": 0, "b": 1}}, [AB])
    assert {first(picker, AB) for _ in range(500)} == {"b"}
    assert [v.weight for v in picker.weighted(AB)] == [0.0, 1.0]


def test_set_weights_leaves_unnamed_models_alone() -> None:
    other = ABC.model_copy(update={"name": "other"})
    picker = VariantPicker()
    picker.set_weights({"qa": {"a": 1, "b": 1}}, [AB, other])
    assert [v.weight for v in picker.weighted(other)] == [1.0, 1.0, 2.0]
    assert [v.weight for v in picker.weighted(AB)] == [1.0, 1.0]


def test_set_weights_gives_unnamed_variants_of_a_named_model_zero() -> None:
    picker = VariantPicker()
    picker.set_weights({"qa": {"c": 1}}, [ABC])
    assert [v.weight for v in picker.weighted(ABC)] == [0.0, 0.0, 1.0]


def test_set_weights_replaces_earlier_overrides() -> None:
    picker = VariantPicker()
    picker.set_weights({"qa": {"a": 0, "b": 1}}, [AB])
    picker.set_weights({}, [AB])
    assert [v.weight for v in picker.weighted(AB)] == [3.0, 1.0]


@pytest.mark.parametrize(("weights", "match"), [
    ({"nope": {"a": 1}}, "no model named 'nope'"),
    ({"qa": {"a": 1, "zzz": 1}}, r"no variant\(s\) \['zzz'\]"),
    ({"qa": {"default": 1}}, "default"),
])
def test_set_weights_rejects_unknown_models_and_variants(weights: dict[str, dict[str, float]], match: str) -> None:
    picker = VariantPicker()
    with pytest.raises(ValueError, match=match):
        picker.set_weights(weights, [AB])
    assert picker.weighted(AB) == AB.served_variants(), "a rejected update changes nothing"
