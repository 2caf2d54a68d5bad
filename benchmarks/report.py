"""Result files: the run header (machine, date, commit, command) and Markdown tables.

Scenario modules build rows (dicts) and hand them here; nothing here knows a scenario.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cluster import REPO

__all__ = ["machine_info", "run_header", "fmt_num", "fmt_mix", "markdown_table", "write_results", "Progress"]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                      if ln.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), 0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": _read("/proc/loadavg").split()[:3],
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ray", "dspy", "litellm", "aiohttp", "redis", "uvloop"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_header(argv: Sequence[str] | None = None, module: str | None = None) -> dict[str, Any]:
    """Everything needed to say where and how the numbers were taken."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", module, *argv]) if module else shlex.join([sys.executable, *sys.argv])
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": command,
        "machine": machine_info(),
        "versions": _versions(),
    }


def fmt_num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def fmt_mix(counts: dict[str, int]) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """``columns``: (header, row key) pairs; cells are pre-formatted strings or numbers."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt_num(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def header_markdown(title: str, header: dict[str, Any]) -> str:
    m = header["machine"]
    v = ", ".join(f"{k} {val}" for k, val in header.get("versions", {}).items())
    dirty = " (working tree has uncommitted changes)" if header.get("git_dirty") else ""
    return "\n".join([
        f"# {title}",
        "",
        f"- Date: {header['date_utc']}",
        f"- Commit: `{header['git_commit']}`{dirty}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"Python {m['python']}; load average at start {' '.join(m['loadavg'])}",
        f"- Versions: {v}",
        f"- Command: `{header['command']}`",
    ])


def write_results(out_dir: Path, stem: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


class Progress:
    """Timestamped progress lines on stdout (flushed: visible while a run goes on)."""

    def __init__(self, name: str) -> None:
        import time

        self._time = time.monotonic
        self._t0 = self._time()
        self.name = name

    def __call__(self, msg: str) -> None:
        print(f"[{self.name} +{self._time() - self._t0:6.1f}s] {msg}", flush=True)
