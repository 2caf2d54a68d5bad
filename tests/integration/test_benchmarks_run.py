"""Benchmarks are not tests: here we only check that the cache benchmark runs end to end
(quick mode, its own Ray in a subprocess) and writes its result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO

pytestmark = pytest.mark.integration


def test_cache_benchmark_runs_in_quick_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cache_bench", "--quick", "--apps", "mem", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "cache.json").read_text())
    assert (tmp_path / "cache.md").read_text().startswith("# Cache benchmark")
    rows = data["rows"]
    assert rows, "no phases recorded"
    for row in rows:  # every phase ran without errors
        assert row["errors"] == 0, row
