"""A/B of two (or more) configurations of ours in ONE Ray cluster, alternated phase by phase.

Each variant is its own application (Router, Cache, ``qa``) at ``/<name>``; they differ only
in what the variant sets: ``cache`` fields of the app's config, Serve's ``logging_config`` of
the application (e.g. ``{"enable_access_log": false}``), or ``env`` variables for its
replicas (a ``runtime_env``: Serve reads its ``RAY_SERVE_*`` constants when a replica process
starts, so replica-side switches such as ``RAY_SERVE_USE_GRPC_BY_DEFAULT`` can differ per app).
Rounds alternate the variants (A B A B ...), each a closed-loop phase of unique-input misses,
so a slow minute of the shared machine hits both; every phase records the machine's CPU
steal (``/proc/stat``), which is how much a noisy neighbour took.

    python -m benchmarks.ab_bench --out benchmarks/results/ab_batching \\
        --variants '{"batched": {}, "unbatched": {"cache": {"hop_batch_max": 1, "write_batch_s": 0}}}'

Writes ``ab.json`` (every phase) and ``ab.md`` (per variant: median req/s, CPU per request by
deployment, the router's Cache hops per request). Starts and stops its own Ray cluster and
LM simulator (by PID / ``ray.shutdown()``), like the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import httpx

from .cluster import LMSimProcess, RayServe, dspy_app, serve_config
from .loadgen import LoadSpec, run_load
from .perf_bench import _model, _router
from .phases import PREDICT_PATH
from .procstat import cmdline, descendants, machine_busy, machine_steal, proc_cpu_s
from .report import Progress, header_markdown, run_header, write_results

DEFAULT_VARIANTS = {"batched": {}, "unbatched": {"cache": {"hop_batch_max": 1, "write_batch_s": 0}}}


def _app(name: str, variant: dict[str, Any], api_base: str) -> dict[str, Any]:
    # perf_bench's shape of ours (serve_config.yaml's Router and qa settings, qa pinned to one replica)
    app = dspy_app(name, f"/{name}", [_model("qa", api_base)], cache=variant.get("cache") or None,
                   limits={"request_timeout_s": 20}, env_vars=variant.get("env"),
                   deployments=[_router(), {"name": "qa", "num_replicas": 1, "max_ongoing_requests": 128,
                                            "max_queued_requests": 256}])
    if variant.get("logging_config"):
        app["logging_config"] = variant["logging_config"]  # Serve's per-application logging_config
    return app


def _replica_cpu(roots: list[int]) -> dict[str, float]:
    """CPU seconds by ``<app>:<deployment>`` of every Serve replica under ``roots``."""
    out: dict[str, float] = {}
    for pid in descendants(roots):
        cmd = cmdline(pid)
        if "ServeReplica:" in cmd:
            key = cmd.split("ServeReplica:", 1)[1].split()[0]
            out[key] = out.get(key, 0.0) + (proc_cpu_s(pid) or 0.0)
    return out


def _hops(base_url: str, name: str) -> dict[str, float]:
    ready = httpx.get(f"{base_url}/{name}/ready", timeout=10).json()
    return {f"{i['name']}/{i['labels'].get('op')}": i["value"]
            for i in (ready.get("router") or {}).get("ops", []) if i["name"].startswith("cache_hop")}


def phase(ray: RayServe, name: str, concurrency: int, duration_s: float, warmup_s: float,
          kind: str = "unique") -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "model": "qa", "field": "question",
                            "template": "A/B question {nonce}-{i}: what is the capital of country {i}?"}
    if kind == "fixed":
        body["k"] = 16  # 16 inputs: after the warm-up every request is a hit in the router's near cache
    spec = LoadSpec(url=f"{ray.base_url}/{name}{PREDICT_PATH}", body=body,
                    mode="closed", concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s, timeout_s=20)
    cpu0, steal0, (_, tot0), hops0 = (_replica_cpu(ray.server_pids), machine_steal(), machine_busy(),
                                      _hops(ray.base_url, name))
    res = run_load(spec)
    cpu1, steal1, (_, tot1), hops1 = (_replica_cpu(ray.server_pids), machine_steal(), machine_busy(),
                                      _hops(ray.base_url, name))
    done = max(1, res.get("all_ok") or res["ok"])  # warm-up included, like the CPU window
    cpu = {k.split(":", 1)[1]: round((v - cpu0.get(k, 0.0)) * 1000 / done, 3)
           for k, v in cpu1.items() if k.startswith(f"{name}:")}
    hops = {k: round((v - hops0.get(k, 0.0)) / done, 3) for k, v in hops1.items()}
    return {"variant": name, "rps": res["throughput_rps"], "p50_ms": res["latency_ms"]["p50"],
            "p99_ms": res["latency_ms"]["p99"], "errors": res["error_count"],
            "steal": round((steal1 - steal0) / (tot1 - tot0), 3) if tot1 > tot0 else None,
            "cpu_ms_per_req": cpu, "cpu_ms_total": round(sum(cpu.values()), 3), "hops_per_req": hops}


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> str:
    lines = ["| variant | req/s (median of rounds) | CPU ms/req (median) | by deployment (median) | Cache hops per request | max steal |",
             "|---|---:|---:|---|---|---:|"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        deps = sorted({d for r in mine for d in r["cpu_ms_per_req"]})
        by = ", ".join(f"{d} {statistics.median(r['cpu_ms_per_req'].get(d, 0.0) for r in mine):.2f}" for d in deps)
        hop_keys = sorted({k for r in mine for k in r["hops_per_req"] if k.startswith("cache_hops/")})
        hops = ", ".join(f"{k.split('/')[1]} {statistics.median(r['hops_per_req'].get(k, 0.0) for r in mine):.2f}"
                         for k in hop_keys) or "-"
        lines.append(f"| {v} | {statistics.median(r['rps'] for r in mine):.1f} | "
                     f"{statistics.median(r['cpu_ms_total'] for r in mine):.2f} | {by} | {hops} | "
                     f"{max((r['steal'] or 0.0) for r in mine):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for ab.json and ab.md")
    p.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS),
                   help='JSON {name: {"cache": {...}, "env": {...}, "logging_config": {...}}}; names are URL path segments')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--sim-latency-ms", type=float, default=50.0)
    p.add_argument("--kind", choices=("unique", "fixed"), default="unique",
                   help="unique inputs (every request a miss) or 16 fixed inputs (hits after the warm-up)")
    a = p.parse_args(argv)
    variants: dict[str, dict[str, Any]] = json.loads(a.variants)
    if not variants or not all(n.replace("_", "").replace("-", "").isalnum() for n in variants):
        p.error("--variants: a JSON object of one or more variants named with letters, digits, - and _")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Progress("ab_bench")

    rows: list[dict[str, Any]] = []
    with LMSimProcess(a.sim_latency_ms) as sim, RayServe() as ray:
        log(f"deploying {', '.join(variants)}")
        ray.deploy(serve_config(*[_app(n, v, sim.api_base) for n, v in variants.items()]))
        for r in range(a.rounds):
            for name in variants:
                row = phase(ray, name, a.concurrency, a.duration_s, a.warmup_s, a.kind)
                row["round"] = r
                rows.append(row)
                log(f"round {r} {name}: {row['rps']} req/s, p99 {row['p99_ms']} ms, CPU {row['cpu_ms_total']} ms/req "
                    f"{row['cpu_ms_per_req']}, hops/req {row['hops_per_req']}, steal {row['steal']}, "
                    f"errors {row['errors']}")
    table = summarize(rows, list(variants))
    head = run_header(argv, module="benchmarks.ab_bench")
    markdown = (header_markdown("A/B of our configurations in one cluster", head)
                + f"\n- Variants: `{json.dumps(variants)}`\n- Closed loop c={a.concurrency}, "
                f"{'unique inputs (misses)' if a.kind == 'unique' else '16 fixed inputs (hits)'}, "
                f"LM {a.sim_latency_ms:g} ms, {a.rounds} rounds of {a.warmup_s:g} + {a.duration_s:g} s per variant, "
                f"alternated\n\n{table}\n")
    jpath, mpath = write_results(out, "ab", {"header": head, "variants": variants, "phases": rows}, markdown)
    print(table)
    log(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
