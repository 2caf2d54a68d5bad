"""Processes a benchmark runs against: a local Ray + Serve, the LM simulator, a redis-server.

Everything here is started by the calling process and stopped by it, by PID (or by
``ray.shutdown()`` for the Ray cluster this process started with ``address="local"``):
nothing here touches another Ray cluster or any process it did not start. All ports are
free loopback ports picked at start. Every class is a context manager.

Apps are deployed through the real ``serve deploy --address <dashboard>`` CLI with a
generated config (:func:`dspy_app`, :func:`sim_model`, :func:`serve_config`), and every
replica gets ``ray_actor_options: {num_cpus: 0}`` so the app fits any core count.

``PeerServer`` is the peer baseline (``benchmarks/peer_app.py`` on uvicorn, N workers).
``RayServe(mode=...)`` picks Serve's serving mode (``serve_app/serve_mode.py``: ``fast``, the
shipped one, by default; ``proxy`` for Serve's Python proxy) and ``extra_env`` sets more
variables: Serve's proxy and controller read them at process start, so they are put in this
process's environment before ``ray.init`` and every Ray process inherits them. ``RayServe.server_pids`` are the processes ``ray.init`` started
(GCS, raylet, dashboard, ...; the workers are their descendants): the roots for
``procstat.CpuMeter``.

Importing this module starts nothing and changes no environment variable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from serve_app.ports import PortPicker
from serve_app.serve_mode import MODES, isolated_env

__all__ = [
    "REPO",
    "free_port",
    "wait_for",
    "RedisServer",
    "LMSimProcess",
    "PeerServer",
    "RayServe",
    "dspy_app",
    "sim_model",
    "serve_config",
]

REPO = Path(__file__).resolve().parents[1]

# Set in this process (and so inherited by the raylet, every Ray worker and the serve CLI)
# when a cluster starts: token auth off (everything is on loopback and the CLI subprocess
# must reach the dashboard), no usage stats, LiteLLM's bundled cost map (no network fetch).
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


# Ports for this process's servers and clusters (serve_app/ports.py: none from the kernel's
# ephemeral range, where a starting Ray cluster could take one before it is bound).
free_port = PortPicker()


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``cond`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last one
            last_exc = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def _stop_proc(proc: subprocess.Popen[Any] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``: this one process, by its PID."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


class _Managed:
    """``with X() as x``: ``start()`` on entry (``stop()`` if starting fails half-way, so no
    process is left behind), ``stop()`` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class RedisServer(_Managed):
    """A throwaway redis-server on a free loopback port (no persistence)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir = Path(tempfile.mkdtemp(prefix="sa_bench_redis_"))
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, "redis-server to answer PING")
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001
            return False

    def dbsize(self) -> int:
        return int(self.client().dbsize())

    def flushall(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        _stop_proc(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


class LMSimProcess(_Managed):
    """The LM simulator as its own process (``python -m serve_app.lmsim``)."""

    def __init__(self, latency_ms: float = 50.0, jitter_ms: float = 0.0, python: str | None = None) -> None:
        self.port = free_port()
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LMSimProcess":
        self.proc = subprocess.Popen(
            [self.python, "-m", "serve_app.lmsim", "--host", "127.0.0.1", "--port", str(self.port),
             "--latency-ms", str(self.latency_ms), "--jitter-ms", str(self.jitter_ms),
             "--models", "sim-qa,sim-classify,sim-pipeline"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the LM simulator exited with {self.proc.returncode}")
            return self.http.get("/health").status_code == 200

        wait_for(up, 30, "the LM simulator to start")
        return self

    def set_knobs(self, **knobs: Any) -> None:
        self.http.put("/admin/knobs", json=knobs).raise_for_status()

    def calls(self) -> int:
        """LM calls answered so far (the ledger's running total)."""
        r = self.http.get("/admin/ledger")
        r.raise_for_status()
        return int(r.json()["total"])

    def stop(self) -> None:
        _stop_proc(self.proc)
        self.proc = None
        self.http.close()


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rfind(")") + 2 :].split()[1]) == pid:
            out.add(int(entry.name))
    return out


class PeerServer(_Managed):
    """The peer baseline: ``uvicorn benchmarks.peer_app:app --workers N`` in its own process
    (no access log, warning-level logs), LM at ``api_base``. ``pids()`` are the uvicorn
    processes (the master and, with N > 1, its workers)."""

    def __init__(self, workers: int, api_base: str, python: str | None = None,
                 lm_model: str = "openai/sim-qa") -> None:
        self.workers = workers
        self.api_base = api_base
        self.lm_model = lm_model
        self.port = free_port()
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> "PeerServer":
        env = {**os.environ, "PEER_LM_API_BASE": self.api_base, "PEER_LM_MODEL": self.lm_model,
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.proc = subprocess.Popen(
            [self.python, "-m", "uvicorn", "benchmarks.peer_app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", str(self.workers), "--no-access-log",
             "--log-level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the peer (uvicorn) exited with {self.proc.returncode}")
            if self.workers > 1 and len(_children(self.proc.pid)) < self.workers:  # type: ignore[union-attr]
                return False
            return httpx.get(self.base_url + "/health", timeout=5).status_code == 200

        wait_for(up, timeout_s, f"the peer ({self.workers} worker(s)) to start", interval_s=0.25)
        return self

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = _children(self.proc.pid)
        _stop_proc(self.proc, timeout_s=15)
        for pid in kids:  # workers the master did not take down (it normally does)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc = None


class RayServe(_Managed):
    """A local Ray cluster started by THIS process (``ray.init(address="local")``) with
    Serve's HTTP proxy on a free loopback port; ``stop()`` is ``serve.shutdown()`` then
    ``ray.shutdown()``, which ends only this cluster."""

    def __init__(self, num_cpus: int = 2, request_timeout_s: float | None = None,
                 extra_env: Mapping[str, str] | None = None, mode: str = "fast") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown serve mode {mode!r}: use one of {', '.join(sorted(MODES))}")
        self.mode = mode
        self.num_cpus = num_cpus
        self.request_timeout_s = request_timeout_s
        self.extra_env = dict(extra_env or {})
        self.server_pids: list[int] = []
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.temp_dir: str | None = None
        self.config_dir: Path | None = None
        self.env: dict[str, str] = {}
        self._started = False

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "RayServe":
        mode_vars = isolated_env(self.mode, os.environ, free_port)
        os.environ.clear()
        os.environ.update(mode_vars)
        os.environ.update(RAY_ENV)
        # Read by Serve's proxy/controller at process start: must be inherited, not a runtime_env.
        os.environ.update(self.extra_env)
        import ray
        from ray import serve

        before = _children(os.getpid())
        self.temp_dir = tempfile.mkdtemp(prefix="sa_bench_ray_")
        self.config_dir = Path(tempfile.mkdtemp(prefix="sa_bench_cfg_"))
        try:
            ray.init(
                address="local",
                num_cpus=self.num_cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=self.dashboard_port,
                _metrics_export_port=self.metrics_port,
                _temp_dir=self.temp_dir,
                log_to_driver=False,
                logging_level="WARNING",
            )
        except BaseException:
            # A node that timed out starting (a slow host) leaves processes and files: end the
            # ones ray.init started and remove what this cluster wrote before re-raising.
            ray.shutdown()
            for d in (self.temp_dir, self.config_dir):
                shutil.rmtree(d, ignore_errors=True)
            raise
        self._started = True
        self.server_pids = sorted(_children(os.getpid()) - before)
        http_options: dict[str, Any] = {"host": "127.0.0.1", "port": self.http_port}
        if self.request_timeout_s is not None:
            http_options["request_timeout_s"] = self.request_timeout_s
        serve.start(http_options=http_options, proxy_location="EveryNode")
        self.env = dict(os.environ)
        return self

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real ``serve`` CLI (from this interpreter's environment)."""
        serve_bin = str(Path(sys.executable).parent / "serve")
        return subprocess.run([serve_bin, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)

    def applications(self) -> dict[str, Any]:
        r = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10)
        r.raise_for_status()
        return r.json().get("applications", {})

    def deploy(self, config: Mapping[str, Any], timeout_s: float = 240, name: str = "bench",
               wait_apps: list[str] | None = None) -> Path:
        """``serve deploy`` a generated config and wait until every app in it (or only those
        in ``wait_apps``: the ones this deploy adds or changes) is redeployed and RUNNING.

        A ``serve deploy`` is declarative: apps of this cluster missing from ``config`` are
        removed. Returns the path of the YAML written (kept until ``stop``)."""
        assert self.config_dir is not None, "start() first"
        path = self.config_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        apps = wait_apps if wait_apps is not None else [a["name"] for a in config["applications"]]
        before = {a: s.get("last_deployed_time_s") for a, s in self.applications().items()}
        result = self.cli("deploy", "--address", self.dashboard_url, str(path))
        if result.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{result.stdout}\n{result.stderr}")

        def settled() -> bool:
            state = self.applications()
            for app in apps:
                s = state.get(app)
                if s is None or s.get("last_deployed_time_s") == before.get(app):
                    return False
                if s["status"] == "DEPLOY_FAILED":
                    raise RuntimeError(f"app {app} DEPLOY_FAILED: {s.get('message')}")
                if s["status"] != "RUNNING":
                    return False
            return True

        wait_for(settled, timeout_s, f"apps {apps} RUNNING", interval_s=0.5)
        return path

    def wait_ready(self, route_prefix: str, timeout_s: float = 60) -> None:
        """Until the app's ``GET <prefix>/ready`` says every predictor and the cache answer."""
        url = self.base_url + route_prefix.rstrip("/") + "/ready"
        wait_for(lambda: httpx.get(url, timeout=5).status_code == 200, timeout_s, f"{url} to be 200")

    def stop(self, graceful: bool = False) -> None:
        """Stop this cluster. ``graceful``: ``serve.shutdown()`` first (drains replicas: slow);
        otherwise ``ray.shutdown()`` alone, which kills this cluster's workers at once."""
        if not self._started:
            return
        import ray
        from ray import serve

        try:
            if graceful:
                serve.shutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        finally:
            ray.shutdown()
            self._started = False
            for d in (self.temp_dir, self.config_dir):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)

# ---- generated serve configs -------------------------------------------------------------


def dspy_app(
    name: str,
    route_prefix: str,
    models: list[dict[str, Any]],
    *,
    cache: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    deployments: list[dict[str, Any]] | None = None,
    router_replicas: int = 1,
    env_vars: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One ``serve_app.app:build_app`` application with every replica at ``num_cpus: 0``.

    ``deployments`` entries (by name) override/extend the defaults (e.g. autoscaling)."""
    args: dict[str, Any] = {"models": models}
    if cache is not None:
        args["cache"] = cache
    if limits is not None:
        args["limits"] = limits
    by_name = {d["name"]: dict(d) for d in deployments or []}
    names = ["Router", "Cache", *[m["name"] for m in models]]
    deps = []
    for dep in names:
        d = by_name.pop(dep, {"name": dep})
        d.setdefault("ray_actor_options", {"num_cpus": 0})
        d["ray_actor_options"].setdefault("num_cpus", 0)
        if dep == "Router":
            d.setdefault("num_replicas", router_replicas)
        deps.append(d)
    if by_name:
        raise ValueError(f"deployments not in this app: {sorted(by_name)}")
    app: dict[str, Any] = {"name": name, "route_prefix": route_prefix, "import_path": "serve_app.app:build_app",
                           "args": args, "deployments": deps}
    app["runtime_env"] = {"env_vars": {"LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env_vars or {})}}
    return app


def sim_model(name: str, api_base: str, program: str = "serve_app.examples:build_qa", **extra: Any) -> dict[str, Any]:
    """A model whose LM is the simulator at ``api_base`` (LM timeout 5 s, model 8 s)."""
    lm = {"model": f"openai/sim-{name}", "api_base": api_base, "timeout_s": 5.0}
    lm.update(extra.pop("lm", {}))
    return {"name": name, "program": program, "lm": lm, "timeout_s": 8.0, **extra}


def serve_config(*apps: dict[str, Any]) -> dict[str, Any]:
    return {"applications": list(apps)}
