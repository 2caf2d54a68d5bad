"""Where one connection's time goes: sequential requests, split by the ``Server-Timing`` header.

    python -m benchmarks.server_timing --out benchmarks/results/server_timing     # ~2 min

One local cluster with perf_bench's shape of ours (Router -> Cache -> ``qa``, simulator at
``--sim-latency-ms``), one client connection (keep-alive), no concurrency. Per round:
``--requests`` unique misses, then as many ``GET /health`` (the ingress round trip: HAProxy,
Serve's direct ingress and Starlette, no core), then as many repeats of one input (hits in the
router's near cache). For misses the medians of the client's time and of each part the
response's ``Server-Timing`` names: ``cache`` (the Cache deployment lookup hop), ``predictor``
(the predictor hop as the router waited for it), ``program`` (the program inside the predictor
replica: DSPy and the LM call), ``total`` (the router core). Writes ``server_timing.json`` and
``server_timing.md``; records the host's CPU steal per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .procstat import StealWindow
from .report import Progress, header_markdown, run_header, write_results

PARTS = ("client", "cache", "predictor", "program", "total")


def _timing(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def one_round(client: Any, prefix: str, requests: int) -> dict[str, float]:
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(requests):
        t0 = time.perf_counter()
        r = client.post(f"{prefix}/v1/predict",
                        json={"model": "qa", "inputs": {"question": f"timing {uuid.uuid4().hex} {i}"}})
        parts["client"].append((time.perf_counter() - t0) * 1000.0)
        r.raise_for_status()
        for name, ms in _timing(r.headers.get("server-timing", "")).items():
            if name in parts:
                parts[name].append(ms)
    health, hits = [], []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.get(f"{prefix}/health").raise_for_status()
        health.append((time.perf_counter() - t0) * 1000.0)
    for _ in range(requests + 10):
        t0 = time.perf_counter()
        client.post(f"{prefix}/v1/predict", json={"model": "qa", "inputs": {"question": "timing: a repeated input"}})
        hits.append((time.perf_counter() - t0) * 1000.0)
    out = {name: statistics.median(v) for name, v in parts.items() if v}
    out["health"] = statistics.median(health)
    out["hit"] = statistics.median(hits[10:])  # the first ones fill the caches
    return out


def summarize(rounds: list[dict[str, Any]], lm_ms: float) -> str:
    med = {k: statistics.median(r["p50_ms"][k] for r in rounds) for k in rounds[0]["p50_ms"]}
    rows = [
        ("miss, client (p50)", med["client"]),
        ("miss, over the LM (client − LM)", med["client"] - lm_ms),
        ("Router → Cache lookup hop (`cache`)", med.get("cache", float("nan"))),
        ("Router → predictor hop, without the program (`predictor` − `program`)",
         med.get("predictor", float("nan")) - med.get("program", float("nan"))),
        ("program in the predictor replica, over the LM (`program` − LM)", med.get("program", float("nan")) - lm_ms),
        ("rest of the router core (`total` − `cache` − `predictor`)",
         med.get("total", float("nan")) - med.get("cache", 0.0) - med.get("predictor", 0.0)),
        ("outside the router core (client − `total`)", med["client"] - med.get("total", float("nan"))),
        ("`GET /health`, client (the ingress round trip alone)", med["health"]),
        ("hit in the router's near cache, client", med["hit"]),
    ]
    lines = ["| part | ms (median of rounds' p50) |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in rows]
    steal = ", ".join(f"{r['steal']:.3f}" for r in rounds)
    lines += ["", f"LM {lm_ms:g} ms. Host CPU steal per round: {steal}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for server_timing.json and server_timing.md")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200, help="misses (and health checks, and hits) per round")
    p.add_argument("--sim-latency-ms", type=float, default=50.0)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.requests < 1 or args.sim_latency_ms < 0:
        p.error("--rounds and --requests must be >= 1, --sim-latency-ms >= 0")
    header = run_header(argv, module="benchmarks.server_timing")

    import httpx

    from .ab_bench import _app
    from .cluster import LMSimProcess, RayServe, serve_config

    say = Progress("server_timing")

    rounds: list[dict[str, Any]] = []
    with LMSimProcess(latency_ms=args.sim_latency_ms) as sim, RayServe() as ray:
        ray.deploy(serve_config(_app("timing", {}, sim.api_base)))
        ray.wait_ready("/timing")
        with httpx.Client(base_url=ray.base_url, timeout=30) as client:
            for i in range(args.rounds):
                steal = StealWindow()
                p50 = one_round(client, "/timing", args.requests)
                row = {"round": i, "p50_ms": p50, "steal": steal.fraction()}
                rounds.append(row)
                say(f"round {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in p50.items()) + f"; steal {row['steal']}")
    table = summarize(rounds, args.sim_latency_ms)
    md = "\n".join([header_markdown("Where one connection's time goes (Server-Timing)", header), "", table, ""])
    jpath, _ = write_results(Path(args.out), "server_timing",
                             {"header": header, "lm_ms": args.sim_latency_ms, "requests": args.requests,
                              "rounds": rounds}, md)
    print(table)
    say(f"wrote {jpath} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
