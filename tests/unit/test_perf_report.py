"""perf_bench's report: phases run under heavy host CPU steal are named, and a report can be
rewritten from its JSON without running anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.perf_bench import main, noisy_phases

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_noisy_phases_names_each_phase_over_the_threshold() -> None:
    systems = {
        "ours": {"miss": {"c1": {"machine_steal_frac": 0.28}, "c64": {"machine_steal_frac": 0.01},
                          "sweep": {"rows": [{"rate": 25.0, "machine_steal_frac": 0.12},
                                             {"rate": 50.0, "machine_steal_frac": None}]}}},
        "peer-1w": {"lm1s": {"c200": {"machine_steal_frac": 0.5}}, "idle": {"cores": 0.1}},
    }
    assert noisy_phases(systems) == [("ours", "miss/c1", 0.28), ("ours", "miss/sweep/rows[25.0]", 0.12),
                                     ("peer-1w", "lm1s/c200", 0.5)]
    assert noisy_phases(systems, threshold=0.3) == [("peer-1w", "lm1s/c200", 0.5)]
    assert noisy_phases({"ours": {}}) == []


def test_rerender_rewrites_the_markdown_from_the_json(tmp_path: Path) -> None:
    shutil.copy(RESULTS / "perf.json", tmp_path / "perf.json")
    assert main(["--rerender", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "perf.md").read_text()
    assert text.startswith("# Performance benchmark")
    assert "## Targets" in text and "host CPU steal" in text
    assert json.loads((tmp_path / "perf.json").read_text())  # the JSON is left as it was


def test_rerender_without_a_json_says_so(tmp_path: Path) -> None:
    assert main(["--rerender", "--out", str(tmp_path)]) == 2
