"""Counters, gauges and histograms every core reports to, and their export to Ray.

``Counters`` is plain Python: unit tests read it directly and ``/ready`` detail shows it. A
deployment attaches a sink (``RaySink``) that forwards each observation to
``ray.serve.metrics``, so the same numbers reach Ray's Prometheus endpoint and dashboard as
``ray_dspy_*``. Nothing here raises into a request: a failing sink is dropped and counted,
because a metrics failure must never fail a request.

Exported families (internal name -> Ray metric; Ray adds ``deployment``, ``replica``,
``application`` tags and ``_total`` to counters):

| internal              | kind      | exported as                  | labels                          |
|-----------------------|-----------|------------------------------|---------------------------------|
| predictions           | counter   | dspy_predictions             | model, variant, outcome, cache  |
| prediction_latency_ms | histogram | dspy_prediction_latency_ms   | model, variant                  |
| cache_ops             | counter   | dspy_cache_operations        | tier, op, result                |
| breaker_state         | gauge     | dspy_breaker_state           | model                           |
| cost_usd              | counter   | dspy_cost_usd                | model, variant                  |
| tokens                | counter   | dspy_tokens                  | model, variant, type            |
| active_predictions    | gauge     | dspy_active_predictions      | model                           |
| errors                | counter   | dspy_errors                  | model, code                     |
| rate_limited          | counter   | dspy_rate_limited            | kind (req, tok)                 |
| budget_spend_usd      | gauge     | dspy_budget_spend_usd        | scope, name, window             |
| budget_spent_ratio    | gauge     | dspy_budget_spent_ratio      | scope, name, window             |
| budget_soft_limit_ratio | gauge   | dspy_budget_soft_limit_ratio | scope, name, window             |
| budget_exceeded       | counter   | dspy_budget_exceeded         | scope, name, window             |

Other internal counters (cache_client_errors, fallbacks, ...) stay in-process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Counters", "Sink", "RaySink", "FAMILIES", "LATENCY_BUCKETS_MS"]

Kind = Literal["counter", "gauge", "histogram"]
Sink = Callable[[Kind, str, dict[str, str], float], None]
Key = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)
_MAX_MEMO = 4096  # label sets remembered per Counters / RaySink; past it keys are computed per call

# Around the SLOs (p95 < 500 ms, p99 < 1 s), from a cache hit to a slow multi-call program.
LATENCY_BUCKETS_MS = [25.0, 50.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 10000.0]

FAMILIES: dict[str, tuple[Kind, str, tuple[str, ...], str]] = {
    "predictions": ("counter", "dspy_predictions", ("model", "variant", "outcome", "cache"),
                    "Predictions answered, by outcome (ok, degraded, error) and cache status."),
    "prediction_latency_ms": ("histogram", "dspy_prediction_latency_ms", ("model", "variant"),
                              "Router-side latency of /v1/predict in milliseconds."),
    "cache_ops": ("counter", "dspy_cache_operations", ("tier", "op", "result"),
                  "Cache operations by tier, operation and result."),
    "breaker_state": ("gauge", "dspy_breaker_state", ("model",),
                      "Circuit breaker state of this predictor replica: 0 closed, 1 half-open, 2 open."),
    "cost_usd": ("counter", "dspy_cost_usd", ("model", "variant"), "LM spend in US dollars."),
    "tokens": ("counter", "dspy_tokens", ("model", "variant", "type"), "LM tokens by type (input, output)."),
    "active_predictions": ("gauge", "dspy_active_predictions", ("model",),
                           "Predictions running in this predictor replica."),
    "errors": ("counter", "dspy_errors", ("model", "code"), "Client-visible errors by stable error code."),
    "rate_limited": ("counter", "dspy_rate_limited", ("kind",),
                     "Requests refused by a rate limit (kind: the first configured limit, req or tok)."),
    "budget_spend_usd": ("gauge", "dspy_budget_spend_usd", ("scope", "name", "window"),
                         "Spend of a budget in its current window (cluster-wide as last seen by this router)."),
    "budget_spent_ratio": ("gauge", "dspy_budget_spent_ratio", ("scope", "name", "window"),
                           "Spend of a budget as a fraction of its hard limit (soft limit when no hard one)."),
    "budget_soft_limit_ratio": ("gauge", "dspy_budget_soft_limit_ratio", ("scope", "name", "window"),
                                "A budget's soft limit as a fraction of its hard limit."),
    "budget_exceeded": ("counter", "dspy_budget_exceeded", ("scope", "name", "window"),
                        "Requests refused because a budget's hard limit was reached."),
}


class Counters:
    """Monotonic counters, last-value gauges and histogram observations, keyed by name and
    sorted labels. ``inc`` keeps counting even when the sink fails."""

    def __init__(self, sink: Sink | None = None) -> None:
        self._counts: Counter[Key] = Counter()
        self._gauges: dict[Key, float] = {}
        self._sink = sink
        # (name, labels in call order) -> the sorted key: a hit records three series, and
        # sorting their labels on every call was most of what this class cost per request.
        self._keys: dict[tuple[str, tuple[tuple[str, str], ...]], Key] = {}

    def _key(self, name: str, labels: dict[str, str]) -> Key:
        raw = (name, tuple(labels.items()))
        key = self._keys.get(raw)
        if key is None:
            key = (name, tuple(sorted(labels.items())))
            if len(self._keys) < _MAX_MEMO:  # label values come from config and enums; bounded anyway
                self._keys[raw] = key
        return key

    def _emit(self, kind: Kind, name: str, labels: dict[str, str], value: float) -> None:
        if self._sink is None:
            return
        try:
            self._sink(kind, name, labels, value)
        except Exception:  # noqa: BLE001 - metrics never fail a request
            self._counts[("metrics_errors", ())] += 1

    def inc(self, name: str, value: float = 1.0, /, **labels: str) -> None:
        self._counts[self._key(name, labels)] += value
        self._emit("counter", name, labels, value)

    def set_gauge(self, name: str, value: float, /, **labels: str) -> None:
        self._gauges[self._key(name, labels)] = value
        self._emit("gauge", name, labels, value)

    def observe(self, name: str, value: float, /, **labels: str) -> None:
        _, sorted_labels = self._key(name, labels)
        self._counts[(f"{name}_count", sorted_labels)] += 1
        self._counts[(f"{name}_sum", sorted_labels)] += value
        self._emit("histogram", name, labels, value)

    def get(self, name: str, /, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._counts.get(key, self._gauges.get(key, 0.0))

    def total(self, name: str, /, **match: str) -> float:
        """Sum of counter ``name`` over every label set that includes ``match``."""
        return sum(
            v
            for (n, labels), v in self._counts.items()
            if n == name and all(dict(labels).get(k) == want for k, want in match.items())
        )

    def snapshot(self) -> list[dict[str, Any]]:
        items = list(self._counts.items()) + list(self._gauges.items())
        return [{"name": n, "labels": dict(labels), "value": v} for (n, labels), v in sorted(items)]


class RaySink:
    """Forwards the exported families to ``ray.serve.metrics`` (created lazily, inside a
    replica); names it does not export are ignored.

    Counter increments and gauge values are aggregated in memory and handed to Ray at most
    every ``flush_s`` (a background thread flushes idle periods): Ray exports on its own
    interval anyway, and a ``Metric._record`` per event was a visible share of a request's
    CPU in the profile (benchmarks/results/profile.md). Histograms are recorded as they come
    (one value per observation is their API). Counts are never lost, only delayed by up to
    ``flush_s``."""

    def __init__(self, flush_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics: dict[str, Any] = {}
        self._flush_s = flush_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[Key, float] = {}
        self._gauges: dict[Key, float] = {}
        self._last_flush = clock()
        self._thread: threading.Thread | None = None
        # (name, labels in call order) -> (name, tags in the family's order), or None for a
        # name that is not exported.
        self._tags: dict[tuple[str, tuple[tuple[str, str], ...]], Key | None] = {}

    def _series(self, name: str, labels: dict[str, str]) -> Key | None:
        raw = (name, tuple(labels.items()))
        series = self._tags.get(raw, False)
        if series is False:
            family = FAMILIES.get(name)
            series = None if family is None else (name, tuple((k, str(labels.get(k, ""))) for k in family[2]))
            if len(self._tags) < _MAX_MEMO:
                self._tags[raw] = series
        return series  # type: ignore[return-value]

    def _metric(self, name: str) -> Any:
        metric = self._metrics.get(name)
        if metric is None:
            from ray.serve import metrics as serve_metrics

            kind, exported, tag_keys, description = FAMILIES[name]
            if kind == "counter":
                metric = serve_metrics.Counter(exported, description=description, tag_keys=tag_keys)
            elif kind == "gauge":
                metric = serve_metrics.Gauge(exported, description=description, tag_keys=tag_keys)
            else:
                metric = serve_metrics.Histogram(
                    exported, description=description, boundaries=LATENCY_BUCKETS_MS, tag_keys=tag_keys
                )
            self._metrics[name] = metric
        return metric

    def __call__(self, kind: Kind, name: str, labels: dict[str, str], value: float) -> None:
        series = self._series(name, labels)
        if series is None:
            return
        if kind == "histogram":
            # A fresh dict per call: Serve's histogram adds the request's route to the one it is given.
            self._metric(name).observe(value, tags=dict(series[1]))
            return
        with self._lock:
            if kind == "counter":
                self._counts[series] = self._counts.get(series, 0.0) + value
            else:
                self._gauges[series] = value
        if self._thread is None:
            self._thread = threading.Thread(target=self._flush_loop, name="serve-app-metrics", daemon=True)
            self._thread.start()
        if self._clock() - self._last_flush >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        """Hand the aggregated counters and gauges to Ray now."""
        with self._lock:
            counts, self._counts = self._counts, {}
            gauges, self._gauges = self._gauges, {}
            self._last_flush = self._clock()
        for (name, tags), value in counts.items():
            try:
                self._metric(name).inc(value, tags=dict(tags))
            except Exception:  # noqa: BLE001 - one bad series must not drop the others
                continue
        for (name, tags), value in gauges.items():
            try:
                self._metric(name).set(value, tags=dict(tags))
            except Exception:  # noqa: BLE001
                continue

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self._flush_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - metrics never fail anything; next round tries again
                pass
