"""How many cache hits per second Serve's ingress can answer on this machine, with and without our Router, beside the peer's misses.

    python -m benchmarks.ingress_floor --out benchmarks/results/ingress_floor     # ~4 min

Why: the hit-path target is a throughput ("10x the peer's miss throughput"), and a hit never
leaves the Router replica (the router's near cache answers it). So the ceiling is what one
Serve ingress replica can answer at all on this machine, with the load generator on the same
two cores. This measures that ceiling and our Router beside it, in ONE cluster, alternated
round by round (a slow minute of the shared host hits every app):

- ``plain``: a Serve deployment whose ``__call__`` reads the body and returns a small dict
  (Serve's own request handling and JSON response, no ASGI framework);
- ``starlette``: a ``@serve.ingress`` Starlette app with one POST route that parses the JSON
  body and answers a ``JSONResponse`` (what any framework-based ingress costs);
- ``ours``: our app (Router, Cache, ``qa``) as perf_bench deploys it, 16 pre-warmed inputs, so
  every measured request is a near-cache hit in the Router;
- ``peer-1w``: the peer (``benchmarks/peer_app.py``, one uvicorn worker) answering unique
  misses: the reference of the hit-path target ("hits at least 10x the peer's miss
  throughput"), measured by the same load generator in the same run (with the Ray cluster
  idle beside it: ~0.15 cores).

Each is loaded closed-loop at ``--concurrency`` connections by our Python load generator
(``benchmarks/loadgen.py``, aiohttp on uvloop: what perf_bench uses) and, when ``wrk`` is on
the PATH (``make wrk``: Debian's package), by ``wrk`` too: a C load generator that leaves the server
more of the two cores (the issue's own peer figures were taken with wrk). Per phase:
requests/s, the ingress replica's (the peer's: uvicorn's) CPU per request from ``/proc``, the
machine's busy share and CPU steal; the table gives each app's req/s as a multiple of the
peer's misses by the same load generator. Writes ``ingress_floor.json`` / ``.md``
(medians over ``--rounds``). Starts and stops its own Ray cluster and LM simulator.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
from ray import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .ab_bench import _app, _replica_cpu
from .cluster import LMSimProcess, PeerServer, RayServe, serve_config
from .loadgen import LoadSpec, run_load
from .phases import PREDICT_PATH
from .procstat import StealWindow, machine_busy, proc_cpu_s
from .report import Progress, header_markdown, run_header, write_results

APPS = ("plain", "starlette", "ours", "peer-1w")  # the peer's figure: its misses, the reference
INGRESS = {"plain": "Plain", "starlette": "Bare", "ours": "Router"}  # each app's ingress deployment
ANSWER = {"model": "qa", "outputs": {"answer": "Paris"}, "cache": "HIT-MEMORY"}


@serve.deployment(name="Plain", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
class Plain:
    async def __call__(self, request: Request) -> dict[str, Any]:
        await request.body()
        return ANSWER


def _starlette_app() -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({**ANSWER, "model": body.get("model", "qa")})

    return Starlette(routes=[Route(PREDICT_PATH, predict, methods=["POST"])])


@serve.deployment(name="Bare", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress()
class Bare:
    def __serve_build_asgi_app__(self) -> Starlette:
        return _starlette_app()


TEMPLATE = "floor question {i}: what is the capital of country {i}?"


def _body(i: int) -> dict[str, Any]:
    """The i-th of the 16 hit inputs, as the loadgen's ``fixed`` bodies and the wrk script send it."""
    return {"model": "qa", "inputs": {"question": TEMPLATE.format(i=i)}}


WRK_LUA = """
local bodies = {}
%s
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[(n %% #bodies) + 1])
end
"""


PEER_WRK_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    '{"question": "peer floor %s #' .. n .. ': what is item ' .. n .. '?"}')
end
"""


def peer_wrk_script(nonce: str) -> str:
    """A wrk Lua script POSTing a new question each request (the peer's body shape)."""
    if not nonce.isalnum():
        raise ValueError("nonce must be alphanumeric")
    return PEER_WRK_LUA % nonce


def wrk_script(bodies: list[dict[str, Any]]) -> str:
    """A wrk Lua script POSTing ``bodies`` round robin (Lua long strings: no escaping to get wrong)."""
    lines = [f"bodies[{i + 1}] = [==[{json.dumps(b)}]==]" for i, b in enumerate(bodies)]
    return WRK_LUA % "\n".join(lines)


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, answered and failed requests from wrk's report (non-2xx and socket errors)."""
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise ValueError(f"not a wrk report: {text[-500:]!r}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": float(rps.group(1)), "ok": int(total.group(1)) - errors, "errors": errors}


def wrk_phase(url: str, concurrency: int, duration_s: float, script: Path) -> dict[str, Any]:
    """``wrk`` (1 thread, ``concurrency`` connections) for ``duration_s``."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration_s)}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr[-2000:]}")
    return parse_wrk(out.stdout)


def loadgen_phase(url: str, concurrency: int, duration_s: float, peer: bool = False) -> dict[str, Any]:
    body = ({"kind": "unique", "shape": "peer", "field": "question"} if peer
            else {"kind": "fixed", "k": 16, "model": "qa", "field": "question", "template": TEMPLATE})
    spec = LoadSpec(url=url, body=body, mode="closed", concurrency=concurrency, duration_s=duration_s,
                    warmup_s=0, timeout_s=20)
    res = run_load(spec)
    return {"rps": res["throughput_rps"], "ok": res["ok"], "errors": res["error_count"],
            "p50_ms": res["latency_ms"]["p50"], "loadgen_cpu_ms": res.get("client_cpu_ms_per_req")}


def _peer_cpu_s(pids: list[int]) -> float:
    return sum(proc_cpu_s(pid) or 0.0 for pid in pids)


def measure(ray: RayServe, peer: PeerServer, app: str, driver: str, concurrency: int, duration_s: float,
            script: Path) -> dict[str, Any]:
    """One closed-loop phase against ``app``: hits for ours and the bare ingresses, unique
    misses for the peer (a fresh wrk script per phase: a new nonce, no repeated question)."""
    is_peer = app == "peer-1w"
    url = f"{peer.base_url}/predict" if is_peer else f"{ray.base_url}/{app}{PREDICT_PATH}"
    if is_peer and driver == "wrk":
        script = script.with_name("peer.lua")
        script.write_text(peer_wrk_script(uuid.uuid4().hex[:12]))
    key = None if is_peer else f"{app}:{INGRESS[app]}"

    def cpu() -> float:
        return _peer_cpu_s(peer.pids()) if key is None else _replica_cpu(ray.server_pids).get(key, 0.0)

    cpu0, (busy0, tot0), steal = cpu(), machine_busy(), StealWindow()
    res = (wrk_phase(url, concurrency, duration_s, script) if driver == "wrk"
           else loadgen_phase(url, concurrency, duration_s, peer=is_peer))
    cpu1, (busy1, tot1) = cpu(), machine_busy()
    done = max(1, res["ok"] + res["errors"])
    return {"app": app, "driver": driver, **res,
            "ingress_cpu_ms_per_req": round((cpu1 - cpu0) * 1000 / done, 3),
            "machine_busy": round((busy1 - busy0) / (tot1 - tot0), 3) if tot1 > tot0 else None,
            "steal": steal.fraction()}


def summarize(rows: list[dict[str, Any]], drivers: list[str]) -> str:
    """Medians per load generator and app. An app's multiple of the peer is the median over
    rounds of its req/s divided by the peer's misses in the SAME round by the same load
    generator: phases next to each other share the host's mood, which moves a lot here."""
    lines = [("| load generator | app | req/s (median) | ÷ peer-1w misses (median of rounds) | server CPU ms/req | "
              "machine busy | errors | max steal |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for d in drivers:
        mine = {app: [r for r in rows if r["driver"] == d and r["app"] == app] for app in APPS}
        peer_by_round = {r.get("round"): r["rps"] for r in mine["peer-1w"] if r["rps"]}
        for app, got in mine.items():
            if not got:
                continue
            ratios = [r["rps"] / peer_by_round[r.get("round")] for r in got if r.get("round") in peer_by_round]
            ratio = f"{statistics.median(ratios):.1f}x" if ratios else "-"
            lines.append(f"| {d} | {app} | {statistics.median(r['rps'] for r in got):,.1f} | {ratio} | "
                         f"{statistics.median(r['ingress_cpu_ms_per_req'] for r in got):.3f} | "
                         f"{statistics.median(r['machine_busy'] or 0 for r in got):.0%} | "
                         f"{sum(r['errors'] for r in got)} | {max(r['steal'] for r in got):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for ingress_floor.json and ingress_floor.md")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--drivers", default="loadgen,wrk", help="comma list of loadgen, wrk (wrk skipped when not installed)")
    a = p.parse_args(argv)
    drivers = [d for d in a.drivers.split(",") if d]
    if not drivers or set(drivers) - {"loadgen", "wrk"} or a.rounds < 1 or a.concurrency < 1 or a.duration_s < 1:
        p.error("--drivers: loadgen and/or wrk; --rounds, --concurrency >= 1; --duration-s >= 1")
    if "wrk" in drivers and shutil.which("wrk") is None:
        print("wrk is not installed (make wrk): measuring with the loadgen only", file=sys.stderr)
        drivers.remove("wrk")
    if not drivers:
        p.error("no load generator left to run")
    header = run_header(argv, module="benchmarks.ingress_floor")
    say = Progress("ingress_floor")

    rows: list[dict[str, Any]] = []
    with (tempfile.TemporaryDirectory(prefix="sa_floor_") as tmp, LMSimProcess(50.0) as sim,
          PeerServer(1, sim.api_base) as peer, RayServe() as ray):
        script = Path(tmp) / "hits.lua"
        script.write_text(wrk_script([_body(i) for i in range(16)]))
        say("deploying ours, plain, starlette")
        ray.deploy(serve_config(_app("ours", {}, sim.api_base)))
        serve.run(Plain.bind(), name="plain", route_prefix="/plain")  # type: ignore[attr-defined]
        serve.run(Bare.bind(), name="starlette", route_prefix="/starlette")  # type: ignore[attr-defined]
        ray.wait_ready("/ours")
        with httpx.Client(timeout=30) as client:  # warm our caches: every measured request is a hit
            for i in range(16):
                client.post(f"{ray.base_url}/ours{PREDICT_PATH}", json=_body(i)).raise_for_status()
        for r in range(a.rounds):
            for driver in drivers:
                for app in APPS:
                    row = measure(ray, peer, app, driver, a.concurrency, a.duration_s, script)
                    row["round"] = r
                    rows.append(row)
                    say(f"round {r} {driver} {app}: {row['rps']:,.1f} req/s, server CPU "
                        f"{row['ingress_cpu_ms_per_req']} ms/req, busy {row['machine_busy']}, "
                        f"steal {row['steal']}, errors {row['errors']}")
    table = summarize(rows, drivers)
    md = "\n".join([header_markdown("Hits per second at Serve's ingress: the floor and ours", header), "",
                    (f"- Closed loop c={a.concurrency}, {a.rounds} rounds of {a.duration_s:g} s per app and load "
                     "generator, alternated; hits: 16 inputs (ours: pre-warmed, answered by the router's near cache); "
                     "peer-1w: unique misses, LM simulator 50 ms"),
                    "", table, ""])
    jpath, _ = write_results(Path(a.out), "ingress_floor", {"header": header, "rows": rows}, md)
    print(table)
    say(f"wrote {jpath} and its .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
