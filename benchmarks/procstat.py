"""Server-side CPU accounting from ``/proc`` (Linux): user+sys seconds of process trees.

A :class:`CpuMeter` is built from root PIDs (processes this benchmark started: the Ray
driver's children, a uvicorn master) and the PIDs to leave out (the LM simulator, the load
generator). ``sample()`` walks ``/proc`` for every live descendant of the roots and reads its
``utime + stime`` (``/proc/<pid>/stat`` fields 14 and 15); ``delta(before, after)`` is the CPU
each process (and each *group* of processes, see :func:`classify`) spent between two
samples. A process that starts in between counts from zero; one that exits in between loses
its last interval (rare here: phases do not restart servers).

``machine_busy()`` reads ``/proc/stat``: how busy the whole machine was (all processes,
including the load generator, the simulator and anyone else's).

Reads only; starts and stops nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CpuMeter", "StealWindow", "classify", "cmdline", "descendants", "machine_busy", "machine_steal", "proc_cpu_s"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rparen = raw.rfind(")")
    return [raw[: raw.find("(")].strip(), raw[raw.find("(") + 1 : rparen]] + raw[rparen + 2 :].split()


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (None if it is gone)."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[13]) + int(f[14])) / _TICK


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is not None:
            out[int(entry.name)] = int(f[3])
    return out


def descendants(roots: Iterable[int], exclude: Iterable[int] = ()) -> set[int]:
    """Every live process under ``roots`` (the roots included), minus ``exclude`` and their
    subtrees."""
    ppid = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, parent in ppid.items():
        children.setdefault(parent, []).append(pid)
    skip = set(exclude)
    out: set[int] = set()
    stack = [r for r in roots if r in ppid and r not in skip]
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.add(pid)
        stack.extend(c for c in children.get(pid, ()) if c not in skip)
    return out


def classify(cmd: str) -> str:
    """A short group name for a server process from its command line."""
    if cmd.startswith("ray::"):
        title = cmd.split()[0][5:]
        if title.startswith("ServeReplica:"):
            # ray::ServeReplica:<app>:<deployment>
            parts = title.split(":")
            return f"replica:{parts[-1]}" if len(parts) >= 3 else "replica"
        if title.startswith("ProxyActor"):
            return "serve proxy"
        if title.startswith("ServeController"):
            return "serve controller"
        if title == "IDLE":
            return "ray idle worker"
        return f"ray worker:{title}"
    if "gcs_server" in cmd:
        return "ray gcs_server"
    if "raylet" in cmd.split(" ")[0]:
        return "ray raylet"
    if "dashboard/agent.py" in cmd or "dashboard_agent" in cmd:
        return "ray dashboard agent"
    if "runtime_env/agent" in cmd:
        return "ray runtime_env agent"
    if "dashboard/dashboard.py" in cmd or "dashboard/subprocesses" in cmd or "ray-dashboard" in cmd:
        return "ray dashboard"
    if "log_monitor" in cmd:
        return "ray log_monitor"
    if "monitor.py" in cmd:
        return "ray monitor"
    if "uvicorn" in cmd or "multiprocessing" in cmd:
        return "uvicorn"
    return Path(cmd.split(" ")[0]).name or "?"


def is_ray_worker(group: str) -> bool:
    """Serve actors and other Ray worker processes (the raylet's workers)."""
    return group.startswith(("replica", "serve ", "ray idle worker", "ray worker:"))


class CpuMeter:
    """CPU seconds of the processes under ``roots`` (minus ``exclude``), by process and group."""

    def __init__(self, roots: Iterable[int], exclude: Iterable[int] = ()) -> None:
        self.roots = list(roots)
        self.exclude = set(exclude)
        self._names: dict[int, str] = {}

    def sample(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for pid in descendants(self.roots, self.exclude):
            cpu = proc_cpu_s(pid)
            if cpu is None:
                continue
            if pid not in self._names:
                self._names[pid] = classify(cmdline(pid))
            out[pid] = cpu
        return out

    def delta(self, before: dict[int, float], after: dict[int, float]) -> dict[str, Any]:
        """``{"total_s", "ray_workers_s", "other_s", "by_group": {group: s}, "processes": n}``."""
        by_group: dict[str, float] = {}
        for pid, cpu in after.items():
            d = cpu - before.get(pid, 0.0)
            if d <= 0:
                continue
            g = self._names.get(pid, "?")
            by_group[g] = by_group.get(g, 0.0) + d
        total = sum(by_group.values())
        workers = sum(v for g, v in by_group.items() if is_ray_worker(g))
        return {
            "total_s": round(total, 3),
            "ray_workers_s": round(workers, 3),
            "other_s": round(total - workers, 3),
            "by_group": {g: round(v, 3) for g, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "processes": len(after),
        }


def machine_steal() -> float:
    """Seconds of CPU the hypervisor gave to others, summed over all CPUs since boot
    (``/proc/stat``'s steal column: a noisy neighbour on a shared host shows here)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    return int(first[8]) / _TICK if len(first) > 8 else 0.0


def machine_busy() -> tuple[float, float]:
    """``(busy_s, total_s)`` summed over all CPUs since boot (from ``/proc/stat``)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0, 0.0
    vals = [int(x) for x in first[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already in user
    return (total - idle) / _TICK, total / _TICK


class StealWindow:
    """The host's CPU steal over a window: the share of all CPUs' time, from construction to
    ``fraction()``, that the hypervisor gave to other tenants (0.0 when no time passed)."""

    def __init__(self) -> None:
        self._steal0 = machine_steal()
        self._total0 = machine_busy()[1]

    def fraction(self) -> float:
        steal, total = machine_steal(), machine_busy()[1]
        return round((steal - self._steal0) / (total - self._total0), 3) if total > self._total0 else 0.0


def host_speed_ms(rounds: int = 5) -> float:
    """CPU milliseconds this process takes for a fixed pure-Python workload (the minimum of
    ``rounds`` tries, ~10 ms each): a yardstick of the host's speed at this moment, lower =
    faster. The VM shares its host, whose speed moves by tens of percent without showing as
    steal, and the systems of a run are measured minutes apart; taken while the system under
    test is idle, this tells a slower host from a slower system."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        acc = 0
        for i in range(150_000):
            acc += i * i % 7
        best = min(best, time.process_time() - t0)
    return round(best * 1000.0, 3)
