"""Session fixtures: one local Ray cluster with Serve, one LM simulator, one redis-server.

The cluster is started by ``ray.init(address="local")`` in this process (so nothing outside
the test session is touched and ``ray.shutdown`` stops it) with token auth disabled: every
port is on loopback and the ``serve`` CLI subprocesses must reach it (RAY_NOTES).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.serve_mode import isolated_env

from .harness import CANARY, CANARY_ENV, LMSim, RedisProcess, ServeCluster, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def cluster() -> Iterator[ServeCluster]:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ[CANARY_ENV] = CANARY  # inherited by every Ray worker started below
    # The suite runs on the serving mode serve_app ships (serve_app/serve_mode.py: Serve's
    # throughput-optimized mode with HAProxy in front of direct-ingress router replicas);
    # SERVE_APP_TEST_SERVE_MODE=proxy runs it on Serve's Python proxy instead. HAProxy's fixed
    # side ports move to free ones, so a `make run` cluster on this machine is no obstacle.
    env = isolated_env(os.environ.get("SERVE_APP_TEST_SERVE_MODE", "fast"), os.environ, free_port)
    os.environ.clear()
    os.environ.update(env)
    import ray
    from ray import serve

    dashboard_port, http_port, metrics_port = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="sa_ray_")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="EveryNode")
    info = ServeCluster(dashboard_port, http_port, metrics_port, env=dict(os.environ))
    try:
        yield info
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def lmsim() -> Iterator[LMSim]:
    sim = LMSim(latency_ms=20)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def sim(lmsim: LMSim) -> LMSim:
    """The session simulator, reset to healthy with an empty ledger."""
    lmsim.reset()
    return lmsim


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="sa_redis_"))
    proc = RedisProcess(workdir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_srv(redis_proc: RedisProcess) -> RedisProcess:
    """The session redis-server, running (restarted if a test killed it) and flushed."""
    if redis_proc.proc is None or redis_proc.proc.poll() is not None:
        redis_proc.start()
    redis_proc.sigcont()
    redis_proc.client().flushall()
    return redis_proc


@pytest.fixture(scope="session")
def http(cluster: ServeCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.base_url, timeout=30) as client:
        yield client
