"""Deterministic answers for OpenAI-style chat requests (pure functions, no I/O).

Contract:
    ``answer(body)`` returns an :class:`Answer` whose ``content`` DSPy's real adapters parse:

    * ChatAdapter prompts get every requested output field as ``[[ ## name ## ]]\\nvalue``
      blocks followed by ``[[ ## completed ## ]]``;
    * JSONAdapter prompts (or any body with a ``response_format``) get a JSON object of the
      output fields;
    * anything else gets one plain sentence.

    Values honour the declared type (str, bool, int, float, Literal, Enum, list/dict/pydantic
    models via the JSON schema DSPy prints in the prompt). The same inputs and output fields
    always give the same answer; values are derived from a sha256 of the canonical inputs.

How output fields are found (DSPy 3.4.1 wire text, see ``dspy/adapters``):
    * the system message lists ``Your output fields are:`` entries ``N. `name` (TYPE): desc``;
    * the field-structure section has ``{name}        # note: the value you produce ...`` hints
      (``must be True or False``, ``must be a single int value``, ``must exactly match (no extra
      characters) one of: a; b``, ``must be one of: ...`` for Enums, ``must adhere to the JSON
      schema: {...}``); JSONAdapter prints the same hints inside a JSON object;
    * the last user message holds ``[[ ## name ## ]]\\nvalue`` input blocks and ends with
      ``Respond with the corresponding output fields, starting with the field `[[ ## a ## ]]` ...``
      (ChatAdapter) or ``Respond with a JSON object in the following order of fields: `a` ...``
      (JSONAdapter), which fixes the requested output order.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PromptKind = Literal["chat", "json", "plain"]

FIELD_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_CHAT_TRAILER = "Respond with the corresponding output fields, starting with the field "
_JSON_TRAILER = "Respond with a JSON object in the following order of fields: "
_JSON_STRUCTURE = "Outputs will be a JSON object with the following fields."
_OUTPUTS_HEADER = "Your output fields are:"
_STRUCTURE_HEADER = "All interactions will be structured in the following way"
_NOTE = re.compile(r"\{(\w+)\}\s+# note: the value you produce (.+)")
_ENTRY = re.compile(r"^\d+\. `(\w+)` \(", re.MULTILINE)
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class OutputField:
    """One requested output field: its name, DSPy type text and the JSON schema we generate from."""

    name: str
    type_str: str
    schema: dict[str, Any]


@dataclass(frozen=True)
class ParsedPrompt:
    """What the simulator understood of a request."""

    kind: PromptKind
    inputs: dict[str, str]
    outputs: tuple[OutputField, ...]
    prompt_text: str
    digest: str = field(default="")


@dataclass(frozen=True)
class Answer:
    """The reply text plus deterministic token counts for ``usage``."""

    content: str
    kind: PromptKind
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def count_tokens(text: str) -> int:
    """Deterministic token estimate: words plus punctuation marks."""
    return len(_TOKEN.findall(text))


def content_text(content: Any) -> str:
    """Text of an OpenAI message ``content`` (a string or a list of parts); non-text parts
    become a short stable placeholder so they still influence hashes."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        out: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                out.append(str(part.get("text", "")))
            else:
                digest = hashlib.sha256(_canon(part).encode()).hexdigest()[:12]
                kind = part.get("type", "part") if isinstance(part, Mapping) else "part"
                out.append(f"<{kind}:{digest}>")
        return "".join(out)
    return str(content)


def canonical_messages(messages: Any) -> list[dict[str, str]]:
    """Role/content pairs only, so transport details (names, cache hints) do not change hashes."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        return []
    return [
        {"role": str(m.get("role", "")), "content": content_text(m.get("content"))}
        for m in messages
        if isinstance(m, Mapping)
    ]


def prompt_hash(messages: Any) -> str:
    """sha256 hex of the canonical messages."""
    return hashlib.sha256(_canon(canonical_messages(messages)).encode()).hexdigest()


def parse_request(body: Mapping[str, Any]) -> ParsedPrompt:
    """Classify a chat-completions body and extract DSPy input values and output fields."""
    messages = canonical_messages(body.get("messages"))
    prompt_text = "\n\n".join(m["content"] for m in messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    order = _trailer_order(user)
    declared = _declared_types(system)
    names = order or list(declared)
    notes = _notes(system)
    response_format = body.get("response_format")
    if not names:
        rf_schema = _response_format_schema(response_format)
        if rf_schema is not None:  # a bare structured-output request: answer its schema
            props = rf_schema.get("properties") or {}
            outputs = tuple(OutputField(k, "", _with_defs(v, rf_schema)) for k, v in props.items())
            return _finish("json", {"prompt": user}, outputs, prompt_text)
        # The whole conversation decides the answer; the last user turn is what it talks about.
        return _finish("plain", {"prompt": user, "conversation": prompt_text}, (), prompt_text)
    outputs = tuple(
        OutputField(n, declared.get(n, "str"), field_schema(declared.get(n, "str"), notes.get(n)))
        for n in names
    )
    is_json = (
        (isinstance(response_format, Mapping) and response_format.get("type") in ("json_object", "json_schema"))
        or _JSON_TRAILER in user
        or (_JSON_STRUCTURE in system and _CHAT_TRAILER not in user)
    )
    inputs = _input_blocks(user) or {"prompt": user}
    return _finish("json" if is_json else "chat", inputs, outputs, prompt_text)


def answer(body: Mapping[str, Any]) -> Answer:
    """The deterministic reply for ``body`` (see module docstring)."""
    parsed = parse_request(body)
    content = render(parsed)
    return Answer(content, parsed.kind, count_tokens(parsed.prompt_text), count_tokens(content))


def render(parsed: ParsedPrompt) -> str:
    """Reply text for an already parsed prompt."""
    if parsed.kind == "plain":
        return f"Simulated reply about {_topic({'prompt': parsed.inputs['prompt']})} [{parsed.digest[:8]}]."
    topic = _topic(parsed.inputs)
    values = {
        f.name: generate(f.schema, random.Random(_seed(parsed.digest, f.name)), name=f.name, topic=topic)
        for f in parsed.outputs
    }
    if parsed.kind == "json":
        return json.dumps(values, ensure_ascii=False, indent=2)
    blocks = [f"[[ ## {name} ## ]]\n{_chat_value(value)}" for name, value in values.items()]
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


def malformed(body: Mapping[str, Any]) -> str:
    """Garbage that neither ChatAdapter nor JSONAdapter can parse: no field markers, no braces."""
    tag = prompt_hash(body.get("messages"))[:8]
    return f"Sorry, I lost my train of thought there; let me ramble instead ({tag})."


# ---------------------------------------------------------------- prompt parsing helpers


def _finish(kind: PromptKind, inputs: dict[str, str], outputs: tuple[OutputField, ...], text: str) -> ParsedPrompt:
    # The digest covers only canonical inputs and the requested fields, so demos, instructions and
    # whitespace in the template do not change answers, while any input change does.
    canon = _canon({"inputs": inputs, "outputs": [[f.name, f.type_str] for f in outputs], "kind": kind == "plain"})
    return ParsedPrompt(kind, inputs, outputs, text, hashlib.sha256(canon.encode()).hexdigest())


def _trailer_order(user: str) -> list[str]:
    """Output names in requested order, from the user message's closing instruction."""
    for marker, pattern in ((_CHAT_TRAILER, r"`\[\[ ## (\w+) ## \]\]`"), (_JSON_TRAILER, r"`(\w+)`")):
        idx = user.rfind(marker)
        if idx >= 0:
            names = re.findall(pattern, user[idx + len(marker):])
            return [n for n in dict.fromkeys(names) if n != "completed"]
    return []


def _declared_types(system: str) -> dict[str, str]:
    """``name -> type text`` from the ``Your output fields are:`` list (type text may nest brackets)."""
    start = system.find(_OUTPUTS_HEADER)
    if start < 0:
        return {}
    section = system[start + len(_OUTPUTS_HEADER):]
    end = section.find(_STRUCTURE_HEADER)
    section = section if end < 0 else section[:end]
    out: dict[str, str] = {}
    for m in _ENTRY.finditer(section):
        type_str = _balanced(section, m.end())
        if type_str is not None:
            out.setdefault(m.group(1), type_str)
    return out


def _balanced(text: str, pos: int) -> str | None:
    """Text up to the ``)`` closing an already-open parenthesis, skipping quoted strings."""
    depth, quote, i = 1, "", pos
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return text[pos:i]
        elif ch == "\n":
            return None
        i += 1
    return None


def _notes(system: str) -> dict[str, str]:
    """``name -> note`` from the field-structure section (plain lines or JSONAdapter's JSON block)."""
    notes: dict[str, str] = {}
    idx = system.find(_JSON_STRUCTURE)
    if idx >= 0:
        brace = system.find("{", idx)
        try:
            block, _ = json.JSONDecoder().raw_decode(system, brace)
        except (ValueError, IndexError):
            block = {}
        if isinstance(block, dict):
            for value in block.values():
                m = _NOTE.match(str(value))
                if m:
                    notes[m.group(1)] = m.group(2).strip()
    for m in _NOTE.finditer(system):
        notes.setdefault(m.group(1), m.group(2).strip())
    return notes


def _input_blocks(user: str) -> dict[str, str]:
    """``[[ ## name ## ]]`` sections of the last user message, minus the closing instruction."""
    for marker in (_CHAT_TRAILER, _JSON_TRAILER):
        idx = user.rfind(marker)
        if idx >= 0:
            user = user[:idx]
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in user.splitlines():
        m = FIELD_HEADER.match(line.strip())
        if m:
            rest = line.strip()[m.end():].strip()
            sections.append((m.group(1), [rest] if rest else []))
        else:
            sections[-1][1].append(line)
    return {k: "\n".join(v).strip() for k, v in sections if k is not None}


def _response_format_schema(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) and schema.get("properties") else None


def _with_defs(sub: Any, root: Mapping[str, Any]) -> dict[str, Any]:
    """``sub`` plus the root's definitions, so its ``$ref``s still resolve on their own."""
    out: dict[str, Any] = dict(sub) if isinstance(sub, Mapping) else {}
    for key in ("$defs", "definitions"):
        if key in root:
            out.setdefault(key, root[key])
    return out


def _topic(inputs: Mapping[str, str]) -> str:
    """A short, marker-free summary of the inputs to mention in sentences."""
    text = " ".join(str(v) for v in inputs.values() if str(v).strip()) or "nothing in particular"
    text = re.sub(r"\[\[|\]\]|##|[{}\"\\]", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57].rstrip() + "..."


def _chat_value(value: Any) -> str:
    # Strings go raw (as DSPy formats them); everything else as JSON, which parse_value reads back.
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _seed(digest: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{digest}:{name}".encode()).digest()[:8], "big")


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


# ---------------------------------------------------------------- types -> JSON schema -> values

_BASIC: dict[str, dict[str, Any]] = {
    "str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
    "bool": {"type": "boolean"}, "dict": {"type": "object"}, "list": {"type": "array"},
    "NoneType": {"type": "null"}, "None": {"type": "null"}, "Any": {"type": "string"},
}
_SEQUENCES = {"list", "List", "set", "Set", "frozenset", "tuple", "Tuple", "Sequence"}
_MAPPINGS = {"dict", "Dict", "Mapping"}
_CHOICE_NOTES = ("must exactly match (no extra characters) one of: ", "must be one of: ")


def field_schema(type_str: str, note: str | None) -> dict[str, Any]:
    """JSON schema for one output field: the prompt's JSON-schema note wins, then the type text
    (exact Literal values), then choice notes (Enums, whose type text is only a class name)."""
    note = note or ""
    if note.startswith("must adhere to the JSON schema:"):
        try:
            return dict(json.loads(note.split(":", 1)[1]))
        except (ValueError, TypeError):
            pass
    if note == "must be True or False":
        return {"type": "boolean"}
    if m := re.fullmatch(r"must be a single (int|float) value", note):
        return dict(_BASIC[m.group(1)])
    try:
        schema = _node_schema(ast.parse(type_str.strip(), mode="eval").body)
    except SyntaxError:
        schema = None
    if schema is not None:
        return schema
    for prefix in _CHOICE_NOTES:
        if note.startswith(prefix):
            return {"enum": note[len(prefix):].split("; ")}
    return {"type": "string"}


def _node_schema(node: ast.expr) -> dict[str, Any] | None:
    """Schema of a type-annotation expression as DSPy prints it; None when unknown."""
    if isinstance(node, ast.Name):
        return dict(_BASIC[node.id]) if node.id in _BASIC else None
    if isinstance(node, ast.Constant) and node.value is None:
        return {"type": "null"}
    if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)):
        return None
    head = node.value.id
    args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    if head == "Literal":
        values = [a.value for a in args if isinstance(a, ast.Constant)]
        return {"enum": values} if values and len(values) == len(args) else None
    subs = [_node_schema(a) for a in args]
    if any(s is None for s in subs):
        return None
    if head in ("Union", "Optional"):
        return {"anyOf": subs}
    if head in _SEQUENCES:
        return {"type": "array", "items": subs[0]}
    if head in _MAPPINGS:
        return {"type": "object", "additionalProperties": subs[-1]}
    return None


def generate(schema: Any, rng: random.Random, *, name: str, topic: str, root: Any = None, depth: int = 0) -> Any:
    """A value valid for ``schema``, drawn from ``rng`` (seeded by the caller for determinism)."""
    root = schema if root is None else root
    if not isinstance(schema, Mapping) or depth > 6:
        return _sentence(rng, name, topic)

    def again(sub: Any, sub_name: str = name) -> Any:
        return generate(sub, rng, name=sub_name, topic=topic, root=root, depth=depth + 1)

    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return again(target)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return rng.choice(list(schema["enum"]))
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [o for o in schema[key] if not (isinstance(o, Mapping) and o.get("type") == "null")]
            return again(rng.choice(options)) if options else None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "integer":
        if "minimum" in schema:
            low_i = math.ceil(schema["minimum"])
        else:
            low_i = math.floor(schema.get("exclusiveMinimum", -1)) + 1
        if "maximum" in schema:
            high_i = math.floor(schema["maximum"])
        else:
            high_i = math.ceil(schema.get("exclusiveMaximum", low_i + 101)) - 1
        return rng.randint(low_i, max(low_i, high_i))
    if kind == "number":
        low_f = float(schema.get("minimum", schema.get("exclusiveMinimum", 0.0)))
        high_f = float(schema.get("maximum", schema.get("exclusiveMaximum", low_f + 1.0)))
        # Stay strictly inside the range (pydantic gt/lt become exclusive bounds) after rounding.
        margin = (high_f - low_f) * 0.01
        return round(rng.uniform(low_f + margin, high_f - margin), 3) if high_f > low_f else low_f
    if kind == "array":
        low, high = int(schema.get("minItems", 1)), int(schema.get("maxItems", 3))
        count = rng.randint(min(low, high), max(low, high)) if depth < 4 else low
        return [again(schema.get("items", {"type": "string"})) for _ in range(count)]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties")
        if isinstance(props, Mapping) and props:
            return {k: again(v, k) for k, v in props.items()}
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and extra:
            return {f"{name}_{i + 1}": again(extra) for i in range(rng.randint(1, 2))}
        return {"summary": _sentence(rng, name, topic)}
    if kind == "null":
        return None
    return _string(schema, rng, name, topic)


def _string(schema: Mapping[str, Any], rng: random.Random, name: str, topic: str) -> str:
    tag = f"{rng.getrandbits(32):08x}"
    fmt = schema.get("format")
    special = {
        "date-time": f"2024-01-{1 + int(tag, 16) % 28:02d}T12:00:00Z",
        "date": f"2024-01-{1 + int(tag, 16) % 28:02d}",
        "email": f"user{tag}@example.com",
        "uri": f"https://example.com/{tag}",
    }
    text = special.get(fmt, "") if isinstance(fmt, str) else ""
    text = text or _sentence(rng, name, topic, tag)
    limit = schema.get("maxLength")
    return text[: int(limit)] if isinstance(limit, int) else text


_TEMPLATES = (
    "Simulated {name} for {topic} [{tag}].",
    "The {name}, given {topic}, is settled [{tag}].",
    "A deterministic {name} about {topic} [{tag}].",
)


def _sentence(rng: random.Random, name: str, topic: str, tag: str | None = None) -> str:
    tag = tag or f"{rng.getrandbits(32):08x}"
    if name in ("reasoning", "rationale", "thought"):
        return f"Considering {topic}, the answer follows step by step [{tag}]."
    return rng.choice(_TEMPLATES).format(name=name.replace("_", " "), topic=topic, tag=tag)
