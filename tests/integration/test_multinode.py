"""S5: several Ray nodes on one machine, one worker node killed under load.

The scenario is ``cluster/local_multinode.py`` (the script a user runs), started here in its own
process: it builds its own three-node cluster (head with no CPUs + two workers, each worker's
Serve proxy on its own port), so it shares nothing with the session cluster of ``conftest.py``
and this module requests none of its fixtures. The script writes a JSON report; the assertions
below are RELIABILITY S5's promises on that report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local_multinode.py"
RETRYABLE = {(502, "upstream_error"), (503, "overloaded"), (503, "circuit_open"), (504, "upstream_timeout")}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False,
    )
    if not out.exists():
        pytest.fail(f"multinode scenario wrote no report (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in data.items() if k != "failures"}, indent=2))  # shown with -s / on failure
    return data


@pytest.mark.timeout(480)
def test_proxies_and_replicas_span_nodes(report: dict[str, Any]) -> None:
    assert set(report["proxies_before"]) >= {"head", "worker1", "worker2"}, report["proxies_before"]
    for model in ("qa", "classify"):
        placed = report["replicas_before"][model]
        assert set(placed) == {"worker1", "worker2"}, f"{model}: {placed}"  # spread, none on the CPU-less head
    served = report["served_by_proxy_before_kill"]
    assert all(served.get(role, 0) > 0 for role in ("head", "worker1", "worker2")), served


@pytest.mark.timeout(480)
def test_worker_killed_under_load_loses_only_its_in_flight_requests(report: dict[str, Any]) -> None:
    assert report["killed"] == "worker1"
    failures = report["failures"]
    in_flight = sum(report["in_flight_at_kill"].values())
    assert len(failures) <= in_flight, (failures, report["in_flight_at_kill"])
    for f in failures:
        # Only requests in flight at the kill (or sent in the instant after it) may fail, and each
        # is either a transport error on the killed node's own proxy, or one of our retryable codes.
        assert f["in_flight_at_kill"] or f["t_send_rel_kill_s"] >= 0, f
        if f["status"] is None:
            assert f["proxy"] == "worker1", f
        else:
            assert (f["status"], f["code"]) in RETRYABLE, f
    assert report["requests_ok"] >= report["requests_total"] - len(failures)


@pytest.mark.timeout(480)
def test_replicas_come_back_on_the_surviving_nodes(report: dict[str, Any]) -> None:
    assert report["recovery_s"] is not None and report["recovery_s"] <= 60, report["recovery_s"]
    for model in ("qa", "classify"):
        after = report["replicas_after"][model]
        assert set(after) <= {"head", "worker2"} and sum(after.values()) == 2, f"{model}: {after}"
    served = report["served_by_proxy_after_recovery"]
    assert served.get("head", 0) > 0 and served.get("worker2", 0) > 0, served
    assert all(report["checks"].values()), report["checks"]
