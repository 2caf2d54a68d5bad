"""Benchmark: the prediction cache's tiers over HTTP (issue "Shared cache").

One run starts its own local Ray + Serve, the LM simulator (``--sim-latency-ms``, 50 by
default) and a redis-server, deploys (via the real ``serve deploy``) up to three apps of one
``qa`` model that differ only in their ``cache:``

    mem    /mem    memory tier only (the default cache)
    redis  /redis  Redis tier only: ``memory_max_entries: 0`` so every hit comes from Redis
    both   /both   memory tier in front of Redis (the shared-cache production shape)

and measures, with the load generator in its own process, on loopback:

    miss        @ mem    unique inputs (every request a new question), c=1 and c=HIGH
    hit-memory  @ mem    a fixed set of K inputs, pre-warmed, c=1 and c=HIGH
    hit-redis   @ redis  the same, every hit from Redis, c=1 and c=HIGH
    miss/hit    @ both   miss c=HIGH (writes go to both tiers), hits c=1 and c=HIGH

Results: ``<out>/cache.json`` (everything, with each phase's full load-generator result) and
``<out>/cache.md`` (the table with the machine/date/commit/command header).

    python -m benchmarks.cache_bench --duration-s 10 --out benchmarks/results
    python -m benchmarks.cache_bench --quick            # 2 s per phase: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cluster import LMSimProcess, RayServe, RedisServer, dspy_app, serve_config, sim_model
from .phases import Phase, prewarm, run_phase
from .report import Progress, header_markdown, markdown_table, run_header, write_results

__all__ = ["main", "build_apps", "build_phases", "APPS"]

MODULE = "benchmarks.cache_bench"
APPS = ("mem", "redis", "both")
MODEL = "qa"
PREFIX = {"mem": "/mem", "redis": "/redis", "both": "/both"}
LABEL = {"mem": "memory tier", "redis": "Redis tier only", "both": "memory + Redis"}
HITS = {"mem": ("HIT-MEMORY",), "redis": ("HIT-REDIS",), "both": ("HIT-MEMORY",)}


def build_apps(apps: Sequence[str], sim_api_base: str, redis_url: str | None,
               cache_timeout_s: float | None = None) -> dict[str, Any]:
    """The serve config: one app per name in ``apps``, each Router -> Cache -> qa.
    ``cache_timeout_s`` overrides the router's budget for one cache call (default 0.1 s)."""
    caches: dict[str, dict[str, Any]] = {
        "mem": {"key_prefix": "bench_mem", "memory_max_entries": 10000, "memory_ttl_s": 300},
        "redis": {"key_prefix": "bench_redis", "memory_max_entries": 0, "near_max_entries": 0,
                  "redis": {"url": redis_url}},
        "both": {"key_prefix": "bench_both", "memory_max_entries": 10000, "memory_ttl_s": 300,
                 "redis": {"url": redis_url}},
    }
    if cache_timeout_s is not None:
        for c in caches.values():
            c["timeout_s"] = cache_timeout_s
    return serve_config(*[
        dspy_app(
            f"bench_{name}", PREFIX[name],
            [sim_model(MODEL, sim_api_base, "serve_app.examples:build_qa")],
            cache=caches[name],
            limits={"request_timeout_s": 20},
        )
        for name in apps
    ])


def _unique_body() -> dict[str, Any]:
    # The loadgen adds a fresh nonce per run: no two requests of any phase share an input.
    return {"kind": "unique", "model": MODEL, "field": "question",
            "template": "Benchmark question {nonce}-{i}: what is the capital of country number {i}?"}


def _fixed_values(k: int, nonce: str) -> list[str]:
    return [f"Benchmark hot question {nonce}-{i}: what is item {i}?" for i in range(k)]


def build_phases(apps: Sequence[str], high: int, fixed_values: list[str]) -> list[Phase]:
    fixed = {"kind": "fixed", "model": MODEL, "field": "question", "values": fixed_values}
    phases: list[Phase] = []
    for app in apps:
        p, label, hits = PREFIX[app], LABEL[app], HITS[app]
        if app == "mem":
            phases += [
                Phase("miss", label, p, _unique_body(), 1, expect_x_cache=("MISS",),
                      notes="latency over the LM floor"),
                Phase("miss", label, p, _unique_body(), high, expect_x_cache=("MISS",)),
            ]
        elif app == "both":
            phases.append(Phase("miss", label, p, _unique_body(), high, expect_x_cache=("MISS",),
                                notes="writes to memory and Redis"))
        phases += [
            Phase(f"hit-{'redis' if app == 'redis' else 'memory'}", label, p, fixed, c, expect_x_cache=hits)
            for c in (1, high)
        ]
    return phases


COLUMNS = [
    ("Scenario", "scenario"), ("App (cache)", "app"), ("Concurrency", "concurrency"), ("Requests", "requests"),
    ("Throughput req/s", "throughput_rps"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("Errors", "errors"),
    ("X-Cache mix", "x_cache_mix"), ("LM calls", "lm_calls"),
]


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = result["rows"]
    lines = [
        header_markdown("Cache benchmark (issue \"Shared cache\")", result["header"]),
        "",
        f"Setup: Ray Serve on loopback, one `qa` model (ChainOfThought, one LM call per miss), LM simulator at "
        f"{cfg['sim_latency_ms']:g} ms (jitter {cfg['sim_jitter_ms']:g} ms), every replica `num_cpus: 0`, 1 replica "
        f"each. Load generator: separate process, {cfg['client']}, closed loop, {cfg['warmup_s']:g} s warm-up "
        f"(not recorded) + {cfg['duration_s']:g} s measured per phase. Hit phases use {cfg['fixed_inputs']} "
        f"pre-warmed inputs; miss phases a new input per request. Latency = client-side, send to last byte.",
        "",
        markdown_table(COLUMNS, rows),
        "",
    ]
    floor = cfg["sim_latency_ms"]
    notes = []
    for r in rows:
        if r["scenario"] == "miss" and r["concurrency"] == 1 and r["p50_ms"] is not None:
            notes.append(f"- Miss path at c=1 ({r['app']}): p50 {r['p50_ms']:.1f} ms = LM floor {floor:g} ms "
                         f"+ {r['p50_ms'] - floor:.1f} ms of serving overhead (proxy, router, cache lookup, "
                         f"predictor, DSPy/LiteLLM, simulator HTTP).")
        if r.get("unexpected_x_cache"):
            why = ""
            if r["scenario"].startswith("hit") and "MISS" in r["unexpected_x_cache"]:
                why = (f" Every input was pre-warmed, so a MISS here is a cache lookup that did not answer "
                       f"within the router's cache budget (cache.timeout_s, "
                       f"{cfg.get('cache_timeout_s') or 0.1:g} s) and fell through to the LM; the Cache "
                       f"deployment's own counters for the phase: {r.get('server_cache_ops')}.")
            notes.append(f"- {r['scenario']} @ {r['app']} c={r['concurrency']}: unexpected X-Cache values "
                         f"{r['unexpected_x_cache']}.{why}")
        if r["errors"]:
            notes.append(f"- {r['scenario']} @ {r['app']} c={r['concurrency']}: errors {r['errors_by_status']}.")
    cpu = [r["client_cpu_ms_per_req"] for r in rows if r["client_cpu_ms_per_req"] is not None]
    if cpu:
        notes.append(f"- Load generator CPU: {min(cpu):.3f}-{max(cpu):.3f} ms per request (it shares the "
                     f"machine's {result['header']['machine']['nproc']} cores with the server).")
    notes.append(f"- LM calls counts the simulator's answers during the phase, warm-up included "
                 f"(a hit phase must show 0). Setup took {result['setup_s']:.1f} s; whole run "
                 f"{result['total_s']:.1f} s.")
    if cfg.get("quick"):
        notes.append("- QUICK run (smoke test): phases are too short for stable figures.")
    lines += ["Notes:", *notes, ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Cache tiers over HTTP (issue 'Shared cache').")
    p.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per phase (default 10)")
    p.add_argument("--warmup-s", type=float, default=None, help="unrecorded seconds before each phase (default 2; quick 0.5)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per phase, 0.5 s warm-up")
    p.add_argument("--out", default="benchmarks/results", help="directory for cache.json and cache.md")
    p.add_argument("--apps", default=None,
                   help=f"subset of {','.join(APPS)} (default all; with --quick: mem,redis)")
    p.add_argument("--concurrency", type=int, default=32, help="the high concurrency (default 32)")
    p.add_argument("--fixed-inputs", type=int, default=16, help="size of the pre-warmed input set (default 16)")
    p.add_argument("--sim-latency-ms", type=float, default=50.0)
    p.add_argument("--sim-jitter-ms", type=float, default=0.0)
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request (the app's deadline is 20 s)")
    p.add_argument("--cache-timeout-s", type=float, default=None,
                   help="set the apps' cache.timeout_s (router budget per cache call; app default 0.1)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any phase had errors or unexpected X-Cache values")
    a = p.parse_args(argv)
    if a.quick:
        a.duration_s = 2.0
    if a.warmup_s is None:
        a.warmup_s = 0.5 if a.quick else 2.0
    if a.apps is None:
        a.apps = "mem,redis" if a.quick else ",".join(APPS)
    a.apps = [x.strip() for x in a.apps.split(",") if x.strip()]
    bad = [x for x in a.apps if x not in APPS]
    if bad:
        p.error(f"--apps: unknown {bad}; choose from {APPS}")
    return a


def _sigterm_to_exit(signum: int, frame: Any) -> None:  # so `with` blocks stop what they started
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = Progress("cache_bench")
    header = run_header(argv, MODULE)
    t_start = time.monotonic()
    nonce = uuid.uuid4().hex[:8]
    fixed_values = _fixed_values(args.fixed_inputs, nonce)
    need_redis = any(a in ("redis", "both") for a in args.apps)
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    rows: list[dict[str, Any]] = []
    try:
        with contextlib.ExitStack() as stack:
            log(f"starting: LM simulator ({args.sim_latency_ms:g} ms), redis-server, Ray + Serve")
            sim = stack.enter_context(LMSimProcess(args.sim_latency_ms, args.sim_jitter_ms))
            redis = stack.enter_context(RedisServer()) if need_redis else None
            ray_serve = stack.enter_context(RayServe())
            log(f"Ray up (dashboard {ray_serve.dashboard_url}, HTTP {ray_serve.base_url}); deploying {args.apps}")
            config = build_apps(args.apps, sim.api_base, redis.url if redis else None, args.cache_timeout_s)
            ray_serve.deploy(config, name="cache_bench")
            for app in args.apps:
                ray_serve.wait_ready(PREFIX[app])
            setup_s = time.monotonic() - t_start
            log(f"apps RUNNING and ready after {setup_s:.1f}s")

            bodies = [json.dumps({"model": MODEL, "inputs": {"question": v}}).encode() for v in fixed_values]
            warmed: set[str] = set()
            for phase in build_phases(args.apps, args.concurrency, fixed_values):
                app = next(a for a in args.apps if PREFIX[a] == phase.route_prefix)
                if phase.name.startswith("hit") and app not in warmed:
                    seen = prewarm(ray_serve.base_url, phase.route_prefix, bodies, HITS[app])
                    warmed.add(app)
                    log(f"pre-warmed {len(bodies)} inputs @ {phase.app}: {seen}")
                rows.append(run_phase(phase, ray_serve.base_url, duration_s=args.duration_s,
                                      warmup_s=args.warmup_s, client=args.client, timeout_s=args.timeout_s,
                                      sim=sim, log=log))
            redis_keys = redis.dbsize() if redis else None
            log("stopping Ray, the simulator and redis-server")
    finally:
        signal.signal(signal.SIGTERM, previous)
    total_s = time.monotonic() - t_start
    result = {
        "header": header,
        "config": {
            "apps": args.apps, "serve_config": config, "sim_latency_ms": args.sim_latency_ms,
            "sim_jitter_ms": args.sim_jitter_ms, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
            "concurrency_high": args.concurrency, "fixed_inputs": args.fixed_inputs, "client": args.client,
            "timeout_s": args.timeout_s, "quick": args.quick, "cache_timeout_s": args.cache_timeout_s,
        },
        "setup_s": round(setup_s, 2),
        "total_s": round(total_s, 2),
        "redis_keys_at_end": redis_keys,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
        "rows": rows,
    }
    jpath, mpath = write_results(Path(args.out), "cache", result, render_markdown(result))
    log(f"wrote {jpath} and {mpath} ({total_s:.1f}s in all)")
    print()
    print(markdown_table(COLUMNS, rows))
    failed = [r for r in rows if r["errors"] or r["unexpected_x_cache"]]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
