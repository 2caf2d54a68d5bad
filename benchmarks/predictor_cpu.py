"""CPU per LM call of the predictor core, with and without the DSPy speed-ups (no Ray).

    python -m benchmarks.predictor_cpu --out benchmarks/results/predictor_cpu     # ~2 min

One LM simulator (0 ms latency, so only CPU is measured), then every variant in its own
Python process (the speed-ups patch a process), alternated round by round so that a noisy
stretch of a shared host hits every variant alike. A variant makes ``--calls`` sequential
calls (one connection) and ``--calls`` calls 16 at a time, after a warm-up, and reports the
process's user+sys CPU per call and the wall time per call. The table gives the median over
rounds, and the host's CPU steal during the whole run.

Variants (the ``qa`` program of ``perf_bench``: one ``dspy.Predict``, one LM call):
- ``peer``: ``await program.acall(...)`` on stock DSPy: what the FastAPI peer runs;
- ``core, stock DSPy``: ``PredictorCore.predict`` (breaker, deadline, usage, outputs), no speed-up;
- ``core, callback``: as ``core, stock DSPy``, paying DSPy's callback machinery as a program with
  several predictors does (per-module token attribution);
- ``core, previous``: as the last stop shipped it: the metadata memo and the pool size, the callback;
- ``core, shipped``: ``PredictorCore.predict`` with ``dspy_speedups.install()``, as a replica runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cluster import LMSimProcess
from .procstat import machine_busy, machine_steal

VARIANTS = ("peer", "core, stock DSPy", "core, callback", "core, previous", "core, shipped")
CONCURRENCY = (1, 16)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(call: Any, calls: int) -> dict[str, dict[str, float]]:
    async def batch(n: int, conc: int, tag: str) -> None:
        sem = asyncio.Semaphore(conc)

        async def one(i: int) -> None:
            async with sem:
                await call(f"{tag} {time.time_ns()} {i}")

        await asyncio.gather(*(one(i) for i in range(n)))

    await batch(min(100, calls), 8, "warm")
    out: dict[str, dict[str, float]] = {}
    for conc in CONCURRENCY:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        await batch(calls, conc, f"c{conc}")
        out[str(conc)] = {"cpu_ms": round((_cpu_s() - cpu0) * 1000 / calls, 3),
                          "wall_ms": round((time.perf_counter() - t0) * 1000 / calls, 3)}
    return out


def _child(variant: str, api_base: str, calls: int) -> dict[str, dict[str, float]]:
    """One variant, in this (fresh) process."""
    from serve_app import dspy_speedups
    from serve_app.config import ModelConfig
    from serve_app.predictor import PredictorCore

    from .perf_bench import _model

    model = ModelConfig.model_validate(_model("qa", api_base))
    if variant == "core, shipped":
        dspy_speedups.install(model.lm.max_connections)
    elif variant == "core, previous":
        dspy_speedups.memoize_model_metadata()
        dspy_speedups.size_connection_pool(model.lm.max_connections)
    core = PredictorCore(model)
    if variant == "peer":
        module = core._program.module  # the same program and LM object, called as the peer calls it

        async def call(q: str) -> Any:
            return await module.acall(question=q)
    else:
        if variant in ("core, callback", "core, previous"):
            core._paths = {**core._paths, 0: "(a second predictor)"}  # takes the several-predictor path

        async def call(q: str) -> Any:
            return await core.predict({"question": q})

    return asyncio.run(_measure(call, calls))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/predictor_cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=400, help="calls per concurrency level per round")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--api-base", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.api_base, args.calls)))
        return 0
    if args.rounds < 1 or args.calls < 10:
        p.error("--rounds must be >= 1 and --calls >= 10")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {v: [] for v in VARIANTS}
    steal0, (_, total0) = machine_steal(), machine_busy()
    started = time.time()
    with LMSimProcess(latency_ms=0) as sim:
        for r in range(args.rounds):
            for variant in VARIANTS:
                res = subprocess.run(
                    [sys.executable, "-m", "benchmarks.predictor_cpu", "--child", variant,
                     "--api-base", sim.api_base, "--calls", str(args.calls)],
                    capture_output=True, text=True, timeout=600, check=False,
                )
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                runs[variant].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"[predictor_cpu] round {r + 1}/{args.rounds} {variant}: {runs[variant][-1]}", flush=True)
    steal = machine_steal() - steal0
    _, total1 = machine_busy()
    steal_frac = round(steal / max(1e-9, total1 - total0), 3)

    def med(variant: str, conc: int, key: str) -> float:
        return round(statistics.median(run[str(conc)][key] for run in runs[variant]), 3)

    summary = {v: {str(c): {k: med(v, c, k) for k in ("cpu_ms", "wall_ms")} for c in CONCURRENCY} for v in VARIANTS}
    (out / "predictor_cpu.json").write_text(json.dumps(
        {"command": f"python -m benchmarks.predictor_cpu --out {args.out} --rounds {args.rounds} --calls {args.calls}",
         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "machine_steal_frac": steal_frac,
         "median": summary, "runs": runs}, indent=2))
    peer = summary["peer"]
    lines = [
        "# CPU per LM call: the predictor core and the DSPy speed-ups (no Ray)",
        "",
        f"- Command: `python -m benchmarks.predictor_cpu --out {args.out} --rounds {args.rounds} --calls {args.calls}`",
        (f"- Date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))}; LM simulator at 0 ms; "
         f"median of {args.rounds} alternated rounds; host CPU steal during the run {100 * steal_frac:.1f} %"),
        "",
        "| variant | CPU ms/call, 1 at a time | vs peer | CPU ms/call, 16 at a time | vs peer | wall ms/call, 1 at a time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        s = summary[v]
        lines.append(f"| {v} | {s['1']['cpu_ms']:.2f} | {s['1']['cpu_ms'] / peer['1']['cpu_ms']:.2f}x | "
                     f"{s['16']['cpu_ms']:.2f} | {s['16']['cpu_ms'] / peer['16']['cpu_ms']:.2f}x | "
                     f"{s['1']['wall_ms']:.2f} |")
    (out / "predictor_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
