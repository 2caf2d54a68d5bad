"""In-process counters every core reports to.

``Counters`` is plain Python (unit tests read it directly; ``/ready`` detail shows it). It
never raises into a request: a failing sink is dropped and counted, because a metrics
failure must never fail a request. Deployments may attach a sink that forwards each
increment to ``ray.serve.metrics`` so the same numbers reach Prometheus and the dashboard.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["Counters", "Sink"]

Sink = Callable[[str, dict[str, str], float], None]


class Counters:
    """Monotonic counters keyed by name and sorted labels."""

    def __init__(self, sink: Sink | None = None) -> None:
        self._counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._sink = sink

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._counts[(name, tuple(sorted(labels.items())))] += value
        if self._sink is not None:
            try:
                self._sink(name, labels, value)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                self._counts[("metrics_errors", ())] += 1

    def get(self, name: str, **labels: str) -> float:
        return self._counts.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **match: str) -> float:
        """Sum of ``name`` over every label set that includes ``match``."""
        return sum(
            v
            for (n, labels), v in self._counts.items()
            if n == name and all(dict(labels).get(k) == want for k, want in match.items())
        )

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "labels": dict(labels), "value": v} for (n, labels), v in sorted(self._counts.items())
        ]
