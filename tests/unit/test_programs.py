"""Program loading: interfaces, versions, and every refusal as a clear ``ProgramLoadError``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dspy
import pytest

from serve_app.config import PROJECT_ROOT, ProgramRelease, resolve_path
from serve_app.programs import (
    FieldSpec,
    LoadedProgram,
    ProgramLoadError,
    load_program,
    type_name,
)

QA = "serve_app.examples:build_qa"
CLASSIFY = "serve_app.examples:build_classifier"
PIPELINE = "serve_app.examples:build_pipeline"
STATES = PROJECT_ROOT / "configs" / "states"


def load(path: str, state: str | Path | None = None, allow_pickle: bool = False) -> LoadedProgram:
    return load_program(path, ProgramRelease(state=None if state is None else str(state), allow_pickle=allow_pickle))


def types(specs: tuple[FieldSpec, ...]) -> dict[str, str]:
    return {f.name: f.type for f in specs}


# ----------------------------------------------------------------------------- interfaces


@pytest.mark.parametrize("state", [None, "configs/states/qa_v1.json"])
def test_qa_interface(state: str | None) -> None:
    program = load(QA, state)
    assert isinstance(program.module, dspy.Module)
    assert types(program.inputs) == {"question": "str"}
    assert types(program.outputs) == {"reasoning": "str", "answer": "str"}
    assert program.input_names == frozenset({"question"})
    # An undescribed field shows no DSPy "${name}" placeholder.
    assert all(not f.description.startswith("${") for f in program.inputs + program.outputs)


def test_classifier_interface_and_demos() -> None:
    program = load(CLASSIFY, "configs/states/classify.json")
    assert types(program.inputs) == {"text": "str"}
    assert types(program.outputs) == {
        "sentiment": "Literal['positive', 'negative', 'neutral']",
        "confidence": "float",
    }
    assert program.inputs[0].as_dict() == {"name": "text", "type": "str", "description": "the text to classify"}
    assert [f.description for f in program.outputs] == ["", "between 0 and 1"]
    assert len(program.module.demos) == 4  # the compiled demos came from the state


def test_pipeline_interface_comes_from_its_declared_signature() -> None:
    program = load(PIPELINE)
    assert types(program.inputs) == {"document": "str"}
    assert types(program.outputs) == {
        "summary": "str",
        "title": "str",
        "keywords": "list[str]",
        "word_count": "int",
        "is_technical": "bool",
    }


def test_interface_falls_back_to_forward_parameters() -> None:
    program = load(f"{__name__}:build_two_step")
    assert [(f.name, f.type) for f in program.inputs] == [("topic", "Any"), ("style", "Any")]
    assert program.outputs == ()


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [(str, "str"), (list[str], "list[str]"), (dict[str, int], "dict[str, int]"), (bool, "bool")],
)
def test_type_name(annotation: Any, expected: str) -> None:
    assert type_name(annotation) == expected


# ----------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("path", "state"),
    [(QA, None), (QA, "configs/states/qa_v1.json"), (CLASSIFY, "configs/states/classify.json"), (PIPELINE, None)],
)
def test_version_is_stable(path: str, state: str | None) -> None:
    first, second = load(path, state), load(path, state)
    assert first.version == second.version
    assert len(first.version) == 16 and int(first.version, 16) >= 0


def test_version_follows_the_state() -> None:
    v1 = load(QA, "configs/states/qa_v1.json").version
    v2 = load(QA, "configs/states/qa_v2.json").version
    assert v1 != v2
    # qa_v1 is the untouched factory program saved as JSON: same content, same version.
    assert load(QA).version == v1


def test_version_is_the_same_in_another_process() -> None:
    """Replicas compute versions independently; they must agree (no hash seed, no addresses)."""
    cases = [
        (QA, None),
        (QA, "configs/states/qa_v2.json"),
        (CLASSIFY, "configs/states/classify.json"),
        (PIPELINE, None),
    ]
    script = (
        "import json, sys\n"
        "from serve_app.config import ProgramRelease\n"
        "from serve_app.programs import load_program\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps([load_program(p, ProgramRelease(state=s)).version for p, s in cases]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [load(p, s).version for p, s in cases]


def test_version_differs_between_programs() -> None:
    assert len({load(QA).version, load(CLASSIFY).version, load(PIPELINE).version}) == 3


def _classify_state() -> dict[str, Any]:
    state: dict[str, Any] = json.loads((STATES / "classify.json").read_text())
    return state


def test_version_changes_with_modified_demos(tmp_path: Path) -> None:
    original = load(CLASSIFY, STATES / "classify.json").version
    state = _classify_state()
    state["demos"][0]["sentiment"] = "positive"
    changed = tmp_path / "classify_changed.json"
    changed.write_text(json.dumps(state))
    assert load(CLASSIFY, changed).version != original

    state = _classify_state()
    state["demos"] = state["demos"][:-1]
    fewer = tmp_path / "classify_fewer.json"
    fewer.write_text(json.dumps(state))
    assert load(CLASSIFY, fewer).version not in {original, load(CLASSIFY, changed).version}


def test_version_ignores_lm_settings_and_metadata(tmp_path: Path) -> None:
    original = load(CLASSIFY, STATES / "classify.json").version
    state = _classify_state()
    state["metadata"] = {"dependency_versions": {"python": "3.99", "dspy": "9.9.9", "cloudpickle": "0"}}
    copy = tmp_path / "classify_other_env.json"
    copy.write_text(json.dumps(state, indent=4))
    assert load(CLASSIFY, copy).version == original


def test_version_is_independent_of_the_state_file_location(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere.json"
    copy.write_text((STATES / "qa_v2.json").read_text())
    assert load(QA, copy).version == load(QA, "configs/states/qa_v2.json").version


# ----------------------------------------------------------------------------- refusals


def test_pickle_state_is_refused_unless_allowed(tmp_path: Path) -> None:
    pkl = tmp_path / "p.pkl"
    dspy.ChainOfThought("question: str -> answer: str").save(str(pkl))
    with pytest.raises(ProgramLoadError, match=r"is a pickle, which runs arbitrary code.*allow_pickle"):
        load(QA, pkl)
    assert load(QA, pkl, allow_pickle=True).input_names == frozenset({"question"})


def test_whole_program_directory_is_refused_unless_allowed(tmp_path: Path) -> None:
    saved = tmp_path / "whole"
    dspy.ChainOfThought("question: str -> answer: str").save(str(saved), save_program=True)
    assert saved.is_dir()
    with pytest.raises(ProgramLoadError, match="is a pickle"):
        load(QA, saved)
    program = load(QA, saved, allow_pickle=True)
    assert types(program.outputs) == {"reasoning": "str", "answer": "str"}


def test_any_directory_is_treated_as_a_pickle(tmp_path: Path) -> None:
    with pytest.raises(ProgramLoadError, match="is a pickle"):
        load(QA, tmp_path)


def test_missing_state_file(tmp_path: Path) -> None:
    with pytest.raises(ProgramLoadError, match=r"state '.*nope\.json' not found"):
        load(QA, tmp_path / "nope.json")


def test_non_json_state_suffix(tmp_path: Path) -> None:
    other = tmp_path / "state.yaml"
    other.write_text((STATES / "qa_v1.json").read_text())
    with pytest.raises(ProgramLoadError, match=r"must be a \.json state file"):
        load(QA, other)


@pytest.mark.parametrize(
    ("path", "state"),
    [
        (QA, STATES / "classify.json"),
        (CLASSIFY, STATES / "qa_v1.json"),
        (PIPELINE, STATES / "qa_v1.json"),
    ],
)
def test_state_that_does_not_fit_the_program(path: str, state: Path) -> None:
    with pytest.raises(ProgramLoadError, match=rf"does not fit program '{path}'"):
        load(path, state)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "{}"], ids=["syntax", "list", "empty"])
def test_broken_json_state(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ProgramLoadError, match="does not fit program") as info:
        load(QA, bad)
    assert str(tmp_path) in str(info.value)  # names the file; carries no traceback
    assert "Traceback" not in str(info.value)


def test_unimportable_module() -> None:
    with pytest.raises(ProgramLoadError, match=r"cannot import module 'serve_app\.no_such_module'"):
        load("serve_app.no_such_module:build")


def test_missing_factory() -> None:
    with pytest.raises(ProgramLoadError, match=r"'build_nothing' is not a callable in 'serve_app\.examples'"):
        load("serve_app.examples:build_nothing")


def test_attribute_that_is_not_callable() -> None:
    with pytest.raises(ProgramLoadError, match="is not a callable"):
        load("serve_app.examples:__all__")


def test_factory_returning_a_non_module() -> None:
    with pytest.raises(ProgramLoadError, match=r"returned str, not a dspy\.Module"):
        load(f"{__name__}:returns_a_string")


# ----------------------------------------------------------------------------- resolve_path


def test_resolve_path_absolute_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "anything.json"
    assert resolve_path(str(target)) == target


def test_resolve_path_prefers_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs" / "states").mkdir(parents=True)
    local = tmp_path / "configs" / "states" / "qa_v1.json"
    local.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/states/qa_v1.json") == Path.cwd() / "configs/states/qa_v1.json"


def test_resolve_path_falls_back_to_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a Ray worker's working directory, without configs/
    resolved = resolve_path("configs/states/qa_v1.json")
    assert resolved == PROJECT_ROOT / "configs/states/qa_v1.json"
    assert resolved.exists()
    assert load(QA, "configs/states/qa_v1.json").version == load(QA).version


def test_resolve_path_of_a_missing_relative_path_points_at_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_path("nowhere/x.json") == PROJECT_ROOT / "nowhere/x.json"
    assert os.fspath(PROJECT_ROOT) == os.fspath(Path(__file__).resolve().parents[2])


# ----------------------------------------------------------------------------- factories used above


def returns_a_string() -> str:
    return "not a module"


class _TwoStep(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = dspy.Predict("topic -> outline")
        self.b = dspy.Predict("outline, style -> text")

    def forward(self, topic: str, style: str) -> dspy.Prediction:
        outline = self.a(topic=topic).outline
        return self.b(outline=outline, style=style)


def build_two_step() -> dspy.Module:
    return _TwoStep()
