"""The Router's own CPU per near-cache hit, in one process, without Ray.

The HTTP app the Router replica serves (``serve_app.http.build_http_app`` over a
``RouterCore`` built from ``serve_config.yaml``'s ``dspy`` application, an in-process
``TieredCache`` and a predictor that answers at once) is called as raw ASGI, request after
request, for the same pre-warmed input: the work a hit costs in our code and Starlette, with
Serve's real logging handlers of a replica in the throughput-optimized mode (its 1,000-record
buffer over the rotating replica log file, our secret mask) in the chosen encoding. What this
leaves out is Serve's own request handling (uvicorn, direct ingress, HAProxy):
``benchmarks/ingress_floor.py`` measures that in a cluster.

Variants, alternated round by round in the one process (a noisy minute hits both):
``batched`` (as shipped: ``serve_app.log_writer`` writes the buffered lines a batch at a time)
and ``stock`` (Serve's handler as Serve builds it). CPU is ``time.process_time`` over each
round, divided by its requests; the table gives each variant's median and minimum over rounds.

    python -m benchmarks.router_hit_cpu --out benchmarks/results/router_hit_cpu
"""

from __future__ import annotations

import os

# Serve reads this at import: the replica logging of the throughput-optimized mode (no stderr
# handler, a 1,000-record buffer), as every serve_app cluster runs.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from serve_app.cache import TieredCache
from serve_app.config import AppArgs
from serve_app.http import build_http_app
from serve_app.log_writer import batch_log_writes
from serve_app.logs import install_secret_mask
from serve_app.metrics import Counters
from serve_app.predictor import ModelInfoPayload, PredictionPayload
from serve_app.router import RouterCore

from .cluster import REPO
from .report import Progress, header_markdown, markdown_table, run_header, write_results

VARIANTS = ("batched", "stock")


class _Answer:
    """A predictor that answers at once (only the first request of a round reaches it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def predict(self, inputs: Mapping[str, Any]) -> PredictionPayload:
        return PredictionPayload(model=self.name, program_version="v1", outputs={"answer": "4"},
                                 usage={"input_tokens": 12, "output_tokens": 3, "cost_usd": 0.0, "by_module": {}},
                                 latency_ms=1.0)

    async def info(self) -> ModelInfoPayload:
        return ModelInfoPayload(name=self.name, description="", program_version="v1",
                                inputs=[{"name": "question", "type": "str", "description": ""}],
                                outputs=[{"name": "answer", "type": "str", "description": ""}],
                                lm={"model": "sim"}, breaker={"state": "CLOSED"})


class _LocalCache:
    """The Cache deployment's core in this process (its cost book is not on a hit's path)."""

    def __init__(self, core: TieredCache) -> None:
        self.core = core

    async def get_many(self, keys: list[str]) -> Any:
        return await self.core.get_many(keys)

    async def set_many(self, items: list[Any]) -> list[bool]:
        return await self.core.set_many(items)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    async def index_sync(self, writer: str, want_keys: bool) -> Any:
        return self.core.index_sync(writer, want_keys)

    async def record_usage_many(self, records: list[dict[str, Any]]) -> None:
        return None

    async def cost_report(self) -> dict[str, Any]:
        return {}


def _app_args() -> AppArgs:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    raw = next(a for a in config["applications"] if a["name"] == "dspy")["args"]
    return AppArgs.model_validate(raw)


def _configure_logging(variant: str, logs_dir: str, encoding: str) -> int:
    """Serve's replica logger as a fast-mode replica gets it, then ours on top."""
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    configure_component_logger(component_name="Router", component_id="bench",
                               logging_config=LoggingConfig(logs_dir=logs_dir, encoding=encoding),
                               buffer_size=1000, max_bytes=512 * 1024 * 1024, backup_count=5)
    swapped = batch_log_writes(["ray.serve"]) if variant == "batched" else 0
    install_secret_mask([])
    return swapped


async def _round(app: Any, requests: int) -> float:
    body = json.dumps({"model": "qa", "inputs": {"question": "What is 2 + 2?"}}).encode()
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"x-request-id", b"bench-request")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 8000)}
    status: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    async def call() -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(dict(scope), receive, send)

    for _ in range(50):  # the miss that fills the near cache, then warm hits
        await call()
    status.clear()
    t0 = time.process_time()
    for _ in range(requests):
        await call()
    cpu = time.process_time() - t0
    if status.count(200) != requests:
        raise RuntimeError(f"expected {requests} answers 200, got {sorted(set(status))}")
    return cpu / requests * 1e6


async def _measure(args: argparse.Namespace, say: Progress) -> list[dict[str, Any]]:
    app_args = _app_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sa_bench_logs_", ignore_cleanup_errors=True) as logs_dir:
        for rnd in range(args.rounds):
            for variant in VARIANTS:
                swapped = _configure_logging(variant, logs_dir, args.encoding)
                core = RouterCore(app_args, {m.name: _Answer(m.name) for m in app_args.models},
                                  _LocalCache(TieredCache.from_config(app_args.cache)), counters=Counters())
                us = await _round(build_http_app(core), args.requests)
                rows.append({"round": rnd, "variant": variant, "us_per_hit": round(us, 1), "swapped": swapped})
                say(f"round {rnd} {variant}: {us:.1f} us CPU per hit")
    return rows


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: median and minimum over rounds, and the median over rounds of its
    difference from the same round's ``batched`` (the paired figure a noisy host moves least)."""
    by = {(r["round"], r["variant"]): r["us_per_hit"] for r in rows}
    out = []
    for variant in VARIANTS:
        vals = [r["us_per_hit"] for r in rows if r["variant"] == variant]
        diffs = [v - by[(rnd, "batched")] for (rnd, var), v in by.items() if var == variant]
        out.append({"variant": variant, "median": round(statistics.median(vals), 1), "min": min(vals),
                    "minus_batched": round(statistics.median(diffs), 1), "rounds": len(vals)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for router_hit_cpu.json and .md")
    parser.add_argument("--requests", type=int, default=10_000, help="hits per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encoding", choices=("TEXT", "JSON"), default="TEXT",
                        help="Serve's log encoding (serve_config.yaml: TEXT; configs/production.yaml: JSON)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    say = Progress("router_hit_cpu")
    header = run_header(argv, module="benchmarks.router_hit_cpu")
    try:
        import uvloop  # what Serve's replicas run on

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        rows = runner.run(_measure(args, say))
    summary = _summary(rows)
    md = [header_markdown("The Router's own CPU per near-cache hit (in-process, no Ray)", header), "",
          (f"- {args.rounds} rounds x {args.requests:,} hits per variant, alternated; Serve log encoding "
           f"{args.encoding}; `serve_config.yaml`'s `dspy` application; raw ASGI calls into the Router's HTTP app"),
          "- CPU: `time.process_time` per round / hits. Serve's own request handling is not in these figures.",
          "", markdown_table([("variant", "variant"), ("median us/hit", "median"), ("min us/hit", "min"),
                              ("minus batched, same round (median) us", "minus_batched"),
                              ("rounds", "rounds")], summary),
          "", "Every round:", "",
          markdown_table([("round", "round"), ("variant", "variant"), ("us/hit", "us_per_hit")], rows)]
    jpath, mpath = write_results(args.out, "router_hit_cpu", {"header": header, "summary": summary, "rounds": rows},
                                 "\n".join(md))
    say(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
