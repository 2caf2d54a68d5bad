"""HTTP load generator for ``POST /v1/predict`` (and any JSON POST endpoint).

Always run as its OWN process, never inside the driver that hosts the cluster, so the
client's event loop and the server never share an interpreter:

    python -m benchmarks.loadgen --url http://127.0.0.1:8000/v1/predict \
        --mode closed --concurrency 32 --duration-s 10 \
        --body '{"kind": "unique", "model": "qa", "field": "question"}'

prints ONE JSON object (the result) on stdout; progress and warnings go to stderr.
Drivers use :func:`run_load` (spawns this module with a :class:`LoadSpec`).

Modes
-----
``closed``  C workers, each sending its next request as soon as the previous one answers,
            for ``duration_s`` (after ``warmup_s``) or until ``max_requests`` were sent.
``open``    requests are scheduled at intended send times ``t0 + i/R``; latency is measured
            FROM THE INTENDED SEND TIME, so a slow server (or a lagging client) shows up as
            latency instead of silently lowering the offered rate (no coordinated omission).
            At most ``max_inflight`` requests are outstanding; a request due while the cap is
            reached is not sent and counts as ``dropped`` (an error).

Both modes are bounded in time (warmup + duration + request timeout + a grace period, then
everything still running is cancelled and counted as ``cancelled``) and in count
(``max_requests``, default unlimited for closed loop, R * duration for open loop).

Request bodies come from a body generator (``--body``, a JSON spec, see :func:`make_body_gen`):
``unique`` (every request a new input: cache misses), ``fixed`` (a fixed input set: hits once
warm), ``zipf`` (Zipf(s) over K inputs: a hit/miss mix).

Open loop may follow a rate ``profile`` instead of one rate: ``[[seconds, rate], ...]``
(piecewise constant; the warm-up runs at the first step's rate), e.g. a load step
``[[20, 5], [40, 50], [40, 5]]``.

Body ``shape``: ``serve_app`` (default) sends ``{"model": M, "inputs": {field: value}}``;
``peer`` sends ``{field: value}`` (a plain FastAPI ``/predict``), so one generator drives both.

Result (JSON): mode, concurrency/rate, window_s, count, ok, errors {status-or-kind: n},
error_count, throughput_rps (successful responses per second of the measured window),
latency_ms {min, mean, p50, p90, p95, p99, max} over successful responses, x_cache {value: n},
hit_ratio, client_cpu_s (user+sys of this process during the window), client_cpu_ms_per_req,
timeline (per-second ok/err/p50/p99, bucketed by completion), timeline_by_start (the same,
bucketed by (intended) send time), error_latency_ms {status: stats} (how fast errors came
back), retry_after {status: n} (error responses carrying Retry-After), all_count / all_ok
(warm-up included: for server CPU per request), measure_start_unix, open-loop extras
(offered, dropped, send_lag_ms, profile). An error status is ``"<http status>:<error.code>"``
when the body is ``{"error": {"code": ...}}`` (e.g. ``503:overloaded``), else the status.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import json
import math
import random
import resource
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LoadSpec", "run_load", "make_body_gen", "summarize", "main"]

REPO = Path(__file__).resolve().parents[1]
HIT_VALUES = ("HIT-MEMORY", "HIT-REDIS")
GRACE_S = 5.0


# ---- the spec a driver hands to the subprocess ------------------------------------------


@dataclasses.dataclass
class LoadSpec:
    """Everything one load-generator run needs. Serialised as flags for the subprocess."""

    url: str
    body: dict[str, Any]
    mode: str = "closed"  # "closed" | "open"
    concurrency: int = 1  # closed loop
    rate: float = 0.0  # open loop, requests/s
    max_inflight: int = 256  # open loop cap
    duration_s: float = 5.0
    warmup_s: float = 0.0
    max_requests: int = 0  # 0 = no count bound besides the rate (open) / time (closed)
    timeout_s: float = 30.0
    client: str = "aiohttp"  # "aiohttp" | "httpx"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    seed: int = 0
    event_loop: str = "uvloop"  # "uvloop" (when installed) | "asyncio"
    profile: list[list[float]] | None = None  # open loop: [[seconds, rate], ...] instead of one rate

    def __post_init__(self) -> None:
        if self.profile:
            self.profile = [[float(d), float(r)] for d, r in self.profile]
            self.duration_s = sum(d for d, _ in self.profile)
            if not self.rate:
                self.rate = sum(d * r for d, r in self.profile) / self.duration_s

    def argv(self) -> list[str]:
        return [
            "--url", self.url, "--body", json.dumps(self.body), "--mode", self.mode,
            "--concurrency", str(self.concurrency), "--rate", str(self.rate),
            "--max-inflight", str(self.max_inflight), "--duration-s", str(self.duration_s),
            "--warmup-s", str(self.warmup_s), "--max-requests", str(self.max_requests),
            "--timeout-s", str(self.timeout_s), "--client", self.client,
            "--headers", json.dumps(self.headers), "--seed", str(self.seed),
            "--event-loop", self.event_loop,
            *(["--profile", json.dumps(self.profile)] if self.profile else []),
        ]

    def hard_limit_s(self) -> float:
        """Wall-clock bound of one run (what the driver waits at most, plus start-up)."""
        return self.warmup_s + self.duration_s + self.timeout_s + 2 * GRACE_S


def run_load(spec: LoadSpec, *, python: str | None = None, startup_s: float = 30.0) -> dict[str, Any]:
    """Run the load generator in a separate process and return its JSON result."""
    cmd = [python or sys.executable, "-m", "benchmarks.loadgen", *spec.argv()]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=spec.hard_limit_s() + startup_s
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"loadgen printed no result:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


# ---- request bodies ----------------------------------------------------------------------


class BodyGen:
    """``next()`` returns the next request body as bytes (single event loop: no locking)."""

    def __init__(self, spec: dict[str, Any], seed: int = 0) -> None:
        self.kind = spec.get("kind", "unique")
        self.shape = spec.get("shape", "serve_app")  # "serve_app" | "peer"
        if self.shape not in ("serve_app", "peer"):
            raise ValueError(f"unknown body shape {self.shape!r}")
        self.model = spec.get("model") if self.shape == "peer" else spec["model"]
        self.field = spec.get("field", "question")
        self.base_inputs: dict[str, Any] = dict(spec.get("base_inputs", {}))
        self.extra: dict[str, Any] = dict(spec.get("extra", {}))
        # Unique inputs must never collide with earlier runs/phases: a fresh nonce per run.
        self.template: str = spec.get("template", "benchmark question {nonce} #{i}: what is item {i}?")
        self.nonce = spec.get("nonce") or uuid.uuid4().hex[:12]
        self.rng = random.Random(seed)
        self.i = 0
        if self.kind == "fixed":
            values = spec.get("values")
            if values is None:
                values = [self.template.format(nonce=spec.get("nonce", "fixed"), i=k) for k in range(int(spec["k"]))]
            self._fixed = [self._encode(v) for v in values]
            if not self._fixed:
                raise ValueError("fixed body set is empty")
            self.order = spec.get("order", "round_robin")  # or "random"
        elif self.kind == "zipf":
            k, s = int(spec["k"]), float(spec.get("s", 1.1))
            weights = [1.0 / (r ** s) for r in range(1, k + 1)]
            total = sum(weights)
            acc, self._cdf = 0.0, []
            for w in weights:
                acc += w / total
                self._cdf.append(acc)
            self._znonce = spec.get("nonce", "zipf")
            self._k = k
            self._zipf: dict[int, bytes] = {}  # encoded lazily: K may be 10^6
        elif self.kind != "unique":
            raise ValueError(f"unknown body kind {self.kind!r}")

    def _encode(self, value: Any) -> bytes:
        inputs = {**self.base_inputs, self.field: value}
        if self.shape == "peer":
            return json.dumps({**inputs, **self.extra}).encode()
        return json.dumps({"model": self.model, "inputs": inputs, **self.extra}).encode()

    def next(self) -> bytes:
        i = self.i
        self.i += 1
        if self.kind == "unique":
            return self._encode(self.template.format(nonce=self.nonce, i=i))
        if self.kind == "fixed":
            if self.order == "random":
                return self.rng.choice(self._fixed)
            return self._fixed[i % len(self._fixed)]
        # zipf: inverse CDF by bisection
        idx = min(bisect.bisect_left(self._cdf, self.rng.random()), self._k - 1)
        body = self._zipf.get(idx)
        if body is None:
            body = self._zipf[idx] = self._encode(self.template.format(nonce=self._znonce, i=idx))
        return body


def make_body_gen(spec: dict[str, Any], seed: int = 0) -> BodyGen:
    """Body generator from a JSON spec.

    ``{"kind": "unique", "model": "qa", "field": "question", "template": "... {nonce} {i}"}``
    ``{"kind": "fixed", "model": "qa", "field": "question", "values": [...]}`` (or ``"k": 16``
    with the template), ``"order": "round_robin" | "random"``
    ``{"kind": "zipf", "model": "qa", "field": "question", "k": 1000, "s": 1.1}``
    Common: ``shape`` (``serve_app`` or ``peer``: ``{field: value}`` without a model), ``base_inputs`` (other input fields), ``extra`` (other body fields, e.g.
    ``{"cache": false}``), ``nonce`` (fixes the generated texts across runs).
    """
    return BodyGen(spec, seed)


# ---- HTTP clients ------------------------------------------------------------------------

SendFn = Callable[[bytes], Awaitable[tuple[Any, str | None, bool]]]


def _error_status(status: int, body: bytes) -> str:
    """``"503:overloaded"`` for a ``{"error": {"code": ...}}`` body, else ``"503"``."""
    if len(body) < 4096:
        try:
            err = json.loads(body).get("error")
            if isinstance(err, dict) and isinstance(err.get("code"), str):
                return f"{status}:{err['code']}"
        except (ValueError, AttributeError):
            pass
    return str(status)


class _AiohttpClient:
    def __init__(self, url: str, conns: int, timeout_s: float, headers: dict[str, str]) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.url = url
        self.headers = {"content-type": "application/json", **headers}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=conns, limit_per_host=conns, force_close=False,
                                           enable_cleanup_closed=False, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            skip_auto_headers=("User-Agent",),
        )

    async def send(self, body: bytes) -> tuple[Any, str | None, bool]:
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as r:
                data = await r.read()
                if 200 <= r.status < 300:
                    return r.status, r.headers.get("X-Cache"), False
                return _error_status(r.status, data), None, "Retry-After" in r.headers
        except asyncio.TimeoutError:
            return "timeout", None, False
        except self._aiohttp.ClientConnectionError:
            return "conn_error", None, False
        except self._aiohttp.ClientError as exc:
            return f"client_error:{type(exc).__name__}", None, False

    async def close(self) -> None:
        await self.session.close()


class _HttpxClient:
    def __init__(self, url: str, conns: int, timeout_s: float, headers: dict[str, str]) -> None:
        import httpx

        self._httpx = httpx
        self.url = url
        self.headers = {"content-type": "application/json", **headers}
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
            timeout=httpx.Timeout(timeout_s, pool=timeout_s),
        )

    async def send(self, body: bytes) -> tuple[Any, str | None, bool]:
        try:
            r = await self.client.post(self.url, content=body, headers=self.headers)
            if 200 <= r.status_code < 300:
                return r.status_code, r.headers.get("X-Cache"), False
            return _error_status(r.status_code, r.content), None, "retry-after" in r.headers
        except self._httpx.TimeoutException:
            return "timeout", None, False
        except self._httpx.TransportError:
            return "conn_error", None, False

    async def close(self) -> None:
        await self.client.aclose()


def _client(kind: str, url: str, conns: int, timeout_s: float, headers: dict[str, str]) -> Any:
    if kind == "aiohttp":
        return _AiohttpClient(url, conns, timeout_s, headers)
    if kind == "httpx":
        return _HttpxClient(url, conns, timeout_s, headers)
    raise ValueError(f"unknown client {kind!r}")


# ---- measurement ---------------------------------------------------------------------------


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Recorder:
    """Per-request records of the measured window: (start, end, status, x-cache).

    ``start`` is the intended send time in open loop and the actual send time in closed loop.
    Records whose start is before ``measure_start`` (warm-up) are not kept.
    """

    def __init__(self, measure_start: float) -> None:
        self.measure_start = measure_start
        self.records: list[tuple[float, float, Any, str | None, bool]] = []
        self.cpu_start: float | None = None
        self.warm_count = 0  # warm-up requests answered (not recorded)
        self.warm_ok = 0

    def add(self, start: float, end: float, status: Any, xcache: str | None, retry_after: bool = False) -> None:
        if start >= self.measure_start:
            self.records.append((start, end, status, xcache, retry_after))
        else:
            self.warm_count += 1
            self.warm_ok += isinstance(status, int) and 200 <= status < 300


def _pct(sorted_vals: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of sorted values."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def _latency_stats(lat_ms: list[float]) -> dict[str, float | None]:
    if not lat_ms:
        return {k: None for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")}
    s = sorted(lat_ms)
    return {
        "min": round(s[0], 3), "mean": round(sum(s) / len(s), 3),
        "p50": round(_pct(s, 50), 3), "p90": round(_pct(s, 90), 3), "p95": round(_pct(s, 95), 3),
        "p99": round(_pct(s, 99), 3), "max": round(s[-1], 3),
    }


def summarize(rec: Recorder, window_end: float, cpu_s: float) -> dict[str, Any]:
    """Aggregate the records of one measured window."""
    window_s = max(1e-9, window_end - rec.measure_start)
    ok_lat: list[float] = []
    errors: Counter[str] = Counter()
    err_lat: dict[str, list[float]] = {}
    retry_after: Counter[str] = Counter()
    xcache: Counter[str] = Counter()
    buckets: dict[int, list[Any]] = {}
    by_start: dict[int, list[Any]] = {}
    for start, end, status, xc, ra in rec.records:
        ok = isinstance(status, int) and 200 <= status < 300
        lat = (end - start) * 1000.0
        b = buckets.setdefault(int(max(0.0, end - rec.measure_start)), [0, 0, []])
        bs = by_start.setdefault(int(max(0.0, start - rec.measure_start)), [0, 0, []])
        if ok:
            ok_lat.append(lat)
            xcache[xc or "none"] += 1
            b[0] += 1
            b[2].append(lat)
            bs[0] += 1
            bs[2].append(lat)
        else:
            errors[str(status)] += 1
            err_lat.setdefault(str(status), []).append(lat)
            retry_after[str(status)] += bool(ra)
            b[1] += 1
            bs[1] += 1
    hits = sum(xcache[v] for v in HIT_VALUES)
    looked_up = hits + xcache["MISS"]
    def _timeline(b: dict[int, list[Any]]) -> list[dict[str, Any]]:
        out = []
        for sec in sorted(b):
            n_ok, n_err, lats = b[sec]
            lats.sort()
            out.append({"t": sec, "ok": n_ok, "err": n_err,
                        "p50": round(_pct(lats, 50), 2) if lats else None,
                        "p99": round(_pct(lats, 99), 2) if lats else None})
        return out

    count = len(rec.records)
    return {
        "window_s": round(window_s, 3),
        "count": count,
        "ok": len(ok_lat),
        "error_count": sum(errors.values()),
        "errors": dict(errors),
        "throughput_rps": round(len(ok_lat) / window_s, 2),
        "latency_ms": _latency_stats(ok_lat),
        "x_cache": dict(xcache),
        "hit_ratio": round(hits / looked_up, 4) if looked_up else None,
        "client_cpu_s": round(cpu_s, 3),
        "client_cpu_ms_per_req": round(cpu_s * 1000.0 / count, 4) if count else None,
        "error_latency_ms": {k: _latency_stats(v) for k, v in sorted(err_lat.items())},
        "retry_after": {k: v for k, v in sorted(retry_after.items()) if v},
        "all_count": count + rec.warm_count,
        "all_ok": len(ok_lat) + rec.warm_ok,
        "timeline": _timeline(buckets),
        "timeline_by_start": _timeline(by_start),
    }


async def _bounded(coro: Awaitable[Any], limit_s: float) -> bool:
    """Await ``coro`` for at most ``limit_s``; False if it had to be cancelled."""
    try:
        await asyncio.wait_for(coro, timeout=max(0.0, limit_s))
        return True
    except asyncio.TimeoutError:
        return False


async def closed_loop(spec: LoadSpec, gen: BodyGen, client: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    now = time.perf_counter  # not loop.time(): uvloop's clock has 1 ms resolution
    t0 = now()
    rec = Recorder(t0 + spec.warmup_s)
    end = rec.measure_start + spec.duration_s
    sent_measured = 0
    inflight: dict[int, float] = {}
    cpu_mark: list[float] = []
    loop.call_later(spec.warmup_s, lambda: cpu_mark.append(_cpu_s()))

    async def worker(w: int) -> None:
        nonlocal sent_measured
        while True:
            t = now()
            if t >= end or (spec.max_requests and sent_measured >= spec.max_requests):
                return
            if t >= rec.measure_start:
                sent_measured += 1
            body = gen.next()
            inflight[w] = t
            try:
                status, xc, ra = await client.send(body)
            except Exception as exc:  # noqa: BLE001 - an unexpected client failure is an error
                status, xc, ra = f"error:{type(exc).__name__}", None, False
            del inflight[w]
            rec.add(t, now(), status, xc, ra)

    tasks = [asyncio.ensure_future(worker(w)) for w in range(spec.concurrency)]
    finished = await _bounded(asyncio.gather(*tasks), spec.warmup_s + spec.duration_s + spec.timeout_s + GRACE_S)
    t_end = now()
    cpu_end = _cpu_s()
    if not finished:  # every unfinished request counts as an error
        for start in list(inflight.values()):
            rec.add(start, t_end, "cancelled", None)
    if not cpu_mark:
        cpu_mark.append(cpu_end)
    last = max((r[1] for r in rec.records), default=t_end)
    out = summarize(rec, max(min(last, t_end), rec.measure_start + 1e-3), cpu_end - cpu_mark[0])
    out.update({"mode": "closed", "concurrency": spec.concurrency,
                "measure_start_unix": round(time.time() - (now() - rec.measure_start), 3)})
    return out


async def open_loop(spec: LoadSpec, gen: BodyGen, client: Any) -> dict[str, Any]:
    if spec.rate <= 0:
        raise ValueError("open loop needs --rate > 0")
    loop = asyncio.get_running_loop()
    now = time.perf_counter  # not loop.time(): uvloop's clock has 1 ms resolution
    t0 = now() + 0.05
    rec = Recorder(t0 + spec.warmup_s)
    # Intended send offsets from t0: the warm-up at the first rate, then one rate or the profile.
    steps = [[float(d), float(r)] for d, r in (spec.profile or [[spec.duration_s, spec.rate]])]
    offsets: list[float] = []
    warm_rate = steps[0][1]
    n_warm = int(spec.warmup_s * warm_rate) if warm_rate > 0 else 0
    offsets += [i / warm_rate for i in range(n_warm)]
    base = spec.warmup_s
    for dur, rate in steps:
        offsets += [base + j / rate for j in range(int(dur * rate))] if rate > 0 else []
        base += dur
    n_measured = len(offsets) - n_warm
    if spec.max_requests:
        n_measured = min(n_measured, spec.max_requests)
    total = n_warm + n_measured
    del offsets[total:]
    inflight: dict[int, float] = {}
    tasks: set[asyncio.Task[Any]] = set()
    max_lag = 0.0
    lags: list[float] = []
    cpu_mark: list[float] = []
    loop.call_later(0.05 + spec.warmup_s, lambda: cpu_mark.append(_cpu_s()))

    async def one(i: int, intended: float, body: bytes) -> None:
        try:
            status, xc, ra = await client.send(body)
        except Exception as exc:  # noqa: BLE001
            status, xc, ra = f"error:{type(exc).__name__}", None, False
        inflight.pop(i, None)
        rec.add(intended, now(), status, xc, ra)

    i = 0
    while i < total:
        t = now()
        intended = t0 + offsets[i]
        if intended > t:
            await asyncio.sleep(intended - t)
            continue
        # Send everything that is due now (catch up after a late wake-up), then yield.
        while i < total and t0 + offsets[i] <= t:
            intended = t0 + offsets[i]
            lag = t - intended
            if intended >= rec.measure_start:
                lags.append(lag)
                max_lag = max(max_lag, lag)
            if len(inflight) >= spec.max_inflight:
                rec.add(intended, t, "dropped", None)
            else:
                inflight[i] = intended
                task = asyncio.ensure_future(one(i, intended, gen.next()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(0)
    sched_end = now()
    if tasks:
        await _bounded(asyncio.gather(*list(tasks), return_exceptions=True), spec.timeout_s + GRACE_S)
    t_end = now()
    cpu_end = _cpu_s()
    for k, intended in list(inflight.items()):
        rec.add(intended, t_end, "cancelled", None)
        inflight.pop(k, None)
    for task in list(tasks):
        task.cancel()
    if not cpu_mark:
        cpu_mark.append(cpu_end)
    # The measured window is the schedule's span (the offered load), not the drain tail.
    window_s = spec.duration_s if spec.profile else n_measured / spec.rate
    window_end = rec.measure_start + max(window_s, 1e-3)
    out = summarize(rec, window_end, cpu_end - cpu_mark[0])
    lags.sort()
    out.update({
        "mode": "open", "rate": spec.rate, "max_inflight": spec.max_inflight,
        "offered": n_measured, "dropped": out["errors"].get("dropped", 0),
        "send_lag_ms": {"p50": round(_pct(lags, 50) * 1000, 3) if lags else None,
                        "p99": round(_pct(lags, 99) * 1000, 3) if lags else None,
                        "max": round(max_lag * 1000, 3)},
        "schedule_overrun_s": round(max(0.0, sched_end - (rec.measure_start + spec.duration_s)), 3),
        "profile": spec.profile,
        "measure_start_unix": round(time.time() - (now() - rec.measure_start), 3),
    })
    return out


async def run(spec: LoadSpec) -> dict[str, Any]:
    gen = make_body_gen(spec.body, spec.seed)
    conns = spec.concurrency if spec.mode == "closed" else spec.max_inflight
    client = _client(spec.client, spec.url, max(1, conns), spec.timeout_s, spec.headers)
    try:
        if spec.mode == "closed":
            out = await closed_loop(spec, gen, client)
        elif spec.mode == "open":
            out = await open_loop(spec, gen, client)
        else:
            raise ValueError(f"unknown mode {spec.mode!r}")
    finally:
        await client.close()
    out.update({"client": spec.client, "url": spec.url, "body_kind": gen.kind,
                "duration_s": spec.duration_s, "warmup_s": spec.warmup_s, "max_requests": spec.max_requests})
    return out


# ---- CLI -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> LoadSpec:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="full URL, e.g. http://127.0.0.1:8000/v1/predict")
    p.add_argument("--body", required=True, help="body generator spec (JSON), see make_body_gen")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: concurrent workers")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals per second")
    p.add_argument("--max-inflight", type=int, default=256, help="open loop: outstanding cap (over it: dropped)")
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=0.0, help="sent but not recorded")
    p.add_argument("--max-requests", type=int, default=0, help="bound on measured requests (0 = none)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp")
    p.add_argument("--headers", default="{}", help="extra request headers (JSON object)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="uvloop when installed (falls back to asyncio)")
    p.add_argument("--profile", default=None,
                   help='open loop: rate steps as JSON [[seconds, rate], ...] (overrides --rate/--duration-s)')
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    a = p.parse_args(argv)
    spec = LoadSpec(
        url=a.url, body=json.loads(a.body), mode=a.mode, concurrency=a.concurrency, rate=a.rate,
        max_inflight=a.max_inflight, duration_s=a.duration_s, warmup_s=a.warmup_s,
        max_requests=a.max_requests, timeout_s=a.timeout_s, client=a.client,
        headers=json.loads(a.headers), seed=a.seed, event_loop=a.event_loop,
        profile=json.loads(a.profile) if a.profile else None,
    )
    spec._out = a.out  # type: ignore[attr-defined]
    return spec


def main(argv: Sequence[str] | None = None) -> int:
    spec = parse_args(argv)
    started = time.time()
    try:
        import uvloop  # optional: a cheaper event loop leaves more CPU to the server
    except ImportError:
        uvloop = None
    if uvloop is not None and spec.event_loop == "uvloop":
        out = uvloop.run(run(spec))
        loop_kind = "uvloop"
    else:
        out = asyncio.run(run(spec))
        loop_kind = "asyncio"
    out["event_loop"] = loop_kind
    out["started_unix"] = round(started, 3)
    text = json.dumps(out)
    dest = getattr(spec, "_out", None)
    if dest:
        Path(dest).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
