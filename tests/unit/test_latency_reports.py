"""The one-connection benchmarks' report helpers: Server-Timing parsing and the tables."""

from __future__ import annotations

import pytest

from benchmarks.hop_latency import summarize as hop_summary
from benchmarks.server_timing import _timing
from benchmarks.server_timing import summarize as timing_summary


def test_server_timing_header_parses_into_named_durations() -> None:
    assert _timing("cache;dur=2.9, predictor;dur=57.5, program;dur=54.2, total;dur=60.6") == {
        "cache": 2.9, "predictor": 57.5, "program": 54.2, "total": 60.6}
    assert _timing("") == {}
    assert _timing("total;dur=0.6, odd") == {"total": 0.6}


def _row(cell: str, table: str) -> float:
    line = next(line for line in table.splitlines() if line.startswith(f"| {cell}"))
    return float(line.rsplit("|", 2)[1])


def test_server_timing_table_derives_the_hops_from_the_parts() -> None:
    rounds = [{"p50_ms": {"client": 64.0, "cache": 3.0, "predictor": 58.0, "program": 54.0, "total": 61.5,
                          "health": 1.0, "hit": 1.5}, "steal": 0.01}]
    table = timing_summary(rounds, 50.0)
    assert _row("miss, over the LM", table) == 14.0
    assert _row("Router → predictor hop", table) == 4.0
    assert _row("program in the predictor replica", table) == 4.0
    assert _row("rest of the router core", table) == 0.5
    assert _row("outside the router core", table) == 2.5
    assert "0.010" in table


def test_hop_latency_table_takes_medians_over_rounds() -> None:
    def r(b2b: float, idle: float, steal: float) -> dict[str, object]:
        kinds = {"noop": {"back to back": b2b, "after idle": idle},
                 "Cache.get_many via HopBatcher": {"back to back": b2b + 0.1, "after idle": idle + 0.1}}
        return {"p50_ms": kinds, "steal": steal}

    table = hop_summary([r(1.0, 3.0, 0.0), r(2.0, 5.0, 0.1), r(1.5, 4.0, 0.0)], 50.0)
    noop = next(line for line in table.splitlines() if line.startswith("| noop"))
    assert [c.strip() for c in noop.split("|")[2:5]] == ["1.50", "4.00", "+2.50"]
    assert "after 50 ms idle" in table and "0.000, 0.100, 0.000" in table


def test_steal_window_is_the_share_of_cpu_time_stolen_in_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import procstat

    readings = iter([(10.0, (5.0, 100.0)), (13.0, (20.0, 120.0))])
    current: dict[str, tuple[float, tuple[float, float]]] = {}

    def advance() -> None:
        current["now"] = next(readings)

    monkeypatch.setattr(procstat, "machine_steal", lambda: current["now"][0])
    monkeypatch.setattr(procstat, "machine_busy", lambda: current["now"][1])
    advance()
    window = procstat.StealWindow()
    advance()
    assert window.fraction() == 0.15  # 3 s stolen of 20 s of CPU time
    still = procstat.StealWindow()
    assert still.fraction() == 0.0  # no time passed
