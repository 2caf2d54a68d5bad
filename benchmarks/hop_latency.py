"""Latency of one Serve handle hop, back to back and after the replicas sat idle (no load generator).

    python -m benchmarks.hop_latency --out benchmarks/results/hop_latency     # ~2 min

Why: at one connection a miss makes two handle hops (Router -> Cache lookup, Router ->
predictor), and their latency, not their CPU, is what the "added latency at c=1" target
measures. This separates what Serve's hop costs from what our code adds: a caller deployment
(``Caller``, the app's ingress) times sequential calls, each kind ``--calls`` times after a
warm-up, in one of two rhythms:

- back to back: the next call leaves as soon as the previous one answered;
- after ``--gap-ms`` idle (50 ms, the simulated LM's latency): caller and callee have been
  asleep in between, as at one connection, where each hop waits on the LM call before it.

Call kinds: ``noop`` (Serve's handle call to a method returning its argument: Serve alone),
``Cache.get_many via HopBatcher`` (the router's lookup path: our Cache deployment, our
``HandleCache`` and ``HopBatcher`` in the detached context, as the router makes it).
Writes ``hop_latency.json`` / ``hop_latency.md`` (median over ``--rounds`` of each round's p50;
the host's CPU steal per round). Starts and stops its own Ray cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from .procstat import StealWindow
from .report import Progress, header_markdown, run_header, write_results

KINDS = ("noop", "Cache.get_many via HopBatcher")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Callee:
    async def noop(self, x: Any) -> Any:
        return x


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Caller:
    def __init__(self, callee: DeploymentHandle, cache: DeploymentHandle) -> None:
        from serve_app.deployments import HandleCache, detached_context
        from serve_app.hop_batch import HopBatcher

        self.callee = callee
        self.lookups = HopBatcher(HandleCache(cache).get_many, timeout_s=1.0, context=detached_context, max_inflight=1)

    async def _p50_ms(self, call: Callable[[int], Awaitable[Any]], calls: int, gap_s: float) -> float:
        for i in range(20):  # warm-up: connections, caches
            await call(i)
        lat = []
        for i in range(calls):
            if gap_s:
                await asyncio.sleep(gap_s)
            t0 = time.perf_counter()
            await call(i)
            lat.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(lat)

    async def __call__(self, request: Any) -> dict[str, dict[str, float]]:
        calls = int(request.query_params.get("calls", "200"))
        gap_s = float(request.query_params.get("gap_ms", "50")) / 1000.0
        kinds: dict[str, Callable[[int], Awaitable[Any]]] = {
            "noop": lambda i: self.callee.noop.remote(i),
            "Cache.get_many via HopBatcher": lambda i: self.lookups.call(f"hop-latency-{i}"),
        }
        return {kind: {"back to back": await self._p50_ms(call, calls, 0.0),
                       "after idle": await self._p50_ms(call, calls, gap_s)}
                for kind, call in kinds.items()}


def build_app() -> Any:
    from serve_app.config import CacheConfig
    from serve_app.deployments import Cache

    return Caller.bind(Callee.bind(), Cache.options(ray_actor_options={"num_cpus": 0}).bind(CacheConfig()))


def summarize(rounds: list[dict[str, Any]], gap_ms: float) -> str:
    lines = [f"| call | back to back p50 ms | after {gap_ms:g} ms idle p50 ms | difference ms |", "|---|---:|---:|---:|"]
    for kind in KINDS:
        b2b = statistics.median(r["p50_ms"][kind]["back to back"] for r in rounds)
        idle = statistics.median(r["p50_ms"][kind]["after idle"] for r in rounds)
        lines.append(f"| {kind} | {b2b:.2f} | {idle:.2f} | {idle - b2b:+.2f} |")
    steal = ", ".join(f"{r['steal']:.3f}" for r in rounds)
    lines += ["", f"Median over {len(rounds)} rounds of each round's p50. Host CPU steal per round: {steal}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for hop_latency.json and hop_latency.md")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200, help="timed calls per kind and rhythm in a round")
    p.add_argument("--gap-ms", type=float, default=50.0, help="idle time before each call in the 'after idle' rhythm")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.gap_ms <= 0:
        p.error("--rounds and --calls must be >= 1 and --gap-ms > 0")
    header = run_header(argv, module="benchmarks.hop_latency")

    import httpx

    from .cluster import RayServe

    say = Progress("hop_latency")

    rounds: list[dict[str, Any]] = []
    with RayServe() as ray:
        serve.run(build_app(), name="hop", route_prefix="/hop")
        for i in range(args.rounds):
            steal = StealWindow()
            r = httpx.get(f"{ray.base_url}/hop", params={"calls": args.calls, "gap_ms": args.gap_ms}, timeout=600)
            r.raise_for_status()
            row = {"round": i, "p50_ms": r.json(), "steal": steal.fraction()}
            rounds.append(row)
            say(f"round {i}: {row['p50_ms']} steal {row['steal']}")
    table = summarize(rounds, args.gap_ms)
    md = "\n".join([header_markdown("Latency of one Serve handle hop", header), "", table, ""])
    jpath, _ = write_results(Path(args.out), "hop_latency",
                             {"header": header, "gap_ms": args.gap_ms, "calls": args.calls, "rounds": rounds}, md)
    print(table)
    say(f"wrote {jpath} and its .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
