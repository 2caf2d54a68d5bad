#!/usr/bin/env python
"""Several Ray nodes on one machine: a head and two workers, Serve with a proxy on every node,
predictor replicas spread over the workers, load through the proxies of different nodes, and
one worker node killed under load (RELIABILITY S5).

    .venv/bin/python cluster/local_multinode.py                 # run the scenario, print a report
    .venv/bin/python cluster/local_multinode.py --json out.json # also write it as JSON
    .venv/bin/python cluster/local_multinode.py --no-kill --hold-s 600   # just a 3-node cluster to poke at

How several proxies share one machine: every Serve proxy binds ``http_options.host:port``, the
same on every node, so on one machine they would all take the same port (SO_REUSEPORT lets them,
and the kernel then spreads connections over them, so no one could say which node answered).
Serve 2.60 reads ``RAY_SERVE_WORKER_PROXY_HTTP_PORT`` in a *worker* node's proxy (the head keeps
``http_options.port``); the variable reaches the proxy through its raylet's environment, so each
worker node is started with its own value (``Cluster.add_node(env_vars=...)``, the equivalent of
``RAY_SERVE_WORKER_PROXY_HTTP_PORT=8001 ray start --address ...``). Each node's proxy then has
its own port on 127.0.0.1 and a request can be aimed at one node.

Placement: the head has no CPUs (as on KubeRay, ``num-cpus: 0``) and a custom resource
``ingress`` that the Router and Cache ask for, so the node killed holds only predictor replicas
and a proxy; predictors ask for 0.5 CPU and the workers have 2 each, so Serve's spread
scheduling puts each model's two replicas on different workers, and all four still fit on the
survivor. Token auth is disabled: every port is on loopback and the process that starts the
cluster is the only client.

The report says where replicas ran before and after the kill, which proxies served, every
failure (status, error code, proxy, whether the request was in flight at the kill) and how long
Serve took to have every replica RUNNING on the surviving nodes again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_app.ports import PortPicker

REPO = Path(__file__).resolve().parents[1]
APP = "dspy"
MODELS = {"qa": ("serve_app.examples:build_qa", "question"), "classify": ("serve_app.examples:build_classifier", "text")}
RETRYABLE = {(502, "upstream_error"), (503, "overloaded"), (503, "circuit_open"), (504, "upstream_timeout")}


# serve_app/ports.py: no port from the kernel's ephemeral range, where the starting Ray
# nodes could take one (the worker proxies bind theirs last).
free_port = PortPicker()


def wait_for(cond: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}" + (f": {last!r}" if last else ""))


def serve_config(http_port: int, sim_base: str) -> dict[str, Any]:
    """The application: Router + Cache on the head (resource ``ingress``), two predictors with two
    replicas each at 0.5 CPU (so on the workers)."""
    models = [
        {
            "name": name,
            "program": program,
            "lm": {"model": f"openai/sim-{name}", "api_base": sim_base, "timeout_s": 10.0},
            "timeout_s": 15.0,
        }
        for name, (program, _) in MODELS.items()
    ]
    ingress = {"num_cpus": 0, "resources": {"ingress": 0.01}}
    predictor = {
        "num_replicas": 2,
        "max_ongoing_requests": 64,
        "max_queued_requests": 256,
        "graceful_shutdown_timeout_s": 45,
        "health_check_period_s": 2,
        "health_check_timeout_s": 10,
        "ray_actor_options": {"num_cpus": 0.5},
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": http_port, "request_timeout_s": 40},
        "logging_config": {"encoding": "TEXT", "log_level": "WARNING", "enable_access_log": False},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "serve_app.app:build_app",
                "runtime_env": {"env_vars": {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}},
                "args": {"models": models, "limits": {"request_timeout_s": 30.0}},
                "deployments": [
                    {"name": "Router", "num_replicas": 1, "max_ongoing_requests": 256,
                     "graceful_shutdown_timeout_s": 45, "ray_actor_options": ingress},
                    {"name": "Cache", "num_replicas": 1, "ray_actor_options": ingress},
                    *({"name": name, **predictor} for name in MODELS),
                ],
            }
        ],
    }


@dataclass
class Outcome:
    """One client request: where it went, when, and how it ended."""

    proxy: str
    model: str
    t_send: float
    t_done: float = 0.0
    status: int | None = None  # None: transport error (no HTTP answer)
    code: str | None = None
    error: str | None = None


@dataclass
class Report:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> node_id, proxy port
    replicas_before: dict[str, dict[str, int]] = field(default_factory=dict)  # deployment -> role -> n
    replicas_after: dict[str, dict[str, int]] = field(default_factory=dict)
    proxies_before: list[str] = field(default_factory=list)
    served_by_proxy_before_kill: dict[str, int] = field(default_factory=dict)
    served_by_proxy_after_recovery: dict[str, int] = field(default_factory=dict)
    killed: str = ""
    requests_total: int = 0
    requests_ok: int = 0
    in_flight_at_kill: dict[str, int] = field(default_factory=dict)  # proxy -> n
    failures: list[dict[str, Any]] = field(default_factory=list)
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    startup_s: float = 0.0
    total_s: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)


class Load:
    """Closed-loop clients, ``per_proxy`` per proxy, each request a fresh input (cache bypassed)."""

    def __init__(self, ports: dict[str, int], per_proxy: int) -> None:
        self.ports = dict(ports)
        self.per_proxy = per_proxy
        self.outcomes: list[Outcome] = []
        self.in_flight: dict[int, Outcome] = {}
        self.lock = threading.Lock()
        self.stopped: set[str] = set()
        self.stop_all = threading.Event()
        self.threads: list[threading.Thread] = []
        self.seq = 0

    def start(self) -> None:
        for role in self.ports:
            for i in range(self.per_proxy):
                t = threading.Thread(target=self._run, args=(role, i), daemon=True, name=f"load-{role}-{i}")
                t.start()
                self.threads.append(t)

    def stop_proxy(self, role: str) -> None:
        with self.lock:
            self.stopped.add(role)

    def snapshot_in_flight(self) -> Counter[str]:
        with self.lock:
            return Counter(o.proxy for o in self.in_flight.values())

    def stop(self) -> None:
        self.stop_all.set()
        for t in self.threads:
            t.join(timeout=45)

    def _run(self, role: str, index: int) -> None:
        import httpx

        url = f"http://127.0.0.1:{self.ports[role]}/v1/predict"
        names = list(MODELS)
        with httpx.Client(timeout=httpx.Timeout(45.0, connect=5.0)) as client:
            while not self.stop_all.is_set():
                with self.lock:
                    if role in self.stopped:
                        return
                    self.seq += 1
                    n = self.seq
                    model = names[n % len(names)]
                    out = Outcome(proxy=role, model=model, t_send=time.monotonic())
                    self.in_flight[id(out)] = out
                field_name = MODELS[model][1]
                body = {"model": model, "inputs": {field_name: f"multinode request {n} from {role}/{index}"}, "cache": False}
                try:
                    r = client.post(url, json=body)
                    out.status = r.status_code
                    if r.status_code != 200:
                        try:
                            out.code = r.json().get("error", {}).get("code")
                        except Exception:  # noqa: BLE001 - not our JSON: keep the status
                            out.code = None
                except Exception as exc:  # noqa: BLE001 - transport error: record it
                    out.error = type(exc).__name__
                out.t_done = time.monotonic()
                with self.lock:
                    self.in_flight.pop(id(out), None)
                    self.outcomes.append(out)
                if out.error is not None:
                    time.sleep(0.2)


def replica_nodes(dashboard: str) -> dict[str, list[tuple[str, str]]]:
    """deployment -> [(state, node_id)] from Serve's REST API."""
    import httpx

    apps = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json().get("applications", {})
    deployments = apps.get(APP, {}).get("deployments", {})
    return {
        name: [(r.get("state", "?"), r.get("node_id", "?")) for r in d.get("replicas", [])]
        for name, d in deployments.items()
    }


def proxy_nodes(dashboard: str) -> dict[str, str]:
    import httpx

    proxies = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json().get("proxies", {}) or {}
    return {node_id: p.get("status", "?") for node_id, p in proxies.items()}


def by_role(placement: dict[str, list[tuple[str, str]]], roles: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for dep, replicas in placement.items():
        counts = Counter(roles.get(node, node[:8]) for state, node in replicas if state == "RUNNING")
        out[dep] = dict(sorted(counts.items()))
    return out


def run(args: argparse.Namespace) -> Report:
    # Serve's Python proxy, not the shipped HAProxy mode: HAProxy binds http_options.port (and
    # its fixed metrics/stats ports) on every node, so on ONE machine the nodes' HAProxies
    # would collide, while the Python proxy reads a per-node port (see the module docstring).
    # On Kubernetes each pod has its own ports and the shipped mode applies.
    from serve_app.serve_mode import mode_env

    proxy_env = mode_env("proxy", os.environ)
    os.environ.clear()
    os.environ.update(proxy_env)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import httpx
    import ray
    from ray.cluster_utils import Cluster

    report = Report()
    t0 = time.monotonic()
    sim_port, dash_port = free_port(), free_port()
    ports = {"head": free_port(), "worker1": free_port(), "worker2": free_port()}
    sim = subprocess.Popen(
        [sys.executable, "-m", "serve_app.lmsim", "--host", "127.0.0.1", "--port", str(sim_port),
         "--latency-ms", str(args.latency_ms)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    temp_dir = tempfile.mkdtemp(prefix="sa_mn_")
    # ray.cluster_utils.Cluster writes the head's address to <RAY_TMPDIR or /tmp>/ray/
    # ray_current_cluster for a later `ray.init()` and does not create that folder: on a fresh
    # machine (no Ray run there yet) /tmp/ray is missing and the head failed to start. Pointing
    # RAY_TMPDIR into this run's folder also keeps a user's `ray.init()` off this cluster.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    if args.keep_logs:
        print(f"Ray session directory: {temp_dir}", flush=True)
    cluster: Any = None
    load: Load | None = None
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{sim_port}/health", timeout=2).status_code == 200, 30, "the LM simulator")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "resources": {"ingress": 1},
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dash_port,
                "temp_dir": temp_dir,
                "object_store_memory": 100 * 1024 * 1024,
            },
        )
        workers = {}
        for role in ("worker1", "worker2"):
            workers[role] = cluster.add_node(
                num_cpus=2,
                resources={role: 1},
                object_store_memory=100 * 1024 * 1024,
                env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(ports[role])},
            )
        cluster.wait_for_nodes()
        roles = {cluster.head_node.node_id: "head", **{n.node_id: role for role, n in workers.items()}}
        report.nodes = {role: {"node_id": nid, "proxy_port": ports[role]} for nid, role in roles.items()}
        ray.init(address=cluster.address, log_to_driver=False)
        dashboard = f"http://127.0.0.1:{dash_port}"
        wait_for(lambda: httpx.get(f"{dashboard}/api/serve/applications/", timeout=5).status_code == 200, 60, "the dashboard")

        config = serve_config(ports["head"], f"http://127.0.0.1:{sim_port}/v1")
        r = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=60)
        r.raise_for_status()

        def app_running() -> bool:
            apps = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json().get("applications", {})
            status = apps.get(APP, {}).get("status")
            if status == "DEPLOY_FAILED":
                raise RuntimeError(apps[APP].get("message"))
            return bool(status == "RUNNING")

        wait_for(app_running, 240, "the application to be RUNNING", interval_s=1)

        def proxy_up(role: str) -> bool:
            r = httpx.get(f"http://127.0.0.1:{ports[role]}/-/healthz", timeout=5)
            return r.status_code == 200

        def predicts(role: str) -> bool:
            r = httpx.post(f"http://127.0.0.1:{ports[role]}/v1/predict",
                           json={"model": "qa", "inputs": {"question": f"warm-up via {role}"}}, timeout=30)
            return r.status_code == 200

        for role, port in ports.items():
            wait_for(lambda role=role: proxy_up(role), 90, f"the {role} proxy on :{port}", interval_s=0.5)
            wait_for(lambda role=role: predicts(role), 60, f"a prediction through the {role} proxy", interval_s=0.5)
        report.startup_s = round(time.monotonic() - t0, 1)
        placement = replica_nodes(dashboard)
        report.replicas_before = by_role(placement, roles)
        report.proxies_before = sorted(roles.get(n, n[:8]) for n, s in proxy_nodes(dashboard).items() if s == "HEALTHY")
        if args.hold_s:
            print(json.dumps({"dashboard": dashboard, "proxies": {r: f"http://127.0.0.1:{p}" for r, p in ports.items()},
                              "replicas": report.replicas_before}, indent=2), flush=True)
            time.sleep(args.hold_s)

        # ---- load through every node's proxy, then kill worker1 under load
        load = Load(ports, per_proxy=args.per_proxy)
        load.start()
        time.sleep(args.pre_kill_s)
        t_kill = time.monotonic()
        with load.lock:
            report.served_by_proxy_before_kill = dict(Counter(o.proxy for o in load.outcomes if o.status == 200))
        if args.kill:
            victim = "worker1"
            report.killed = victim
            load.stop_proxy(victim)  # its proxy dies with it: no new requests go there
            report.in_flight_at_kill = dict(load.snapshot_in_flight())
            t_kill = time.monotonic()
            cluster.remove_node(workers[victim], allow_graceful=False)
            dead = workers[victim].node_id

            def recovered() -> bool:
                placement = replica_nodes(dashboard)
                for name in MODELS:
                    running = [node for state, node in placement.get(name, []) if state == "RUNNING"]
                    if len(running) != 2 or dead in running:
                        return False
                return True

            wait_for(recovered, args.recovery_timeout_s, "replicas RUNNING on the surviving nodes", interval_s=0.5)
            report.recovery_s = round(time.monotonic() - t_kill, 1)
            report.replicas_after = by_role(replica_nodes(dashboard), roles)
        t_recovered = time.monotonic()
        time.sleep(args.post_recovery_s)
        load.stop()
        with load.lock:
            outcomes = list(load.outcomes)
        report.served_by_proxy_after_recovery = dict(
            Counter(o.proxy for o in outcomes if o.status == 200 and o.t_send >= t_recovered)
        )
        report.requests_total = len(outcomes)
        report.requests_ok = sum(1 for o in outcomes if o.status == 200)
        kinds: Counter[str] = Counter()
        for o in outcomes:
            if o.status == 200:
                continue
            in_flight = o.t_send <= t_kill <= o.t_done
            kind = f"{o.status or o.error}:{o.code}" if o.status else f"transport:{o.error}"
            kinds[kind] += 1
            report.failures.append({**asdict(o), "in_flight_at_kill": in_flight,
                                    "t_send_rel_kill_s": round(o.t_send - t_kill, 2),
                                    "t_done_rel_kill_s": round(o.t_done - t_kill, 2)})
        report.failures_by_kind = dict(kinds)
        report.checks = checks(report)
        return report
    finally:
        if load is not None:
            load.stop()
        try:
            if ray.is_initialized():
                from ray import serve

                with contextlib.suppress(Exception):  # tearing down anyway
                    serve.shutdown()
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            sim.terminate()
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
            if not args.keep_logs:
                shutil.rmtree(temp_dir, ignore_errors=True)
            report.total_s = round(time.monotonic() - t0, 1)


def checks(report: Report) -> dict[str, bool]:
    """S5's promises, evaluated on the report (the integration test asserts the same)."""
    workers_with_predictors = {
        role for name in MODELS for role, n in report.replicas_before.get(name, {}).items() if n > 0
    }
    surviving = {"head", "worker1", "worker2"} - {report.killed}
    result = {
        "proxy_on_every_node": set(report.proxies_before) >= {"head", "worker1", "worker2"},
        "predictors_on_two_nodes": len(workers_with_predictors) >= 2,
        "served_through_three_proxies": sum(1 for n in report.served_by_proxy_before_kill.values() if n > 0) >= 3,
    }
    if report.killed:
        lost_in_flight = sum(report.in_flight_at_kill.values())
        result.update(
            {
                "every_failure_retryable": all(
                    (f["status"] is None and f["proxy"] == report.killed) or (f["status"], f["code"]) in RETRYABLE
                    for f in report.failures
                ),
                "failures_within_in_flight_at_kill": len(report.failures) <= lost_in_flight,
                "failures_only_around_the_kill": all(
                    f["in_flight_at_kill"] or f["t_send_rel_kill_s"] >= 0 for f in report.failures
                ),
                "replicas_back_on_survivors": all(
                    set(report.replicas_after.get(name, {})) <= surviving
                    and sum(report.replicas_after.get(name, {}).values()) == 2
                    for name in MODELS
                ),
                "served_after_recovery_by_survivors": all(
                    report.served_by_proxy_after_recovery.get(role, 0) > 0 for role in surviving
                ),
            }
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the report here as JSON")
    p.add_argument("--latency-ms", type=float, default=100.0, help="simulated LM latency (default 100)")
    p.add_argument("--per-proxy", type=int, default=2, help="closed-loop clients per proxy (default 2)")
    p.add_argument("--pre-kill-s", type=float, default=6.0, help="load before the kill (default 6)")
    p.add_argument("--post-recovery-s", type=float, default=5.0, help="load after recovery (default 5)")
    p.add_argument("--recovery-timeout-s", type=float, default=90.0, help="give up waiting for recovery (default 90)")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="do not kill a worker")
    p.add_argument("--keep-logs", action="store_true", help="keep the Ray session directory (its path is printed)")
    p.add_argument("--hold-s", type=float, default=0.0, help="keep the healthy cluster up this long before the load")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = json.dumps(asdict(report), indent=2)
    if args.json:
        args.json.write_text(text)
    summary = {k: v for k, v in asdict(report).items() if k != "failures"}
    print(json.dumps(summary, indent=2))
    return 0 if report.checks and all(report.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
