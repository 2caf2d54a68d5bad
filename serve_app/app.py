"""Application builders: the only place deployments are bound.

Serve validates each application's ``args:`` into the builder's annotated model, so a bad
config fails ``serve deploy`` with pydantic's message naming the field. This module must not
use ``from __future__ import annotations``: Serve needs the annotation as a real class.
"""

import os

from ray.serve import Application

from .config import AppArgs, TrafficWeights
from .keys import KeyConfigError, KeyRing
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
        for variant in model.served_variants():
            served = model.for_variant(variant.name)
            try:
                loaded = load_program(model.program, served.release())
            except ProgramLoadError as exc:
                where = model.name if not model.variants else f"{model.name}.variants[{variant.name}]"
                raise ValueError(f"models[{where}]: {exc}") from None
            if model.name in programs and loaded.input_names != programs[model.name].input_names:
                raise ValueError(f"models[{model.name}].variants[{variant.name}]: takes other inputs than the "
                                 f"model's first variant")
            programs.setdefault(model.name, loaded)
    try:
        KeyRing.load(args.policy.auth, models=[m.name for m in args.models])
    except KeyConfigError as exc:
        # Checked here too so a missing key env var or file fails the deploy, not a replica loop.
        # (On Kubernetes the env comes from Secrets; the deploying process may lack it: set
        # SERVE_APP_SKIP_KEY_CHECK=1 there.)
        if os.environ.get("SERVE_APP_SKIP_KEY_CHECK") != "1":
            raise ValueError(str(exc)) from None
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
        v.deployment: Predictor.options(
            name=v.deployment, user_config=m.for_variant(v.name).release().model_dump()
        ).bind(m.for_variant(v.name), v.name)
        for m in args.models
        for v in m.served_variants()
    }
    return Router.options(user_config=TrafficWeights().model_dump()).bind(args, cache, predictors)


def build_lmsim(args: Knobs) -> Application:
    """The bundled LM simulator as a Serve application (the offline default's provider)."""
    return LMSimulator.bind(args)
