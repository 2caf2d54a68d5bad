"""Variant choice: weighted, sticky per client, pinnable, and steered away from open breakers.

Contract of ``VariantPicker.order(model, sticky, pinned, unhealthy)``:
- returns the model's variants in the order to try them: the chosen one first, then the
  remaining healthy ones by weight (a variant's breaker opening shifts its traffic to them);
- ``sticky`` (a session header's value, else the API key id, else ``None``) hashes to a fixed
  point in [0, 1), so a client keeps its variant while weights stay the same; ``None`` draws a
  fresh point per request;
- ``pinned`` names a variant explicitly: only that one is tried (422 when unknown, 403 when
  the model does not allow pinning);
- ``unhealthy`` variants are skipped when another variant is healthy (if all are unhealthy,
  the weighted choice stands and its breaker answers);
- weights come from the config, overridden per model by the Router's ``user_config``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Mapping

from .config import ModelConfig, Variant
from .errors import Forbidden, InvalidRequest

__all__ = ["VariantPicker"]


def _point(sticky: str) -> float:
    digest = hashlib.sha256(sticky.encode(errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class VariantPicker:
    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self._rand = rand
        self._weights: dict[str, dict[str, float]] = {}

    def set_weights(self, weights: Mapping[str, Mapping[str, float]], models: Collection[ModelConfig]) -> None:
        """Apply the Router's ``user_config`` weights; unknown models/variants are an error."""
        by_name = {m.name: m for m in models}
        for model, ws in weights.items():
            known = {v.name for v in by_name[model].served_variants()} if model in by_name else None
            if known is None:
                raise ValueError(f"weights: no model named '{model}'")
            unknown = sorted(set(ws) - known)
            if unknown:
                raise ValueError(f"weights[{model}]: no variant(s) {unknown}")
        self._weights = {m: dict(ws) for m, ws in weights.items()}

    def weighted(self, model: ModelConfig) -> list[Variant]:
        override = self._weights.get(model.name)
        variants = model.served_variants()
        if override is None:
            return variants
        return [v._replace(weight=float(override.get(v.name, 0.0))) for v in variants]

    def order(
        self,
        model: ModelConfig,
        sticky: str | None,
        pinned: str | None = None,
        unhealthy: Collection[str] = (),
    ) -> list[Variant]:
        variants = self.weighted(model)
        if pinned is not None:
            if not model.pin_variants:
                raise Forbidden(f"model '{model.name}' does not allow choosing a variant")
            for v in variants:
                if v.name == pinned:
                    return [v]
            raise InvalidRequest(f"field 'variant': model '{model.name}' has no variant '{pinned}'",
                                 status=422, field="variant")
        if len(variants) == 1:
            return variants
        live = [v for v in variants if v.weight > 0]
        point = _point(f"{model.name}\x00{sticky}") if sticky is not None else self._rand()
        chosen, within = _pick(live, point)
        if chosen.deployment in unhealthy:
            # Only this variant's clients move, spread over the healthy ones by weight (by
            # where they sat inside the unhealthy variant's slice); everyone else keeps theirs.
            healthy = [v for v in live if v.deployment not in unhealthy]
            if healthy:
                chosen, _ = _pick(healthy, within)
        rest = sorted((v for v in live if v is not chosen and v.deployment not in unhealthy), key=lambda v: -v.weight)
        return [chosen, *rest]


def _pick(pool: list[Variant], point: float) -> tuple[Variant, float]:
    """The variant whose slice of [0, 1) holds ``point``, and where in that slice (0..1)."""
    total = sum(v.weight for v in pool)
    start = 0.0
    for v in pool:
        width = v.weight / total
        if point < start + width:
            return v, min(max((point - start) / width, 0.0), 0.999_999_999)
        start += width
    return pool[-1], 0.999_999_999
