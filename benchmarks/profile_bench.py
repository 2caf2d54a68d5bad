"""Where a cache miss spends its CPU: py-spy on every Serve process under a steady miss load.

    python -m benchmarks.profile_bench --out benchmarks/results          # ~1.5 min
    python -m benchmarks.profile_bench --concurrency 16 --seconds 20 --kind unique|fixed

Starts its own local Ray + Serve with the benchmark app (Router -> Cache -> qa, as in
``perf_bench``), the LM simulator at 50 ms, then runs the load generator (closed loop, unique
inputs: every request an LM call; ``--kind fixed`` for near-cache hits) while ``py-spy record
--format raw --idle`` samples the proxy, Router, Cache and qa replicas. Writes
``profile.md`` (CPU per request of each process from /proc, and the top functions by
on-CPU samples of each) and the raw collapsed stacks (``profile_<process>.txt``; open them
with speedscope or flamegraph.pl). Needs ``py-spy`` (``pip install -e '.[bench]'``) and
permission to ptrace the replicas (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .cluster import LMSimProcess, RayServe, serve_config
from .perf_bench import main_app
from .procstat import proc_cpu_s

ROLES = {"ProxyActor": "proxy", ":Router": "Router", ":Cache": "Cache", ":qa": "qa"}


def _replica_pids() -> dict[str, int]:
    """Serve's proxy and the benchmark app's replicas, by role, from the process table."""
    out: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for marker, role in ROLES.items():
            if cmd.startswith("ray::") and marker in cmd.split(" ", 1)[0]:
                out.setdefault(role, int(entry.name))
    return out


def _samples(raw: Path) -> Iterator[tuple[list[str], int]]:
    """``(frames, count)`` per line of a py-spy raw (collapsed) file."""
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            yield stack.split(";"), int(count)


def _top(raw: Path, n: int) -> list[tuple[str, float]]:
    """Top ``n`` functions by samples where they are the leaf (self time)."""
    own: Counter[str] = Counter()
    total = 0
    for frames, count in _samples(raw):
        total += count
        own[frames[-1]] += count
    return [(name, 100.0 * c / total) for name, c in own.most_common(n)] if total else []


# Inclusive shares: a sample counts for a layer when any frame of its stack is in it.
LAYERS = (("serve_app (ours)", "serve_app/"), ("dspy", "dspy/"), ("LM client (httpx/openai/litellm)", "httpx/"),
          ("Serve", "ray/serve/"), ("Ray core", "ray/_private/"))


def _layers(raw: Path) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    total = 0
    for frames, count in _samples(raw):
        total += count
        stack = ";".join(frames)
        for name, marker in LAYERS:
            if marker in stack:
                counts[name] += count
    return [(name, 100.0 * counts[name] / total) for name, _ in LAYERS] if total else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--kind", choices=("unique", "fixed"), default="unique")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--serve-mode", choices=("fast", "proxy"), default="fast",
                   help="Serve's serving mode (serve_app/serve_mode.py); fast has no Python proxy to sample")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with LMSimProcess(latency_ms=50) as sim, RayServe(request_timeout_s=40, mode=args.serve_mode) as rs:
        rs.deploy(serve_config(main_app(sim.api_base)), name="profile")
        rs.wait_ready("/")
        pids = _replica_pids()
        print(f"[profile] processes: {pids}", flush=True)
        spec: dict[str, Any] = {"kind": args.kind, "model": "qa", "field": "question",
                                "template": "profile {nonce} {i}", "k": 16}
        load = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", "--url", f"{rs.base_url}/v1/predict",
             "--body", json.dumps(spec), "--mode", "closed", "--concurrency", str(args.concurrency),
             "--duration-s", str(args.seconds + 4), "--warmup-s", "2"],
            stdout=subprocess.PIPE, text=True,
        )
        time.sleep(3)  # past the warm-up
        before = {role: proc_cpu_s(pid) or 0.0 for role, pid in pids.items()}
        spies = {
            role: subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate", "200",
                 "--format", "raw", "--nonblocking", "--output", str(out / f"profile_{role}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for role, pid in pids.items()
        }
        for spy in spies.values():
            spy.wait(timeout=args.seconds + 60)
        after = {role: proc_cpu_s(pid) or 0.0 for role, pid in pids.items()}
        result = json.loads(load.communicate(timeout=120)[0].strip().splitlines()[-1])
    done = max(1, int(result.get("ok", 0) or result.get("completed", 0) or 0))
    rps = result.get("throughput_rps") or done / max(1.0, args.seconds)
    window_requests = rps * args.seconds
    lines = [
        "# Where a request spends its CPU (py-spy, one process per Serve role)",
        "",
        f"- Command: `python -m benchmarks.profile_bench --kind {args.kind} --concurrency {args.concurrency} "
        f"--seconds {args.seconds:g}`",
        f"- Date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; {os.cpu_count()} CPUs; LM simulator 50 ms",
        f"- Load: closed loop, c={args.concurrency}, {args.kind} inputs: {rps:.1f} req/s, "
        f"p50 {(result.get('latency_ms') or {}).get('p50')} ms, p99 {(result.get('latency_ms') or {}).get('p99')} ms, "
        f"errors {result.get('errors')}",
        "",
        "| process | CPU ms per request | share of the four |",
        "|---|---:|---:|",
    ]
    per_req = {role: (after[role] - before[role]) * 1000 / max(1.0, window_requests) for role in pids}
    total = sum(per_req.values()) or 1.0
    for role, ms in sorted(per_req.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {role} | {ms:.2f} | {100 * ms / total:.0f} % |")
    lines += ["", "CPU per request: user+sys of the process from /proc over the sampling window, divided by the "
              "requests completed in it (py-spy's own overhead included).", ""]
    for role in pids:
        raw = out / f"profile_{role}.txt"
        if not raw.exists():
            continue
        lines += [f"## {role}", "", "| layer (inclusive: any frame in it) | % of samples |", "|---|---:|"]
        lines += [f"| {name} | {share:.1f} |" for name, share in _layers(raw)]
        lines += ["", "| top functions (self) | % of samples |", "|---|---:|"]
        lines += [f"| `{name}` | {share:.1f} |" for name, share in _top(raw, args.top)]
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
