"""Tokens and dollars of one prediction, attributed to the program's modules.

- ``Prices``: USD per million input/output tokens, from the model's config
  (``lm.input_usd_per_mtok`` / ``lm.output_usd_per_mtok``) or else litellm's offline price
  table; ``None`` when the price is unknown (unknown is not zero).
- ``ModuleUsage``: a DSPy callback, one per request (passed through ``dspy.context``), that
  attributes each LM call's tokens to the innermost predictor of the program that made it
  (``summarize``, ``extract``, ``predict``...). DSPy's usage tracker records every LM call of
  the request; the callback takes the tracker's new entries between an LM call's start and end.
  Concurrent LM calls inside one request (parallel sub-modules) can be attributed to the
  wrong module; the totals stay exact.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from .config import LMConfig

__all__ = ["Prices", "resolve_prices", "ModuleUsage", "module_paths"]


@dataclass(frozen=True)
class Prices:
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    source: str

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1e6


@functools.lru_cache(maxsize=1)
def _litellm_price_table() -> dict[str, Any]:
    """litellm's bundled price table, read as JSON: the same data as ``litellm.model_cost``
    with ``LITELLM_LOCAL_MODEL_COST_MAP``, without importing litellm (seconds) or going online."""
    spec = importlib.util.find_spec("litellm")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "model_prices_and_context_window_backup.json"
        if path.exists():
            table = json.loads(path.read_text())
            return table if isinstance(table, dict) else {}
    return {}


def resolve_prices(lm: LMConfig) -> Prices | None:
    """The config's prices, else litellm's table (offline copy), else None."""
    if lm.input_usd_per_mtok is not None and lm.output_usd_per_mtok is not None:
        return Prices(lm.input_usd_per_mtok, lm.output_usd_per_mtok, "config")
    try:
        table = _litellm_price_table()
    except Exception:  # noqa: BLE001 - no price table is an unknown price, not a failure
        return None
    _, _, bare = lm.model.partition("/")
    for name in (lm.model, bare):
        entry = table.get(name) if name else None
        if entry and isinstance(entry.get("input_cost_per_token"), int | float):
            tin = float(entry["input_cost_per_token"]) * 1e6
            tout = float(entry.get("output_cost_per_token") or 0.0) * 1e6
            if math.isfinite(tin) and math.isfinite(tout):
                return Prices(tin, tout, "litellm")
    return None


def module_paths(module: dspy.Module) -> dict[int, str]:
    """``id(predictor) -> its attribute path`` (``"predict"``, ``"summarize"``...)."""
    return {id(p): name for name, p in module.named_predictors()}


class ModuleUsage(BaseCallback):
    """Per-request attribution of LM tokens to the module path that called the LM."""

    def __init__(self, paths: dict[int, str]) -> None:
        self._paths = paths
        self._open: dict[str, tuple[str, Any, dict[str, int]]] = {}
        self.by_module: dict[str, dict[str, int]] = {}

    def _caller(self) -> str:
        for module in reversed(dspy.settings.caller_modules or []):
            path = self._paths.get(id(module))
            if path is not None:
                return path
        return "program"

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        tracker = dspy.settings.usage_tracker
        seen = {lm: len(entries) for lm, entries in tracker.usage_data.items()} if tracker else {}
        self._open[call_id] = (self._caller(), tracker, seen)

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        opened = self._open.pop(call_id, None)
        if opened is None:
            return
        path, tracker, seen = opened
        slot = self.by_module.setdefault(path, {"input_tokens": 0, "output_tokens": 0, "calls": 0})
        slot["calls"] += 1
        if tracker is None:
            return
        for lm, entries in tracker.usage_data.items():
            for entry in entries[seen.get(lm, 0):]:
                slot["input_tokens"] += int(entry.get("prompt_tokens") or 0)
                slot["output_tokens"] += int(entry.get("completion_tokens") or 0)
