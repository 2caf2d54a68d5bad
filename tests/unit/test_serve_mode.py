"""Serve's serving mode (serve_app/serve_mode.py): one set of variables, set everywhere a
cluster starts (Makefile, KubeRay pods, test and benchmark clusters)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from serve_app.serve_mode import FAST, MODES, PROXY, isolated_env, mode_env

REPO = Path(__file__).resolve().parents[2]


def test_fast_is_throughput_optimized_with_haproxy_and_proxy_is_serves_default() -> None:
    assert dict(FAST) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert dict(PROXY) == {}
    assert set(MODES) == {"fast", "proxy"}


def test_mode_env_sets_one_mode_and_removes_the_others_variables() -> None:
    base = {"PATH": "/bin", "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": "9999"}
    assert mode_env("proxy", base) == {"PATH": "/bin"}
    assert mode_env("fast", {"PATH": "/bin"}) == {"PATH": "/bin", **FAST}
    assert base["RAY_SERVE_HAPROXY_STATS_PORT"] == "9999"  # the input is not changed
    with pytest.raises(ValueError, match="fast, proxy"):
        mode_env("turbo", base)


def test_isolated_env_moves_haproxys_fixed_side_ports_in_the_fast_mode_only() -> None:
    ports = itertools.count(41000)
    env = isolated_env("fast", {"PATH": "/bin"}, lambda: next(ports))
    assert env == {"PATH": "/bin", **FAST, "RAY_SERVE_HAPROXY_METRICS_PORT": "41000",
                   "RAY_SERVE_HAPROXY_STATS_PORT": "41001"}
    assert isolated_env("proxy", env, lambda: next(ports)) == {"PATH": "/bin"}
    with pytest.raises(ValueError):
        isolated_env("turbo", env, lambda: next(ports))


def test_make_run_starts_ray_in_the_fast_mode_by_default() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^SERVE_MODE \?= fast$", makefile, re.M)
    fast_line = re.search(r"^SERVE_ENV_fast := (.*)$", makefile, re.M)
    assert fast_line and dict(kv.split("=", 1) for kv in fast_line.group(1).split()) == dict(FAST)
    assert "env $(SERVE_ENV_$(SERVE_MODE)) $(BIN)/ray start" in makefile


@pytest.mark.parametrize(("given", "seen"), [(None, "disabled"), ("token", "token")])
def test_make_gives_every_ray_command_one_auth_mode(given: str | None, seen: str) -> None:
    """Ray 2.60 turns token auth on once ~/.ray/auth_token exists; `make run` then failed at
    `serve deploy` unless every ray/serve process agreed on the mode. The Makefile exports it
    (disabled unless the caller sets it) to every recipe."""
    import os
    import shutil
    import subprocess

    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if given is not None:
        env["RAY_AUTH_MODE"] = given
    probe = 'print-auth-mode:\n\t@echo "$$RAY_AUTH_MODE"\n'
    out = subprocess.run([make, "-s", "--no-print-directory", "-f", "Makefile", "-f", "-", "print-auth-mode"],
                         input=probe, cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == seen


@pytest.mark.parametrize("manifest", ["cluster/base/rayservice.yaml", "cluster/templates/rayservice.yaml"])
def test_every_kuberay_pod_starts_in_the_fast_mode(manifest: str) -> None:
    rs = next(d for d in yaml.safe_load_all((REPO / manifest).read_text()) if d and d.get("kind") == "RayService")
    spec = rs["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in FAST} == dict(FAST), container["name"]
