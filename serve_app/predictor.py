"""The predictor core: one DSPy program, its LM, its breaker, and error translation.

Contract of ``PredictorCore.predict(inputs)``:
- inputs are checked against the program's input fields first (a missing or unknown field
  is a 422 naming it, with no LM call and no breaker effect);
- the breaker admits the call or raises ``CircuitOpen`` with the remaining open time;
- the program runs as ``await program.acall(**inputs)`` inside
  ``dspy.context(track_usage=True)`` with the model's deadline; the LM is set on the
  program's predictors explicitly (a loaded state may carry its own LM, which would win over
  a context LM), never through ``dspy.configure``;
- the result is plain JSON-safe data: outputs, token usage summed over every LM call of the
  program, the program version and the latency;
- every failure leaves as one of our errors (see ``classify``), and only provider-side
  failures move the breaker. Cancellation releases the breaker permit and propagates.

``reconfigure(release)`` loads a new program state and swaps it in atomically: in-flight
calls finish on the program they started with.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypedDict

import dspy
from dspy.utils.usage_tracker import UsageTracker  # type: ignore[import-untyped]
from pydantic_core import to_jsonable_python

from .breaker import BreakerOpen, CircuitBreaker, State
from .classify import classify
from .config import LMConfig, ModelConfig, ProgramRelease
from .errors import CircuitOpen, InvalidRequest, ProgramOutputError
from .metrics import Counters
from .programs import LoadedProgram, load_program
from .usage import ModuleUsage, Prices, module_paths, resolve_prices

__all__ = ["ModelInfoPayload", "PredictionPayload", "PredictorCore", "build_lm", "validate_inputs"]


class ModuleTokens(TypedDict):
    input_tokens: int
    output_tokens: int
    calls: int
    cost_usd: float | None


class Usage(TypedDict):
    input_tokens: int
    output_tokens: int
    cost_usd: float | None  # None: this model's price is unknown (unknown is not zero)
    by_module: dict[str, ModuleTokens]


class PredictionPayload(TypedDict):
    model: str
    program_version: str
    outputs: dict[str, Any]
    usage: Usage
    latency_ms: float


class ModelInfoPayload(TypedDict):
    name: str
    description: str
    program_version: str
    inputs: list[dict[str, str]]
    outputs: list[dict[str, str]]
    lm: dict[str, Any]
    breaker: dict[str, Any]


def build_lm(cfg: LMConfig, env: Mapping[str, str] | None = None) -> dspy.LM:
    """A ``dspy.LM`` with DSPy's own cache off and bounded retries; the key from ``env``."""
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {}
    if cfg.api_base:
        kwargs["api_base"] = cfg.api_base
    if cfg.api_key_env:
        key = env.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"lm.api_key_env: environment variable {cfg.api_key_env} is not set")
        kwargs["api_key"] = key
    elif cfg.api_base:
        # OpenAI-compatible servers without auth (the simulator, vLLM) still need a value.
        kwargs["api_key"] = "unused"
    return dspy.LM(
        cfg.model,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        timeout=cfg.timeout_s,
        num_retries=cfg.num_retries,
        cache=False,
        **kwargs,
    )


def validate_inputs(expected: Iterable[str], inputs: Mapping[str, Any]) -> None:
    """Raise a 422 naming the first missing or unknown input field."""
    expected = set(expected)
    missing = sorted(expected - inputs.keys())
    if missing:
        raise InvalidRequest(f"missing input field '{missing[0]}'", status=422, field=f"inputs.{missing[0]}")
    unknown = sorted(inputs.keys() - expected)
    if unknown:
        raise InvalidRequest(
            f"unknown input field '{unknown[0]}' (expected: {', '.join(sorted(expected))})",
            status=422,
            field=f"inputs.{unknown[0]}",
        )


def _usage(tracker: UsageTracker, modules: ModuleUsage | None, paths: dict[int, str],
           prices: Prices | None) -> Usage:
    """Totals from DSPy's usage tracker (every LM call of the request), split by module.

    ``modules`` is None for a program with one predictor (or none): every LM call of the request
    is then that predictor's (or, as ``ModuleUsage`` names it, the ``program``'s), and no DSPy
    callback was needed to attribute it.
    """
    tin = tout = calls = 0
    for entries in tracker.usage_data.values():
        for entry in entries:
            tin += int(entry.get("prompt_tokens") or 0)
            tout += int(entry.get("completion_tokens") or 0)
            calls += 1

    def cost(i: int, o: int) -> float | None:
        return None if prices is None else round(prices.cost(i, o), 10)

    if modules is not None:
        split = modules.by_module
    elif calls:
        split = {next(iter(paths.values()), "program"): {"input_tokens": tin, "output_tokens": tout, "calls": calls}}
    else:
        split = {}
    by_module = {
        path: ModuleTokens(input_tokens=m["input_tokens"], output_tokens=m["output_tokens"], calls=m["calls"],
                           cost_usd=cost(m["input_tokens"], m["output_tokens"]))
        for path, m in split.items()
    }
    return Usage(input_tokens=tin, output_tokens=tout, cost_usd=cost(tin, tout), by_module=by_module)


class PredictorCore:
    """Plain-Python predictor; the Serve deployment only delegates to it."""

    def __init__(
        self,
        model: ModelConfig,
        release: ProgramRelease | None = None,
        *,
        lm: dspy.BaseLM | None = None,
        clock: Callable[[], float] = time.monotonic,
        counters: Counters | None = None,
        loader: Callable[[str, ProgramRelease], LoadedProgram] = load_program,
    ) -> None:
        self.model = model
        self._clock = clock
        self._loader = loader
        self.counters = counters or Counters()
        self._lm = lm if lm is not None else build_lm(model.lm)
        self.prices = resolve_prices(model.lm)
        self.breaker = CircuitBreaker(model.breaker, clock=clock, on_transition=self._on_transition)
        self.counters.set_gauge("breaker_state", float(State.CLOSED), model=model.name)
        self.counters.set_gauge("active_predictions", 0.0, model=model.name)
        self._active = 0
        self._program = self._load(release or model.release())
        self._paths = module_paths(self._program.module)

    def _on_transition(self, old: State, new: State) -> None:
        self.counters.inc("breaker_transitions", model=self.model.name, to=State(new).name.lower())
        self.counters.set_gauge("breaker_state", float(new), model=self.model.name)

    def _load(self, release: ProgramRelease) -> LoadedProgram:
        program = self._loader(self.model.program, release)
        program.module.set_lm(self._lm)
        return program

    @property
    def program_version(self) -> str:
        return self._program.version

    def reconfigure(self, release: ProgramRelease) -> None:
        """Load ``release`` and swap it in; on failure the old program keeps serving."""
        program = self._load(release)
        self._program, self._paths = program, module_paths(program.module)

    def info(self) -> ModelInfoPayload:
        p = self._program
        return ModelInfoPayload(
            name=self.model.name,
            description=self.model.description,
            program_version=p.version,
            inputs=[f.as_dict() for f in p.inputs],
            outputs=[f.as_dict() for f in p.outputs],
            lm={"model": self.model.lm.model, **self.model.lm.cache_identity()},
            breaker=self.breaker.snapshot(),
        )

    async def predict(self, inputs: Mapping[str, Any], variant: str = "default") -> PredictionPayload:
        program, paths = self._program, self._paths  # pin: a concurrent reconfigure must not change this call
        validate_inputs(program.input_names, inputs)
        try:
            permit = self.breaker.acquire()
        except BreakerOpen as exc:
            raise CircuitOpen(
                f"model '{self.model.name}' is failing; calls are paused", retry_after_s=exc.retry_after_s
            ) from None
        started = self._clock()
        # Attributing tokens to modules needs a DSPy callback, and any callback makes DSPy
        # inspect every module, adapter and LM call's arguments (~0.3 ms of CPU per request in
        # benchmarks/results/predictor_cpu): only a program with several predictors pays it.
        modules = ModuleUsage(paths) if len(paths) > 1 else None
        tracker = UsageTracker()
        self._active += 1
        self.counters.set_gauge("active_predictions", float(self._active), model=self.model.name)
        with permit:  # exits without an outcome (cancellation, bugs) release the permit
            try:
                async with asyncio.timeout(self.model.timeout_s):
                    with dspy.context(track_usage=True, disable_history=True, usage_tracker=tracker,
                                      callbacks=[modules] if modules is not None else []):
                        prediction = await program.module.acall(**inputs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below, nothing escapes raw
                result = classify(exc, self.model.name)
                if result.counts_as_failure:
                    permit.failure(result.retry_after_s)
                else:
                    permit.release()
                raise result.error from None
            finally:
                self._active -= 1
                self.counters.set_gauge("active_predictions", float(self._active), model=self.model.name)
            permit.success()
        usage = _usage(tracker, modules, paths, self.prices)
        labels = {"model": self.model.name, "variant": variant}
        self.counters.inc("tokens", usage["input_tokens"], type="input", **labels)
        self.counters.inc("tokens", usage["output_tokens"], type="output", **labels)
        if usage["cost_usd"] is not None:
            self.counters.inc("cost_usd", usage["cost_usd"], **labels)
        outputs = self._outputs(program, prediction)
        return PredictionPayload(
            model=self.model.name,
            program_version=program.version,
            outputs=outputs,
            usage=usage,
            latency_ms=round((self._clock() - started) * 1000.0, 3),
        )

    def _outputs(self, program: LoadedProgram, prediction: Any) -> dict[str, Any]:
        names = [f.name for f in program.outputs] or list(prediction.keys())
        out: dict[str, Any] = {}
        for name in names:
            try:
                value = prediction[name]
            except (KeyError, AttributeError):
                raise ProgramOutputError(
                    f"model '{self.model.name}' program returned no '{name}' output"
                ) from None
            out[name] = to_jsonable_python(value, fallback=str)
        return out
