"""Scenario building blocks shared by every benchmark: one measured phase, pre-warming.

A *phase* is one load-generator run against one deployed app, plus the server-side facts
checked around it (LM calls the simulator answered during the phase). Scenarios
(``cache_bench`` and later ones) are lists of phases over apps they deploy with
``benchmarks.cluster``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .cluster import LMSimProcess
from .loadgen import LoadSpec, run_load
from .report import fmt_mix

__all__ = ["Phase", "prewarm", "run_phase", "cache_ops", "PREDICT_PATH"]

PREDICT_PATH = "/v1/predict"


@dataclasses.dataclass
class Phase:
    """One row of a results table."""

    name: str  # e.g. "miss", "hit-memory"
    app: str  # label of the app (what it is: "memory tier", "Redis tier only", ...)
    route_prefix: str
    body: dict[str, Any]  # loadgen body spec
    concurrency: int = 1
    mode: str = "closed"
    rate: float = 0.0
    max_inflight: int = 256
    expect_x_cache: tuple[str, ...] = ()  # every OK response should carry one of these
    notes: str = ""


def prewarm(base_url: str, route_prefix: str, bodies: Iterable[bytes], until: tuple[str, ...],
            timeout_s: float = 30.0, parallel: int = 8) -> dict[str, int]:
    """Send each body until its ``X-Cache`` is one of ``until`` (cache writes are in the
    background, so the first answer is a MISS and a later one the hit), ``parallel`` bodies
    at a time. Returns the ``X-Cache`` counts seen while warming."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    url = base_url + route_prefix.rstrip("/") + PREDICT_PATH
    deadline = time.monotonic() + timeout_s

    def warm(http: httpx.Client, body: bytes) -> None:
        while True:
            r = http.post(url, content=body)
            xc = r.headers.get("X-Cache", f"status-{r.status_code}")
            with lock:
                seen[xc] += 1
            if r.status_code == 200 and xc in until:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prewarm: {body[:80]!r} never answered {until} (saw {dict(seen)})")
            time.sleep(0.02)

    with httpx.Client(timeout=10, headers={"content-type": "application/json"},
                      limits=httpx.Limits(max_connections=parallel)) as http:
        with ThreadPoolExecutor(parallel) as pool:
            for fut in [pool.submit(warm, http, b) for b in bodies]:
                fut.result()
    return dict(seen)


def cache_ops(base_url: str, route_prefix: str) -> dict[str, float]:
    """The Cache deployment's own op counters (from the app's ``GET /ready``), flattened to
    ``"tier/op/result" -> n``: what the cache did, whatever the router made of it; plus the
    answering router replica's hops to it, ``"hops/<op>"`` calls carrying ``"hop_items/<op>"``
    lookups or write-backs (batching)."""
    r = httpx.get(base_url + route_prefix.rstrip("/") + "/ready", timeout=10)
    detail = r.json() or {}
    cache = detail.get("cache") or {}
    out: dict[str, float] = {}
    for item in cache.get("ops") or []:
        if item.get("name") != "cache_ops":
            continue
        lb = item.get("labels", {})
        key = f"{lb.get('tier')}/{lb.get('op')}/{lb.get('result')}"
        out[key] = out.get(key, 0) + item.get("value", 0)
    for item in (detail.get("router") or {}).get("ops") or []:
        if item.get("name") in ("cache_hops", "cache_hop_items"):
            key = f"{item['name'].removeprefix('cache_')}/{item.get('labels', {}).get('op')}"
            out[key] = out.get(key, 0) + item.get("value", 0)
    return out


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0)) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def run_phase(
    phase: Phase,
    base_url: str,
    *,
    duration_s: float,
    warmup_s: float,
    client: str = "aiohttp",
    timeout_s: float = 30.0,
    sim: LMSimProcess | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one phase in a load-generator subprocess; return its table row (with the full
    loadgen result under ``"loadgen"``)."""
    spec = LoadSpec(
        url=base_url + phase.route_prefix.rstrip("/") + PREDICT_PATH,
        body=phase.body,
        mode=phase.mode,
        concurrency=phase.concurrency,
        rate=phase.rate,
        max_inflight=phase.max_inflight,
        duration_s=duration_s,
        warmup_s=warmup_s,
        timeout_s=timeout_s,
        client=client,
    )
    label = f"{phase.name} @ {phase.app}, " + (
        f"closed c={phase.concurrency}" if phase.mode == "closed" else f"open {phase.rate:g}/s"
    )
    log(f"phase start: {label} ({warmup_s:g}s warm-up + {duration_s:g}s)")
    calls_before = sim.calls() if sim is not None else None
    ops_before = _safe_ops(base_url, phase.route_prefix)
    res = run_load(spec)
    lm_calls = sim.calls() - calls_before if sim is not None and calls_before is not None else None
    ops_after = _safe_ops(base_url, phase.route_prefix)
    server_cache_ops = _diff(ops_after, ops_before) if ops_before is not None and ops_after is not None else None
    lat = res["latency_ms"]
    unexpected = {k: v for k, v in res["x_cache"].items() if phase.expect_x_cache and k not in phase.expect_x_cache}
    row = {
        "scenario": phase.name,
        "app": phase.app,
        "mode": phase.mode,
        "concurrency": phase.concurrency if phase.mode == "closed" else None,
        "rate": phase.rate if phase.mode == "open" else None,
        "requests": res["count"],
        "ok": res["ok"],
        "throughput_rps": res["throughput_rps"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors": res["error_count"],
        "errors_by_status": res["errors"],
        "x_cache": res["x_cache"],
        "x_cache_mix": fmt_mix(res["x_cache"]),
        "hit_ratio": res["hit_ratio"],
        "lm_calls": lm_calls,  # includes the warm-up's calls
        "server_cache_ops": server_cache_ops,  # the Cache deployment's counters, warm-up included
        "client_cpu_ms_per_req": res["client_cpu_ms_per_req"],
        "unexpected_x_cache": unexpected,
        "notes": phase.notes,
        "loadgen": res,
    }
    log(
        f"phase end:   {label}: {res['count']} req, {res['throughput_rps']:.1f} req/s, "
        f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {res['error_count']} {json.dumps(res['errors'])}, "
        f"X-Cache {row['x_cache_mix']}, LM calls {lm_calls}, client CPU {res['client_cpu_ms_per_req']} ms/req"
    )
    if server_cache_ops is not None:
        log(f"  server-side cache ops during the phase: {server_cache_ops}")
    if unexpected:
        log(f"  WARNING: unexpected X-Cache values {unexpected} (expected {phase.expect_x_cache})")
    return row


def _safe_ops(base_url: str, route_prefix: str) -> dict[str, float] | None:
    try:
        return cache_ops(base_url, route_prefix)
    except Exception:  # noqa: BLE001 - a diagnostic, never a reason to fail a phase
        return None
