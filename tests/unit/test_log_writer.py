"""The batched writer of Serve's buffered log lines, the prediction line, and the shape shortcut."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.http import _may_break_shape, _shape_problem
from serve_app.log_writer import SWITCH_ENV, BatchedLogWriter, batch_log_writes
from serve_app.logs import log_prediction

FMT = logging.Formatter("%(levelname)s %(message)s %(model)s")


def _serve_like(name: str, path: Path, max_bytes: int = 0, backups: int = 0,
                capacity: int = 1000) -> tuple[logging.Logger, logging.handlers.MemoryHandler]:
    """What Serve's ``configure_component_logger`` builds: a buffer over a rotating file."""
    target = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)
    target.setFormatter(FMT)
    memory = logging.handlers.MemoryHandler(capacity, flushLevel=logging.ERROR, target=target)
    log = logging.getLogger(name)
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(memory)
    return log, memory


@pytest.fixture
def cleanup() -> Iterator[list[logging.Logger]]:
    made: list[logging.Logger] = []
    yield made
    for log in made:
        for h in list(log.handlers):
            h.flush()
            getattr(h, "target", h).close()
            log.removeHandler(h)


def test_writes_what_the_stock_handler_writes(tmp_path: Path, cleanup: list[logging.Logger]) -> None:
    stock, _ = _serve_like("sa.test.stock", tmp_path / "stock.log", max_bytes=1 << 20, backups=2)
    batched, _ = _serve_like("sa.test.batched", tmp_path / "batched.log", max_bytes=1 << 20, backups=2)
    cleanup += [stock, batched]
    assert batch_log_writes(["sa.test.batched"]) == 1
    assert isinstance(batched.handlers[0], BatchedLogWriter)
    for log in (stock, batched):
        for i in range(50):
            log.info("line %d", i, extra={"model": f"m{i % 3}"})
        log.handlers[0].flush()
    stock_text = (tmp_path / "stock.log").read_text()
    assert stock_text.count("\n") == 50
    assert (tmp_path / "batched.log").read_text() == stock_text


def test_rolls_over_before_a_batch_that_would_pass_max_bytes(tmp_path: Path, cleanup: list[logging.Logger]) -> None:
    path = tmp_path / "r.log"
    log, _ = _serve_like("sa.test.roll", path, max_bytes=400, backups=50)
    cleanup.append(log)
    batch_log_writes(["sa.test.roll"])
    for batch in range(10):
        for i in range(5):
            log.info("batch %d line %d", batch, i, extra={"model": "qa"})
        log.handlers[0].flush()  # one batch of ~5 x 27 bytes
    files = sorted(tmp_path.glob("r.log*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) > 2  # it rolled over
    assert all(f.stat().st_size < 400 for f in files)  # no batch alone is over the limit here
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert lines == [f"INFO batch {b} line {i} qa" for b in range(10) for i in range(5)]  # each once, in order


def test_error_flushes_at_once_and_capacity_flushes(tmp_path: Path, cleanup: list[logging.Logger]) -> None:
    path = tmp_path / "e.log"
    log, _ = _serve_like("sa.test.err", path, capacity=3)
    cleanup.append(log)
    batch_log_writes(["sa.test.err"])
    log.info("a", extra={"model": "-"})
    assert path.read_text() == ""  # buffered
    log.error("boom", extra={"model": "-"})
    assert path.read_text() == "INFO a -\nERROR boom -\n"
    for msg in ("b", "c", "d"):
        log.info(msg, extra={"model": "-"})
    assert path.read_text().endswith("INFO d -\n")  # the third record filled the buffer


def test_swap_keeps_filters_level_and_buffered_records(tmp_path: Path, cleanup: list[logging.Logger]) -> None:
    path = tmp_path / "f.log"
    log, memory = _serve_like("sa.test.filters", path)
    cleanup.append(log)
    memory.addFilter(lambda r: r.getMessage() != "drop me")
    memory.setLevel(logging.INFO)
    log.info("before the swap", extra={"model": "-"})
    assert batch_log_writes(["sa.test.filters"]) == 1
    assert memory not in log.handlers and memory.buffer == []
    log.info("drop me", extra={"model": "-"})
    log.debug("too low", extra={"model": "-"})
    log.info("after", extra={"model": "-"})
    log.handlers[0].flush()
    assert path.read_text() == "INFO before the swap -\nINFO after -\n"
    assert batch_log_writes(["sa.test.filters"]) == 0  # already swapped


def test_a_record_that_fails_to_format_loses_only_itself(tmp_path: Path, cleanup: list[logging.Logger]) -> None:
    path = tmp_path / "bad.log"
    log, memory = _serve_like("sa.test.bad", path)
    cleanup.append(log)
    batch_log_writes(["sa.test.bad"])
    errors: list[logging.LogRecord] = []
    memory.target.handleError = errors.append  # type: ignore[method-assign, union-attr]
    log.info("good one", extra={"model": "-"})
    log.info("no model field")  # the formatter needs %(model)s: a KeyError
    log.info("good two", extra={"model": "-"})
    log.handlers[0].flush()
    assert path.read_text() == "INFO good one -\nINFO good two -\n"
    assert [r.getMessage() for r in errors] == ["no model field"]


def test_switch_off_and_other_targets_are_left_alone(tmp_path: Path, cleanup: list[logging.Logger],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    log, memory = _serve_like("sa.test.switch", tmp_path / "s.log")
    other = logging.handlers.MemoryHandler(10, target=logging.StreamHandler())
    log.addHandler(other)
    cleanup.append(log)
    monkeypatch.setenv(SWITCH_ENV, "0")
    assert batch_log_writes(["sa.test.switch"]) == 0
    monkeypatch.delenv(SWITCH_ENV)
    assert batch_log_writes(["sa.test.switch"]) == 1
    assert other in log.handlers and memory not in log.handlers


def test_prediction_line_names_its_function_and_drops_empty_fields() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("ray.serve")
    keep, level = Keep(), log.level
    log.addHandler(keep)
    log.setLevel(logging.INFO)
    try:
        log_prediction(request_id="r1", model="qa", cost_usd=None, latency_ms=1.5)
        log.setLevel(logging.WARNING)
        log_prediction(request_id="r2", model="qa")  # below the level: no record is made
    finally:
        log.removeHandler(keep)
        log.setLevel(level)
    assert len(records) == 1
    record = records[0]
    assert record.getMessage() == "prediction" and record.levelno == logging.INFO
    assert record.funcName == "log_prediction" and record.pathname.endswith("logs.py")
    assert (record.request_id, record.model, record.latency_ms) == ("r1", "qa", 1.5)  # type: ignore[attr-defined]
    assert not hasattr(record, "cost_usd")


@pytest.mark.parametrize("raw", [
    b'{"model": "qa", "inputs": {"question": "what is 2+2?"}}',
    b'{"model": "qa", "inputs": {"question": "' + b"[" * 40 + b'"}}',  # brackets inside a string
    b'{"a": ' * 33 + b"1" + b"}" * 33,
    b'{"model": "qa", "inputs": {"question": "' + b"x" * 100 + b'"}}',
])
def test_the_shape_shortcut_never_hides_a_problem(raw: bytes) -> None:
    import json

    data = json.loads(raw)
    for max_depth, max_string in [(32, 1 << 62), (32, 50), (2, 1 << 62), (40, 99)]:
        if _shape_problem(data, max_depth, max_string) is not None:
            assert _may_break_shape(raw, max_depth, max_string)


def test_a_small_ordinary_body_skips_the_walk() -> None:
    assert not _may_break_shape(b'{"model": "qa", "inputs": {"question": "hi"}}', 32, 1 << 62)
    assert _may_break_shape(b'{"model": "qa", "inputs": {"question": "hi"}}', 1, 1 << 62)
    assert _may_break_shape(b'{"model": "qa", "inputs": {"question": "hi"}}', 32, 10)


def test_router_hit_cpu_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks.router_hit_cpu`` answers every hit and reports both variants (Serve's
    logger is restored afterwards: the benchmark configures it as a replica would)."""
    import json

    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    from benchmarks import router_hit_cpu

    log = logging.getLogger("ray.serve")
    saved = (list(log.handlers), log.propagate, log.level)
    try:
        assert router_hit_cpu.main(["--out", str(tmp_path), "--rounds", "1", "--requests", "20"]) == 0
    finally:
        for h in list(log.handlers):
            h.flush()
            log.removeHandler(h)
        for h in saved[0]:
            log.addHandler(h)
        log.propagate, log.level = saved[1], saved[2]
    result = json.loads((tmp_path / "router_hit_cpu.json").read_text())
    assert {(r["variant"], r["swapped"]) for r in result["rounds"]} == {("batched", 1), ("stock", 0)}
    assert all(r["us_per_hit"] > 0 for r in result["rounds"])
    assert "| batched |" in (tmp_path / "router_hit_cpu.md").read_text()


def test_our_json_response_is_starlettes_byte_for_byte() -> None:
    from starlette.responses import JSONResponse as StarletteJSONResponse

    from serve_app.http import JSONResponse

    content = {"b": "é 日本", "a": [1, 2.5, None, True], "nested": {"z": "\u2028"}, "n": 10**20}
    ours, theirs = JSONResponse(content, headers={"X-A": "1"}), StarletteJSONResponse(content, headers={"X-A": "1"})
    assert ours.body == theirs.body and ours.raw_headers == theirs.raw_headers
    with pytest.raises(ValueError):  # NaN is refused, as Starlette refuses it
        JSONResponse({"x": float("nan")})


@pytest.mark.parametrize("text", ["Authorization: BEARER abcdefgh12345678", "API-KEY=abcd1234efgh",
                                  "PassWord=hunter2hunter2", "redis://user:PaSs1234@host:6379", "SK-abcdefgh12345678"])
def test_the_secret_trigger_ignores_case(text: str) -> None:
    from serve_app.logs import _triggered, mask

    assert _triggered(text) and _triggered(text.swapcase())
    assert not _triggered("prediction qa default ok HIT-MEMORY anonymous")
    if not text.startswith("SK-"):  # keys are "sk-" (lower case) by shape; the rest by keyword
        assert mask(text) != text


def _formatted_by(formatter: logging.Formatter) -> tuple[logging.Logger, list[str], Iterator[None]]:
    """``ray.serve`` with one handler using ``formatter`` (what a replica's file handler uses)."""
    import io

    log = logging.getLogger("ray.serve")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    saved = (log.handlers[:], log.level, log.propagate)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    lines: list[str] = []

    def restore() -> Iterator[None]:
        yield
        handler.flush()
        lines.extend(stream.getvalue().splitlines())
        log.handlers[:], level, log.propagate = saved[0], saved[1], saved[2]
        log.setLevel(level)

    return log, lines, restore()


def test_text_lines_show_the_prediction_fields_and_json_lines_keep_them_as_keys() -> None:
    import json

    from ray._common.formatters import JSONFormatter
    from ray.serve._private.logging_utils import ServeFormatter

    from serve_app.logs import SecretMask, install_prediction_text

    fields = {"request_id": "r1", "model": "qa", "variant": "default", "cache": "HIT-MEMORY", "outcome": "ok",
              "latency_ms": 0.412, "input_tokens": 0, "output_tokens": 0, "cost_usd": None,
              "served_by": "sk-proj-AbCdEf0123456789",  # key-shaped: the mask must still see it
              "api_key": "team-a"}  # the key's id: shown as key_id, which the mask leaves alone
    text_log, text_lines, done = _formatted_by(ServeFormatter("Router", "r"))
    next(done)
    assert install_prediction_text() == 1 and install_prediction_text() == 1  # idempotent
    text_log.handlers[0].addFilter(SecretMask([]))  # as in a replica: the mask after, on the finished text
    log_prediction(**fields)
    text_log.info("replica started")
    next(done, None)
    assert len(text_lines) == 2
    assert text_lines[0].endswith("-- prediction model=qa variant=default served_by=*** cache=HIT-MEMORY outcome=ok "
                                  "latency_ms=0.412 input_tokens=0 output_tokens=0 key_id=team-a")
    assert "r1" in text_lines[0] and "cost_usd" not in text_lines[0] and "AbCdEf" not in text_lines[0]
    assert text_lines[1].endswith("-- replica started")

    _, json_lines, done = _formatted_by(JSONFormatter())
    next(done)
    assert install_prediction_text() == 0  # JSON lines carry the fields as keys already
    log_prediction(**fields)
    next(done, None)
    record = json.loads(json_lines[0])
    assert record["message"] == "prediction" and record["model"] == "qa" and record["latency_ms"] == 0.412
