"""Unit-test guard rails and shared fakes.

- ``ray.init`` is forbidden for every unit test (importing ``ray.serve`` is fine: it
  builds deployments without a cluster; starting Ray is what an integration test does).
- Fakes implement the same protocols as the real parts: ``FakePredictor`` is a
  ``router.PredictorClient``, ``FakeCache`` a ``router.CacheClient``, ``FakeRedis`` a
  ``cache.RedisClient``, ``FakeClock`` a clock, and ``SimLM`` a ``dspy.BaseLM`` whose answers
  come from the project's LM simulator (``serve_app.lmsim.answers.answer``), so DSPy's real
  ChatAdapter parses them and usage is reported like a provider's.

Import the classes with ``from .conftest import FakeClock`` where a test needs the type or
special construction; the fixtures below cover the common cases.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import dspy
import pytest
import ray
import ray._private.worker

from serve_app.cache import CacheLookup, canonical_json
from serve_app.config import AppArgs
from serve_app.key_index import IndexSync, key_digest
from serve_app.lmsim import answer
from serve_app.predictor import ModelInfoPayload, PredictionPayload

# ----------------------------------------------------------------------------- ray guard


class RayInitForbidden(RuntimeError):
    """Raised by ``ray.init`` inside unit tests."""


def _forbidden_ray_init(*args: Any, **kwargs: Any) -> None:
    raise RayInitForbidden("ray.init is forbidden in unit tests; use tests/integration for a real cluster")


@pytest.fixture(autouse=True, scope="package")
def forbid_ray_init() -> Iterator[None]:
    """Make any ``ray.init`` (directly, or via ``serve.run``/``serve.start``) fail loudly.

    Scoped to the ``tests/unit`` package, not the session: ``make test`` runs ``tests/`` in one
    pytest process, and a session-scoped patch would outlive the unit tests and break the
    integration tests' own ``ray.init`` (or be torn down while their cluster still runs).
    """
    was_initialized = ray.is_initialized()  # an integration session may have run first
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "init", _forbidden_ray_init)
        mp.setattr(ray._private.worker, "init", _forbidden_ray_init)
        yield
    assert was_initialized or not ray.is_initialized(), "a unit test started Ray"


# ----------------------------------------------------------------------------- clock


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


# ----------------------------------------------------------------------------- predictor


def fake_outputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Deterministic outputs derived from the inputs (so different inputs differ)."""
    return {"answer": "echo:" + canonical_json(dict(inputs))}


class FakePredictor:
    """A ``router.PredictorClient``: counts calls, can fail, block, or change version."""

    def __init__(
        self,
        name: str = "qa",
        *,
        version: str = "v1",
        inputs: tuple[str, ...] = ("question",),
        outputs: tuple[str, ...] = ("answer",),
        usage: tuple[int, int] = (11, 7),
    ) -> None:
        self.name = name
        self.version = version
        self.input_names = inputs
        self.output_names = outputs
        self.usage = usage
        self.predict_calls: list[dict[str, Any]] = []
        self.info_calls = 0
        self.fail_with: BaseException | None = None
        self.info_fail_with: BaseException | None = None
        self.gate: asyncio.Event | None = None  # predict waits on it when set
        self.info_gate: asyncio.Event | None = None  # info waits on it when set
        self.entered = asyncio.Event()  # set whenever predict starts
        self.on_predict: Callable[[], None] | None = None  # e.g. advance a fake clock

    # ---- knobs
    def fail(self, exc: BaseException | None) -> None:
        self.fail_with = exc

    def block(self) -> asyncio.Event:
        """Make ``predict`` wait until the returned event is set."""
        self.gate = asyncio.Event()
        return self.gate

    # ---- PredictorClient
    async def predict(self, inputs: Mapping[str, Any]) -> PredictionPayload:
        self.predict_calls.append(dict(inputs))
        self.entered.set()
        if self.on_predict is not None:
            self.on_predict()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return PredictionPayload(
            model=self.name,
            program_version=self.version,
            outputs=fake_outputs(inputs),
            usage={"input_tokens": self.usage[0], "output_tokens": self.usage[1]},
            latency_ms=12.5,
        )

    async def info(self) -> ModelInfoPayload:
        self.info_calls += 1
        if self.info_gate is not None:
            await self.info_gate.wait()
        if self.info_fail_with is not None:
            raise self.info_fail_with
        return ModelInfoPayload(
            name=self.name,
            description=f"{self.name} model",
            program_version=self.version,
            inputs=[{"name": n, "type": "str", "description": ""} for n in self.input_names],
            outputs=[{"name": n, "type": "str", "description": ""} for n in self.output_names],
            lm={"model": "openai/fake"},
            breaker={"state": "CLOSED"},
        )


# ----------------------------------------------------------------------------- cache client


class FakeCache:
    """A ``router.CacheClient``: a dict, with values copied like a handle would; can raise or hang."""

    def __init__(self, tier: str = "memory") -> None:
        self.tier = tier
        self.data: dict[str, dict[str, Any]] = {}
        self.get_calls: list[str] = []
        self.set_calls: list[tuple[str, dict[str, Any], float | None]] = []
        self.get_batches: list[int] = []  # keys per get_many call (one hop each)
        self.set_batches: list[int] = []
        self.fail_with: BaseException | None = None
        self.hang: asyncio.Event | None = None  # get/set/stats wait on it when set
        self.stats_fail_with: BaseException | None = None
        self.shared = False  # True: a Redis tier behind it (index_sync answers None)
        self.writers: set[str] = set()
        self.other_writers = 0
        self.index_syncs: list[tuple[str, bool]] = []

    async def _maybe_misbehave(self) -> None:
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def get_many(self, keys: list[str]) -> list[CacheLookup | None]:
        self.get_calls += keys
        self.get_batches.append(len(keys))
        await self._maybe_misbehave()
        values = [self.data.get(key) for key in keys]
        return [None if v is None else CacheLookup(value=copy.deepcopy(v), tier=self.tier) for v in values]

    async def set_many(self, items: list[tuple[str, dict[str, Any], float | None]]) -> list[bool]:
        self.set_calls += [(key, copy.deepcopy(value), ttl_s) for key, value, ttl_s in items]
        self.set_batches.append(len(items))
        await self._maybe_misbehave()
        for key, value, _ in items:
            self.data[key] = copy.deepcopy(value)
        return [True] * len(items)

    async def stats(self) -> dict[str, Any]:
        if self.stats_fail_with is not None:
            raise self.stats_fail_with
        return {"memory_entries": len(self.data)}

    async def index_sync(self, writer: str, want_keys: bool) -> IndexSync | None:
        """Like ``TieredCache.index_sync``; ``other_writers`` are routers besides the callers."""
        self.index_syncs.append((writer, want_keys))
        await self._maybe_misbehave()
        if self.shared:
            return None
        self.writers.add(writer)
        return IndexSync(writers=len(self.writers) + self.other_writers,
                         digests=[key_digest(k) for k in self.data] if want_keys else None)


# ----------------------------------------------------------------------------- redis client


class FakeRedis:
    """A ``cache.RedisClient``: bytes with millisecond expiry on an injected clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.store: dict[str, tuple[bytes, float | None]] = {}
        self.get_calls: list[str] = []
        self.set_calls: list[tuple[str, bytes, int | None]] = []
        self.fail_with: BaseException | None = None
        self.hang: asyncio.Event | None = None
        self.closed = False

    def plant(self, key: str, raw: bytes) -> None:
        """Put raw bytes under ``key`` (as another writer, or an attacker, could)."""
        self.store[key] = (raw, None)

    async def _maybe_misbehave(self) -> None:
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def get(self, name: str) -> bytes | None:
        self.get_calls.append(name)
        await self._maybe_misbehave()
        item = self.store.get(name)
        if item is None:
            return None
        raw, expires = item
        if expires is not None and expires <= self.clock():
            del self.store[name]
            return None
        return raw

    async def set(self, name: str, value: bytes, px: int | None = None) -> Any:
        self.set_calls.append((name, value, px))
        await self._maybe_misbehave()
        self.store[name] = (value, None if px is None else self.clock() + px / 1000.0)
        return True

    async def aclose(self) -> None:
        self.closed = True


# ----------------------------------------------------------------------------- LM


def _completion(content: str, prompt_tokens: int, completion_tokens: int, model: str) -> SimpleNamespace:
    """The OpenAI chat-completion shape a legacy ``BaseLM.forward`` returns."""
    return SimpleNamespace(
        choices=[SimpleNamespace(message=SimpleNamespace(content=content), finish_reason="stop")],
        usage={
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        model=model,
    )


class SimLM(dspy.BaseLM):
    """A DSPy LM answering like the bundled simulator (ChatAdapter-parseable), in process.

    ``fail_with`` makes every call raise; ``hang`` (an event) makes calls wait; ``malformed``
    returns text no adapter can parse. ``calls`` counts LM calls; ``entered`` is set on each.
    """

    def __init__(self, model: str = "sim/test") -> None:
        super().__init__(model, "chat", temperature=0.0, max_tokens=512, cache=False, num_retries=0)
        self.calls = 0
        self.fail_with: BaseException | None = None
        self.hang: asyncio.Event | None = None
        self.malformed = False
        self.entered: asyncio.Event | None = None
        self.usage_log: list[tuple[int, int]] = []  # (prompt, completion) tokens per answered call

    def _reply(self, messages: list[dict[str, Any]] | None) -> SimpleNamespace:
        reply = answer({"model": self.model, "messages": messages or []})
        self.usage_log.append((reply.prompt_tokens, reply.completion_tokens))
        content = "Sorry, no fields here at all." if self.malformed else reply.content
        return _completion(content, reply.prompt_tokens, reply.completion_tokens, self.model)

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> SimpleNamespace:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        return self._reply(messages)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> SimpleNamespace:
        self.calls += 1
        if self.entered is not None:
            self.entered.set()
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return self._reply(messages)


# ----------------------------------------------------------------------------- config


def app_args(**overrides: Any) -> AppArgs:
    """A valid ``AppArgs`` with models ``qa`` and ``classify``; ``overrides`` replace top-level keys."""
    raw: dict[str, Any] = {
        "service_name": "unit",
        "models": [
            {
                "name": "qa",
                "program": "serve_app.examples:build_qa",
                "lm": {"model": "openai/sim-qa", "timeout_s": 1.0},
                "timeout_s": 2.0,
            },
            {
                "name": "classify",
                "program": "serve_app.examples:build_classifier",
                "lm": {"model": "openai/sim-classify", "timeout_s": 1.0},
                "timeout_s": 2.0,
                "cache_ttl_s": 60.0,
            },
        ],
        "cache": {"timeout_s": 0.05},
        "limits": {"request_timeout_s": 5.0, "max_body_bytes": 4096},
    }
    raw.update(overrides)
    return AppArgs.model_validate(raw)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake_predictor() -> FakePredictor:
    return FakePredictor("qa")


@pytest.fixture
def fake_cache() -> FakeCache:
    return FakeCache()


@pytest.fixture
def fake_redis(clock: FakeClock) -> FakeRedis:
    return FakeRedis(clock)


@pytest.fixture
def sim_lm() -> SimLM:
    return SimLM()
