"""Application builders: the only place deployments are bound.

Serve validates each application's ``args:`` into the builder's annotated model, so a bad
config fails ``serve deploy`` with pydantic's message naming the field. This module must not
use ``from __future__ import annotations``: Serve needs the annotation as a real class.
"""

from ray.serve import Application

from .config import AppArgs
from .deployments import Cache, LMSimulator, Predictor, Router
from .lmsim import Knobs
from .programs import ProgramLoadError, load_program

__all__ = ["build_app", "build_lmsim"]


def build_app(args: AppArgs) -> Application:
    """Router (ingress) -> Cache, and one Predictor deployment per model named after it.

    Each program is loaded once here so a bad import path or state, or a fallback that takes
    other inputs, fails the deploy with a clear message instead of a crash-looping replica.
    """
    programs = {}
    for model in args.models:
        try:
            programs[model.name] = load_program(model.program, model.release())
        except ProgramLoadError as exc:
            raise ValueError(f"models[{model.name}]: {exc}") from None
    for model in args.models:
        if model.fallback is not None:
            mine, theirs = programs[model.name].input_names, programs[model.fallback].input_names
            if mine != theirs:
                raise ValueError(
                    f"models[{model.name}].fallback: '{model.fallback}' takes inputs {sorted(theirs)}, "
                    f"not {sorted(mine)}"
                )
    cache = Cache.bind(args.cache)
    predictors = {
        m.name: Predictor.options(name=m.name, user_config=m.release().model_dump()).bind(m) for m in args.models
    }
    return Router.bind(args, cache, predictors)


def build_lmsim(args: Knobs) -> Application:
    """The bundled LM simulator as a Serve application (the offline default's provider)."""
    return LMSimulator.bind(args)
