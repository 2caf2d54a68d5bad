"""Load a DSPy program from a factory import path plus an optional saved state.

Contract of ``load_program(path, release)``:
- ``path`` is ``"package.module:factory"``; the factory takes no arguments and returns a
  ``dspy.Module``.
- ``release.state`` (optional) is a JSON state written by ``program.save("x.json")`` and is
  loaded on top. ``.pkl`` states and whole-program directories (``dspy.save(...,
  save_program=True)``) unpickle arbitrary code: refused unless ``release.allow_pickle``.
- The program's *version* is a hash of its import path and its full state (instructions,
  demos, fields) without LM settings, so the same state always gives the same version and
  any change of state gives a new one.
- The program's interface (input and output fields) comes from ``program.signature`` when the
  module declares one (multi-step modules should), else from its only predictor, else from
  ``forward``'s parameters with outputs unknown.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from .config import ProgramRelease, resolve_path

__all__ = ["FieldSpec", "LoadedProgram", "ProgramLoadError", "load_program", "type_name"]


class ProgramLoadError(ValueError):
    """The program or its state cannot be loaded; the message says why (deploy-time error)."""


@dataclass(frozen=True)
class FieldSpec:
    """One input or output field of a program, as shown by ``GET /v1/models``."""

    name: str
    type: str
    description: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "description": self.description}


@dataclass(frozen=True)
class LoadedProgram:
    module: dspy.Module
    version: str
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]

    @property
    def input_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.inputs)


def type_name(annotation: Any) -> str:
    """A readable type name: ``str``, ``list[str]``, ``Literal['a', 'b']``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in typing.get_args(annotation)) + "]"
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{args}]" if args else base
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _fields(fields: dict[str, Any]) -> tuple[FieldSpec, ...]:
    out = []
    for name, info in fields.items():
        extra = info.json_schema_extra or {}
        desc = str(extra.get("desc", "") or "")
        if desc == f"${{{name}}}":  # DSPy's placeholder for an undescribed field
            desc = ""
        out.append(FieldSpec(name=name, type=type_name(info.annotation), description=desc))
    return tuple(out)


def _interface(module: dspy.Module) -> tuple[tuple[FieldSpec, ...], tuple[FieldSpec, ...]]:
    sig = getattr(module, "signature", None)
    if not (inspect.isclass(sig) and issubclass(sig, dspy.Signature)):
        preds = module.predictors()
        sig = preds[0].signature if len(preds) == 1 else None
    if sig is not None:
        return _fields(sig.input_fields), _fields(sig.output_fields)
    params = inspect.signature(module.forward).parameters.values()
    inputs = tuple(
        FieldSpec(p.name, "Any", "")
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    )
    return inputs, ()


def _strip_lm(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _strip_lm(v) for k, v in state.items() if k not in ("lm", "metadata")}
    if isinstance(state, list):
        return [_strip_lm(v) for v in state]
    return state


def _version(import_path: str, module: dspy.Module) -> str:
    state = _strip_lm(module.dump_state())
    canonical = json.dumps(
        {"program": import_path, "state": state}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _factory(import_path: str) -> Any:
    mod_name, _, attr = import_path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ProgramLoadError(f"program '{import_path}': cannot import module '{mod_name}': {exc}") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ProgramLoadError(f"program '{import_path}': '{attr}' is not a callable in '{mod_name}'")
    return factory


def _is_pickle(path: Path) -> bool:
    return path.suffix == ".pkl" or path.is_dir()


def load_program(import_path: str, release: ProgramRelease) -> LoadedProgram:
    """Build the program and load its state; raise ``ProgramLoadError`` with a clear reason."""
    state_path = resolve_path(release.state) if release.state else None
    if state_path is not None:
        if not state_path.exists():
            raise ProgramLoadError(f"state '{release.state}' not found")
        if _is_pickle(state_path) and not release.allow_pickle:
            raise ProgramLoadError(
                f"state '{release.state}' is a pickle, which runs arbitrary code when loaded; "
                "save the program as JSON state, or set allow_pickle: true if you trust it"
            )
        if not _is_pickle(state_path) and state_path.suffix != ".json":
            raise ProgramLoadError(f"state '{release.state}' must be a .json state file")

    if state_path is not None and state_path.is_dir():
        module = dspy.load(str(state_path), allow_pickle=True)
    else:
        module = _factory(import_path)()
        if not isinstance(module, dspy.Module):
            raise ProgramLoadError(f"program '{import_path}' returned {type(module).__name__}, not a dspy.Module")
        if state_path is not None:
            try:
                module.load(str(state_path), allow_pickle=release.allow_pickle)
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
                raise ProgramLoadError(
                    f"state '{release.state}' does not fit program '{import_path}': {type(exc).__name__}"
                ) from None
    inputs, outputs = _interface(module)
    return LoadedProgram(module=module, version=_version(import_path, module), inputs=inputs, outputs=outputs)
