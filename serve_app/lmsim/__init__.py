"""lmsim: an offline, deterministic, OpenAI-compatible LM simulator for tests and benchmarks.

DSPy programs reach it with
``dspy.LM("openai/<name>", api_base="http://host:port/v1", api_key="sim", cache=False)``.
Answers parse with DSPy's ChatAdapter/JSONAdapter; knobs inject latency, errors, hangs and
malformed replies; a ledger records every call. See ``core`` (behaviour), ``answers``
(reply text), ``app`` (HTTP surface) and ``python -m serve_app.lmsim --help``.
"""

from serve_app.lmsim.answers import Answer, answer, count_tokens, parse_request, prompt_hash
from serve_app.lmsim.app import build_sim_app
from serve_app.lmsim.core import (
    KNOB_NAMES,
    KnobError,
    Knobs,
    Ledger,
    LedgerEntry,
    SimCore,
    SimResponse,
    validate_knobs,
)

__all__ = [
    "KNOB_NAMES",
    "Answer",
    "KnobError",
    "Knobs",
    "Ledger",
    "LedgerEntry",
    "SimCore",
    "SimResponse",
    "answer",
    "build_sim_app",
    "count_tokens",
    "parse_request",
    "prompt_hash",
    "validate_knobs",
]
