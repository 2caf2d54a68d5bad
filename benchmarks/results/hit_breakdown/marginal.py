"""Where the Router's CPU per near-cache hit goes, in one process (no Ray): the whole hit, the
hit without the prediction log line, the hit without our metric calls, and a bare Starlette
route with the same harness (``benchmarks.router_hit_cpu``'s raw-ASGI loop and Serve's real
replica logging, TEXT), alternated over rounds.

    .venv/bin/python benchmarks/results/hit_breakdown/marginal.py     # from the repository root (~1 min)
"""
import os
import statistics
import sys
import tempfile

os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
sys.path.insert(0, os.getcwd())

import uvloop
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks import router_hit_cpu as R
from serve_app import router as router_mod
from serve_app.cache import TieredCache
from serve_app.http import build_http_app
from serve_app.metrics import Counters
from serve_app.router import RouterCore


def bare() -> Starlette:
    async def predict(request):  # type: ignore[no-untyped-def]
        body = await request.json()
        return JSONResponse({"model": body.get("model"), "outputs": {"answer": "4"}, "cache": "HIT-MEMORY"})
    return Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])


async def main() -> None:
    args = R._app_args()
    R._configure_logging("batched", tempfile.mkdtemp(prefix="sa_bench_logs_"), "TEXT")
    core = RouterCore(args, {m.name: R._Answer(m.name) for m in args.models},
                      R._LocalCache(TieredCache.from_config(args.cache)), counters=Counters())
    ours, route = build_http_app(core), bare()
    log, inc, obs = router_mod.log_prediction, core.counters.inc, core.counters.observe

    def reset() -> None:
        router_mod.log_prediction = log
        core.counters.inc, core.counters.observe = inc, obs

    def no_log() -> None:
        router_mod.log_prediction = lambda **k: None

    def no_metrics() -> None:
        core.counters.inc = lambda *a, **k: None
        core.counters.observe = lambda *a, **k: None

    variants = {"whole hit": (ours, reset), "without the log line": (ours, no_log),
                "without our metric calls": (ours, no_metrics), "bare Starlette route": (route, reset)}
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(5):
        for name, (app, setup) in variants.items():
            reset()
            setup()
            res[name].append(await R._round(app, 10000))
    reset()
    for name, vals in res.items():
        print(f"{name}: median {statistics.median(vals):.1f} us CPU per hit; rounds {[round(v, 1) for v in vals]}")


uvloop.run(main())
