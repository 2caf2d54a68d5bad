"""Tokens and dollars per module, the cost book, secret masking, /config redaction, metrics."""

from __future__ import annotations

import logging
import logging.handlers
import math
import time
from collections.abc import Mapping
from typing import Any

import pytest

from serve_app.breaker import State
from serve_app.config import LMConfig, ModelConfig
from serve_app.costs import CostBook
from serve_app.errors import UpstreamError
from serve_app.logs import LogFlusher, SecretMask, flush_buffered_logs, install_secret_mask, mask
from serve_app.metrics import Counters
from serve_app.predictor import PredictorCore
from serve_app.usage import Prices, resolve_prices

from .conftest import FakeClock, SimLM, app_args

PRICED = {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}


def _core(sim_lm: SimLM, name: str, program: str, counters: Counters, **lm: Any) -> PredictorCore:
    model = ModelConfig(name=name, program=program, lm=LMConfig(model=f"openai/sim-{name}", timeout_s=1.0, **lm),
                        timeout_s=2.0)
    return PredictorCore(model, lm=sim_lm, counters=counters)


async def test_pipeline_usage_is_attributed_to_each_stage_and_priced(sim_lm: SimLM) -> None:
    counters = Counters()
    core = _core(sim_lm, "pipeline", "serve_app.examples:build_pipeline", counters, **PRICED)
    payload = await core.predict({"document": "Ray Serve scales DSPy programs."})
    usage = payload["usage"]
    (s_in, s_out), (e_in, e_out) = sim_lm.usage_log  # summarize, then extract
    assert usage["by_module"]["summarize"]["input_tokens"] == s_in
    assert usage["by_module"]["extract"]["output_tokens"] == e_out
    assert {m["calls"] for m in usage["by_module"].values()} == {1}
    assert usage["input_tokens"] == s_in + e_in and usage["output_tokens"] == s_out + e_out
    assert math.isclose(usage["cost_usd"], ((s_in + e_in) * 0.15 + (s_out + e_out) * 0.60) / 1e6)
    assert math.isclose(sum(m["cost_usd"] for m in usage["by_module"].values()), usage["cost_usd"])
    # The same numbers go to the metrics families.
    assert counters.get("tokens", model="pipeline", variant="default", type="input") == s_in + e_in
    assert math.isclose(counters.get("cost_usd", model="pipeline", variant="default"), usage["cost_usd"])
    assert counters.get("active_predictions", model="pipeline") == 0


async def test_unknown_price_is_none_not_zero(sim_lm: SimLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serve_app.predictor.resolve_prices", lambda lm: None)
    counters = Counters()
    core = _core(sim_lm, "qa", "serve_app.examples:build_qa", counters)
    payload = await core.predict({"question": "x"})
    assert payload["usage"]["cost_usd"] is None
    assert counters.total("cost_usd") == 0  # nothing booked as if it were free


def test_prices_from_config_and_from_litellm_table() -> None:
    assert resolve_prices(LMConfig(model="openai/x", **PRICED)) == Prices(0.15, 0.60, "config")
    table = resolve_prices(LMConfig(model="openai/gpt-4o-mini"))  # litellm's offline copy
    assert table is not None and table.source == "litellm" and table.input_usd_per_mtok > 0
    assert resolve_prices(LMConfig(model="openai/no-such-model-anywhere")) is None


async def test_breaker_state_gauge_follows_transitions(sim_lm: SimLM) -> None:
    counters = Counters()
    core = _core(sim_lm, "qa", "serve_app.examples:build_qa", counters)
    assert counters.get("breaker_state", model="qa") == State.CLOSED
    core.breaker.acquire().failure(retry_after_s=10.0)  # a provider Retry-After forces it open
    assert counters.get("breaker_state", model="qa") == State.OPEN


class FakeHashStore:
    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, float]] = {}
        self.ttls: dict[str, float] = {}
        self.down = False

    async def hincr_many(self, increments: Mapping[str, Mapping[str, float]], ttl_s: Mapping[str, float]) -> bool:
        if self.down:
            return False
        for key, fields in increments.items():
            h = self.hashes.setdefault(key, {})
            for f, v in fields.items():
                h[f] = h.get(f, 0.0) + v
        self.ttls.update(ttl_s)
        return True

    async def hgetall(self, key: str) -> dict[str, float] | None:
        return None if self.down else dict(self.hashes.get(key, {}))


USAGE = {"input_tokens": 100, "output_tokens": 20, "cost_usd": 0.0000270,
         "by_module": {"summarize": {"input_tokens": 60, "output_tokens": 10, "cost_usd": 0.000015, "calls": 1}}}


async def test_cost_book_is_cluster_wide_through_the_shared_store() -> None:
    store = FakeHashStore()
    day0 = 1_795_305_600.0  # 2026-11-22T00:00:00Z
    a = CostBook("svc", store, wall=lambda: day0 + 10)
    b = CostBook("svc", store, wall=lambda: day0 + 20)  # another replica
    await a.record("pipeline", "default", USAGE)
    await b.record("pipeline", "default", USAGE)
    report = await a.report()
    assert report["scope"] == "cluster" and report["day"] == "2026-11-22"
    slot = report["today"]["pipeline"]["default"]
    assert slot["requests"] == 2 and slot["input_tokens"] == 200 and math.isclose(slot["cost_usd"], 0.000054)
    assert slot["modules"]["summarize"]["input_tokens"] == 120
    assert store.ttls == {"svc:costs:day:2026-11-22": 8 * 86_400, "svc:costs:total": 400 * 86_400}


async def test_cost_book_falls_back_to_this_replica_and_says_so() -> None:
    store = FakeHashStore()
    book = CostBook("svc", store)
    store.down = True
    await book.record("qa", "default", USAGE)
    report = await book.report()
    assert report["scope"] == "replica (shared store unavailable)"
    assert report["total"]["qa"]["default"]["requests"] == 1
    local = CostBook("svc", None)
    await local.record("qa", "default", USAGE)
    assert (await local.report())["scope"] == "replica"


async def test_cost_book_day_rolls_over() -> None:
    clock = FakeClock(1_795_305_600.0 + 86_000)
    book = CostBook("svc", None, wall=clock)
    await book.record("qa", "default", USAGE)
    clock.advance(1_000)  # next UTC day
    await book.record("qa", "default", USAGE)
    report = await book.report()
    assert report["total"]["qa"]["default"]["requests"] == 2
    assert report["today"]["qa"]["default"]["requests"] == 1


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("calling with key sk-proj-AbCdEf0123456789", "sk-proj-AbCdEf0123456789"),
        ("headers={'Authorization': 'Bearer abcdefghijklmnop'}", "abcdefghijklmnop"),
        ('{"api_key": "hunter2hunter2"}', "hunter2hunter2"),
        ("redis://user:s3cretpw@redis:6379/0", "s3cretpw"),
        ("x-api-key=zzzz1234yyyy", "zzzz1234yyyy"),
    ],
)
def test_mask_hides_key_shaped_values(text: str, secret: str) -> None:
    assert secret not in mask(text)


@pytest.mark.parametrize("text", [
    "prediction", "GET /v1/models 200 1.2ms", "TOKEN: abcd1234efgh", "Password=hunter2hunter2",
    "ApiKey: zzzz1234yyyy", "AUTHORIZATION=Basic dXNlcjpwYXNzd29yZA==", "rediss://u:pw12345@h:6380/1",
    "sk-ABCDEFGH12345678 and bearer abcdefghijkl", "no secrets: sk_ nor api key", "secret_name=value-1234",
])
def test_the_fast_path_skips_only_lines_no_pattern_could_match(text: str) -> None:
    from serve_app import logs

    full = logs._PATTERNS[0].sub(logs.MASK, text)
    full = logs._PATTERNS[1].sub(logs.MASK, full)
    full = logs._PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{logs.MASK}", full)
    full = logs._PATTERNS[3].sub(lambda m: f"{m.group(1)}{logs.MASK}{m.group(3)}", full)
    assert mask(text) == full


def test_secret_mask_filter_covers_message_args_extras_and_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    literal = "plain-looking-secret-value"
    log = logging.getLogger("serve_app.test.mask")
    handler = logging.Handler()
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(SecretMask([literal]))
    log.addHandler(handler)
    try:
        log.warning("key %s in args", literal, extra={"detail": f"extra {literal}"})
        try:
            raise UpstreamError(f"provider said {literal}")
        except UpstreamError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    assert len(records) == 2
    for record in records:
        assert literal not in record.getMessage()
        assert literal not in str(getattr(record, "detail", ""))
        assert literal not in (record.exc_text or "")


def test_secret_mask_finds_a_secret_in_any_one_field_of_an_otherwise_clean_line() -> None:
    literal = "plain-looking-secret-value"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(SecretMask([literal]))
    log = logging.getLogger("serve_app.test.mask_fields")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.info("prediction", extra={"model": "qa", "request_id": "sk-proj-AbCdEf0123456789"})
        log.info("prediction", extra={"model": "qa", "request_id": literal})
        log.info("prediction", extra={"model": "qa", "request_id": "abc123", "n": 3})
    finally:
        log.removeHandler(handler)
    assert [r.request_id for r in records] == ["***", "***", "abc123"]  # type: ignore[attr-defined]
    assert all(r.model == "qa" and r.getMessage() == "prediction" for r in records)  # type: ignore[attr-defined]
    assert records[2].n == 3  # type: ignore[attr-defined]


def test_install_secret_mask_is_idempotent() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        install_secret_mask(["aaaa-secret"])
        install_secret_mask(["bbbb-secret"])
        masks = [f for f in handler.filters if isinstance(f, SecretMask)]
        assert len(masks) == 1
    finally:
        root.removeHandler(handler)


def test_public_view_is_an_allow_list_without_secrets() -> None:
    args = app_args(cache={"redis": {"url_env": "CACHE_REDIS_URL"}})
    view = args.public_view()
    assert view["cache"]["redis"] == {"configured": True, "url_env": "CACHE_REDIS_URL", "url_set_in_config": False}
    assert set(view["models"][0]["lm"]) >= {"model", "api_key_env", "temperature"}
    assert "redis_url" not in str(view)
    assert args.secret_env_names() == ["CACHE_REDIS_URL"]


def test_counters_gauges_and_histograms_reach_the_sink() -> None:
    seen: list[tuple[str, str, dict[str, str], float]] = []
    counters = Counters(sink=lambda kind, name, labels, value: seen.append((kind, name, labels, value)))
    counters.set_gauge("breaker_state", 2.0, model="qa")
    counters.observe("prediction_latency_ms", 12.5, model="qa", variant="default")
    counters.observe("prediction_latency_ms", 7.5, model="qa", variant="default")
    assert counters.get("breaker_state", model="qa") == 2.0
    assert counters.get("prediction_latency_ms_count", model="qa", variant="default") == 2
    assert counters.get("prediction_latency_ms_sum", model="qa", variant="default") == 20.0
    assert [s[0] for s in seen] == ["gauge", "histogram", "histogram"]


def test_a_failing_sink_never_fails_the_caller() -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("exporter down")

    counters = Counters(sink=broken)
    counters.inc("predictions", model="qa")
    counters.set_gauge("breaker_state", 1.0, model="qa")
    assert counters.get("predictions", model="qa") == 1
    assert counters.get("metrics_errors") == 2


def test_ray_sink_aggregates_counters_and_gauges_between_flushes() -> None:
    from serve_app.metrics import RaySink

    class FakeMetric:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, dict[str, str]]] = []

        def inc(self, value: float, tags: dict[str, str]) -> None:
            self.calls.append(("inc", value, tags))

        def set(self, value: float, tags: dict[str, str]) -> None:
            self.calls.append(("set", value, tags))

        def observe(self, value: float, tags: dict[str, str]) -> None:
            self.calls.append(("observe", value, tags))

    now = [0.0]
    sink = RaySink(flush_s=3600, clock=lambda: now[0])
    fakes: dict[str, FakeMetric] = {}
    sink._metric = lambda name: fakes.setdefault(name, FakeMetric())  # type: ignore[method-assign]
    labels = {"model": "qa", "variant": "a", "outcome": "ok", "cache": "MISS"}
    for _ in range(5):
        sink("counter", "predictions", labels, 1.0)
    sink("gauge", "active_predictions", {"model": "qa"}, 3.0)
    sink("gauge", "active_predictions", {"model": "qa"}, 0.0)
    sink("histogram", "prediction_latency_ms", {"model": "qa", "variant": "a"}, 12.0)
    sink("counter", "not_exported", {}, 1.0)
    # Histograms go straight through; counters and gauges wait for the flush.
    assert [c[0] for f in fakes.values() for c in f.calls] == ["observe"]
    sink.flush()
    assert fakes["predictions"].calls == [("inc", 5.0, labels)]
    assert fakes["active_predictions"].calls == [("set", 0.0, {"model": "qa"})]
    assert "not_exported" not in fakes
    # Past flush_s, an event flushes inline.
    sink("counter", "predictions", labels, 1.0)
    now[0] = 4000.0
    sink("counter", "predictions", labels, 1.0)
    assert fakes["predictions"].calls[-1] == ("inc", 2.0, labels)


def test_series_are_the_same_whatever_the_label_order_and_past_the_memo() -> None:
    """Counters and RaySink remember each label set's key (the hit path's metrics cost); the
    order of keyword labels must not split a series, and label sets past the memo's bound are
    still counted, each under its own key."""
    from serve_app import metrics
    from serve_app.metrics import RaySink

    counters = Counters()
    counters.inc("predictions", model="qa", variant="a", outcome="ok", cache="MISS")
    counters.inc("predictions", cache="MISS", outcome="ok", variant="a", model="qa")
    counters.observe("prediction_latency_ms", 3.0, variant="a", model="qa")
    counters.observe("prediction_latency_ms", 4.0, model="qa", variant="a")
    assert counters.get("predictions", model="qa", variant="a", outcome="ok", cache="MISS") == 2
    assert counters.get("prediction_latency_ms_sum", model="qa", variant="a") == 7.0
    for i in range(metrics._MAX_MEMO + 10):
        counters.inc("errors", model=f"m{i}", code="internal")
    assert counters.get("errors", model=f"m{metrics._MAX_MEMO + 5}", code="internal") == 1
    assert counters.total("errors") == metrics._MAX_MEMO + 10

    flushed: list[tuple[float, dict[str, str]]] = []
    observed: list[dict[str, str]] = []

    class FakeMetric:
        def inc(self, value: float, tags: dict[str, str]) -> None:
            flushed.append((value, tags))

        def observe(self, value: float, tags: dict[str, str]) -> None:
            observed.append(dict(tags))  # as given, before Serve's histogram adds the route
            tags["route"] = "/v1/predict"  # Serve's histogram adds the route to the dict it gets

    sink = RaySink(flush_s=3600)
    sink._metric = lambda name: FakeMetric()  # type: ignore[method-assign]
    sink("counter", "predictions", {"model": "qa", "variant": "a", "outcome": "ok", "cache": "MISS"}, 1.0)
    sink("counter", "predictions", {"cache": "MISS", "outcome": "ok", "variant": "a", "model": "qa"}, 1.0)
    sink("histogram", "prediction_latency_ms", {"model": "qa", "variant": "a"}, 1.0)
    sink("histogram", "prediction_latency_ms", {"model": "qa", "variant": "a"}, 2.0)
    sink.flush()
    assert flushed == [(2.0, {"model": "qa", "variant": "a", "outcome": "ok", "cache": "MISS"})]
    assert observed == [{"model": "qa", "variant": "a"}] * 2  # one call's route never leaks into the next


def _buffered(logger_name: str) -> tuple[logging.Logger, logging.handlers.MemoryHandler, list[str]]:
    """A logger with Serve's throughput-optimized shape: a MemoryHandler of 1,000 records,
    flushed only when full or on ERROR, in front of the handler that writes."""
    written: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            written.append(record.getMessage())

    log = logging.getLogger(logger_name)
    log.propagate = False
    log.setLevel(logging.INFO)
    memory = logging.handlers.MemoryHandler(capacity=1000, target=Sink(), flushLevel=logging.ERROR)
    log.addHandler(memory)
    return log, memory, written


def test_flush_buffered_logs_writes_what_serve_buffered() -> None:
    log, memory, written = _buffered("serve_app.test.flush")
    try:
        log.info("prediction one")
        assert written == []  # buffered: this is what made a line late
        assert flush_buffered_logs(["serve_app.test.flush"]) == 1
        assert written == ["prediction one"]
        assert flush_buffered_logs(["serve_app.test.no-handlers"]) == 0
    finally:
        log.removeHandler(memory)


def test_log_flusher_bounds_how_late_a_line_is_and_flushes_on_stop() -> None:
    log, memory, written = _buffered("serve_app.test.flusher")
    flusher = LogFlusher(interval_s=0.05, names=["serve_app.test.flusher"])
    try:
        log.info("a")
        deadline = time.monotonic() + 2
        while not written and time.monotonic() < deadline:
            time.sleep(0.01)
        assert written == ["a"]
        flusher.stop()
        log.info("b")  # after stop: no thread flushes it any more
        time.sleep(0.15)
        assert written == ["a"]
    finally:
        flusher.stop()
        log.removeHandler(memory)
    with pytest.raises(ValueError):
        LogFlusher(interval_s=0)


def test_a_failing_buffered_handler_is_skipped_not_raised() -> None:
    class Broken(logging.handlers.BufferingHandler):
        def flush(self) -> None:
            raise OSError("disk full")

    log = logging.getLogger("serve_app.test.broken")
    broken = Broken(10)
    log.addHandler(broken)
    try:
        assert flush_buffered_logs(["serve_app.test.broken"]) == 0
    finally:
        log.removeHandler(broken)
