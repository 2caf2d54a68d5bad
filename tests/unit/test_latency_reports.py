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


WRK_REPORT = """Running 10s test @ http://127.0.0.1:8000/ours/v1/predict
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    28.10ms    5.02ms  80.11ms   90.00%
    Req/Sec     2.30k   150.00     2.50k    70.00%
  22871 requests in 10.01s, 9.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   2284.84
Transfer/sec:      0.91MB
"""


def test_wrk_report_parses_rate_and_counts_every_failure() -> None:
    from benchmarks.ingress_floor import parse_wrk

    assert parse_wrk(WRK_REPORT) == {"rps": 2284.84, "ok": 22871 - 7, "errors": 7}
    clean = WRK_REPORT.replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "").replace(
        "  Non-2xx or 3xx responses: 4\n", "")
    assert parse_wrk(clean)["errors"] == 0
    with pytest.raises(ValueError, match="not a wrk report"):
        parse_wrk("unable to connect to 127.0.0.1:8000 Connection refused")


def test_wrk_script_carries_each_body_verbatim() -> None:
    from benchmarks.ingress_floor import _body, wrk_script

    script = wrk_script([_body(0), {"model": "qa", "inputs": {"question": 'a "quoted" \\ text'}}])
    assert 'bodies[1] = [==[{"model": "qa", "inputs": {"question": "floor question 0:' in script
    assert 'bodies[2] = [==[{"model": "qa", "inputs": {"question": "a \\"quoted\\" \\\\ text"}}]==]' in script
    assert "request = function()" in script


def test_ingress_floor_table_divides_by_the_peer_of_the_same_round_and_load_generator() -> None:
    from benchmarks.ingress_floor import summarize as floor_summary

    def row(app: str, rps: float, rnd: int, cpu: float = 0.3, errors: int = 0, steal: float = 0.01,
            driver: str = "loadgen") -> dict[str, object]:
        return {"app": app, "driver": driver, "round": rnd, "rps": rps, "ingress_cpu_ms_per_req": cpu,
                "machine_busy": 0.8, "errors": errors, "steal": steal}

    rows = [row("plain", 2000, 0), row("peer-1w", 200, 0),  # 10x
            row("plain", 2400, 1, cpu=0.28), row("peer-1w", 200, 1),  # 12x
            row("plain", 1100, 2, cpu=0.5, errors=1, steal=0.5), row("peer-1w", 100, 2, steal=0.5),  # 11x
            row("ours", 1000, 0), row("ours", 2000, 0, driver="wrk"), row("peer-1w", 250, 0, driver="wrk")]
    lines = floor_summary(rows, ["loadgen", "wrk"]).splitlines()
    plain = next(line for line in lines if "| plain |" in line)
    # req/s median 2,000; ratio median of 10, 12, 11 (not 2,000 / median peer 200 = 10)
    assert "| 2,000.0 | 11.0x |" in plain and "0.300" in plain and "| 1 |" in plain and "0.500" in plain
    assert "| 5.0x |" in next(line for line in lines if line.startswith("| loadgen | ours |"))
    assert "| 8.0x |" in next(line for line in lines if line.startswith("| wrk | ours |"))
    assert "| 1.0x |" in next(line for line in lines if line.startswith("| wrk | peer-1w |"))
    assert not any("| starlette |" in line for line in lines)


def test_peer_wrk_script_sends_a_new_question_each_time() -> None:
    from benchmarks.ingress_floor import peer_wrk_script

    script = peer_wrk_script("abc123")
    assert "peer floor abc123 #' .. n .. '" in script and "n = n + 1" in script
    with pytest.raises(ValueError):
        peer_wrk_script("x' .. os.exit() .. '")
