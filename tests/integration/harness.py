"""Real processes for integration tests: a redis-server, the LM simulator, and deploys
through the real ``serve`` CLI. Every process started here is stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.ports import PortPicker

REPO = Path(__file__).resolve().parents[2]
# A fake provider key exported into the session cluster's environment (as an operator exports
# a real one before `ray start`); tests assert it never shows up in a log, header or body.
CANARY_ENV = "SERVE_APP_TEST_CANARY_KEY"
CANARY = "sk-canary-0123456789abcdef"


# Every port the session's servers and cluster bind (serve_app/ports.py: none from the
# kernel's ephemeral range, where the starting Ray cluster could take one before it is bound).
free_port = PortPicker()


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``cond`` until it returns a truthy value; fail with ``what`` on timeout."""
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


class RedisProcess:
    """A real redis-server on a fixed loopback port that tests can kill, stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 10, "redis-server to answer PING")

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigstop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LMSim:
    """The LM simulator as its own process (``python -m serve_app.lmsim``), driven over HTTP."""

    def __init__(self, latency_ms: float = 20.0) -> None:
        self.port = free_port()
        self.latency_ms = latency_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.lmsim", "--host", "127.0.0.1", "--port", str(self.port),
             "--latency-ms", str(self.latency_ms)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.http.get("/health").status_code == 200, 30, "the LM simulator to start")

    def set_knobs(self, **knobs: Any) -> None:
        r = self.http.put("/admin/knobs", json=knobs)
        r.raise_for_status()

    def reset(self) -> None:
        self.http.post("/admin/knobs/reset").raise_for_status()
        self.set_knobs(latency_ms=self.latency_ms)
        self.http.delete("/admin/ledger").raise_for_status()

    def ledger(self, **params: str) -> dict[str, Any]:
        r = self.http.get("/admin/ledger", params=params)
        r.raise_for_status()
        return r.json()

    def calls(self) -> int:
        return int(self.ledger()["total"])

    def model_calls(self, model: str) -> int:
        """Calls recorded for one simulator model name (e.g. ``"sim-qa"``) since the last clear."""
        return int(self.ledger()["by_model"].get(model, 0))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.http.close()


class ServeCluster:
    """Addresses of the session's Ray cluster and Serve HTTP proxy, plus the deploy CLI."""

    def __init__(self, dashboard_port: int, http_port: int, metrics_port: int, env: Mapping[str, str]) -> None:
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.base_url = f"http://127.0.0.1:{http_port}"
        self.env = dict(env)

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the real ``serve`` CLI against this cluster."""
        serve_bin = str(Path(sys.executable).parent / "serve")
        return subprocess.run(
            [serve_bin, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )

    def applications(self) -> dict[str, Any]:
        r = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=10)
        r.raise_for_status()
        return r.json().get("applications", {})

    def actor_ids(self, class_suffix: str) -> set[str]:
        """Ids of ALIVE actors whose class name ends with ``class_suffix`` (e.g. ``"app:qa"``)."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10_000)
        return {a.actor_id for a in actors if a.class_name.endswith(class_suffix)}

    def actor_names(self, class_suffix: str) -> list[str]:
        """Names of ALIVE actors whose class name ends with ``class_suffix`` (a replica of
        deployment ``d`` in app ``a`` has class ``ServeReplica:a:d``), sorted."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10_000)
        return sorted(a.name for a in actors if a.class_name.endswith(class_suffix) and a.name)

    def kill_actor(self, name: str, namespace: str = "serve") -> None:
        """``ray.kill`` a named actor without restart (Serve's controller must replace it).
        Needs the session's ``ray.init`` (the ``cluster`` fixture) in this process."""
        import ray

        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)

    def replicas(self, app: str, deployment: str) -> list[dict[str, Any]]:
        """Serve's view of one deployment's replicas (``state``, ``actor_name``, ...)."""
        deployments = self.applications().get(app, {}).get("deployments", {})
        return list(deployments.get(deployment, {}).get("replicas", []))

    def deploy(self, config: Mapping[str, Any] | Path, timeout_s: float = 180) -> None:
        """``serve deploy`` a config (dict or file) and wait until every app in it is RUNNING."""
        if isinstance(config, Path):
            path, apps = config, [a["name"] for a in yaml.safe_load(config.read_text())["applications"]]
        else:
            fd, name = tempfile.mkstemp(suffix=".yaml", prefix="serve_app_test_")
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(dict(config), f, sort_keys=False)
            path, apps = Path(name), [a["name"] for a in config["applications"]]
        before = {a: s.get("last_deployed_time_s") for a, s in self.applications().items()}
        result = self.cli("deploy", "--address", self.dashboard_url, str(path))
        assert result.returncode == 0, f"serve deploy failed:\n{result.stdout}\n{result.stderr}"

        def settled() -> bool:
            state = self.applications()
            for app in apps:
                s = state.get(app)
                if s is None or s.get("last_deployed_time_s") == before.get(app):
                    return False
                if s["status"] == "DEPLOY_FAILED":
                    raise AssertionError(f"app {app} DEPLOY_FAILED: {s.get('message')}")
                if s["status"] != "RUNNING":
                    return False
            return True

        wait_for(settled, timeout_s, f"apps {apps} RUNNING", interval_s=0.5)


def dspy_app(
    name: str,
    route_prefix: str,
    models: list[dict[str, Any]],
    *,
    cache: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    deployments: list[dict[str, Any]] | None = None,
    router_replicas: int = 1,
    policy: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``serve_app.app:build_app`` application with every replica at ``num_cpus: 0``
    (a model with variants has one predictor deployment per variant, ``<model>.<variant>``)."""
    args: dict[str, Any] = {"models": models}
    if cache is not None:
        args["cache"] = cache
    if limits is not None:
        args["limits"] = limits
    if policy is not None:
        args["policy"] = policy
    if http is not None:
        args["http"] = http
    by_name = {d["name"]: dict(d) for d in deployments or []}
    predictors: list[str] = []
    for m in models:
        predictors += [f"{m['name']}.{v['name']}" for v in m.get("variants") or []] or [m["name"]]
    names = ["Router", "Cache", *predictors]
    deps = []
    for dep in names:
        d = by_name.pop(dep, {"name": dep})
        d.setdefault("ray_actor_options", {"num_cpus": 0})
        if dep == "Router":
            d.setdefault("num_replicas", router_replicas)
        deps.append(d)
    return {"name": name, "route_prefix": route_prefix, "import_path": "serve_app.app:build_app",
            "args": args, "deployments": deps}


def sim_model(name: str, api_base: str, program: str, **extra: Any) -> dict[str, Any]:
    lm = {"model": f"openai/sim-{name}", "api_base": api_base, "timeout_s": 5.0}
    lm.update(extra.pop("lm", {}))
    return {"name": name, "program": program, "lm": lm, "timeout_s": 8.0, **extra}


def serve_config(*apps: dict[str, Any]) -> dict[str, Any]:
    return {"applications": list(apps)}


def session_log_lines() -> list[str]:
    """Every line of every log file of this process's Ray session (replicas, proxy, ...).
    Needs the session's ``ray.init`` (the ``cluster`` fixture) in this process."""
    import glob

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    lines: list[str] = []
    for path in glob.glob(f"{session}/logs/**/*", recursive=True):
        try:
            with open(path, errors="replace") as f:
                lines.extend(f.read().splitlines())
        except (IsADirectoryError, PermissionError, OSError):
            continue
    return lines


def wait_until_logged(request_id: str, timeout_s: float = 15) -> None:
    """Wait until the router's prediction line for ``request_id`` is in the log files: the
    replicas have flushed everything logged before it."""
    wait_for(lambda: any(request_id in line and "prediction" in line for line in session_log_lines()),
             timeout_s, f"the log line of request {request_id}", interval_s=0.2)


def body_of(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json()
    except json.JSONDecodeError:
        return {"raw": response.text}
