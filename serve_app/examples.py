"""Example DSPy programs of three shapes, served by the shipped configs.

- ``qa``: question -> reasoning, answer (ChainOfThought).
- ``classify``: a classifier with a typed ``Literal`` label and a float confidence; its
  compiled demos live in ``configs/states/classify.json``.
- ``pipeline``: two chained predictors (summarize, then extract typed fields).

``python -m serve_app.examples`` rewrites the saved states under ``configs/states/`` (the
committed files are its output; it needs no LM: demos are compiled with LabeledFewShot).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import dspy

__all__ = ["build_qa", "build_classifier", "build_pipeline", "Classify", "Pipeline"]


def build_qa() -> dspy.Module:
    return dspy.ChainOfThought("question: str -> answer: str")


class Classify(dspy.Signature):
    """Classify the sentiment of a short text."""

    text: str = dspy.InputField(desc="the text to classify")
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()
    confidence: float = dspy.OutputField(desc="between 0 and 1")


def build_classifier() -> dspy.Module:
    return dspy.Predict(Classify)


class _Summarize(dspy.Signature):
    """Summarize the document in one or two sentences."""

    document: str = dspy.InputField()
    summary: str = dspy.OutputField()


class _Extract(dspy.Signature):
    """Extract a title, keywords and facts from a summary."""

    summary: str = dspy.InputField()
    title: str = dspy.OutputField()
    keywords: list[str] = dspy.OutputField()
    word_count: int = dspy.OutputField(desc="words in the summary")
    is_technical: bool = dspy.OutputField()


class PipelineSignature(dspy.Signature):
    """Summarize a document, then extract structured facts from the summary."""

    document: str = dspy.InputField()
    summary: str = dspy.OutputField()
    title: str = dspy.OutputField()
    keywords: list[str] = dspy.OutputField()
    word_count: int = dspy.OutputField()
    is_technical: bool = dspy.OutputField()


class Pipeline(dspy.Module):
    # A multi-step module declares its interface so the server can validate inputs.
    signature = PipelineSignature

    def __init__(self) -> None:
        super().__init__()
        self.summarize = dspy.Predict(_Summarize)
        self.extract = dspy.Predict(_Extract)

    async def aforward(self, document: str) -> dspy.Prediction:
        s = await self.summarize.acall(document=document)
        e = await self.extract.acall(summary=s.summary)
        return dspy.Prediction(
            summary=s.summary,
            title=e.title,
            keywords=e.keywords,
            word_count=e.word_count,
            is_technical=e.is_technical,
        )

    def forward(self, document: str) -> dspy.Prediction:
        s = self.summarize(document=document)
        e = self.extract(summary=s.summary)
        return dspy.Prediction(
            summary=s.summary,
            title=e.title,
            keywords=e.keywords,
            word_count=e.word_count,
            is_technical=e.is_technical,
        )


def build_pipeline() -> dspy.Module:
    return Pipeline()


_CLASSIFY_TRAIN = [
    ("I love how fast this is.", "positive", 0.95),
    ("The update broke everything.", "negative", 0.9),
    ("The meeting is at noon.", "neutral", 0.8),
    ("Support never answered my ticket.", "negative", 0.85),
]


def write_states(out_dir: Path) -> list[Path]:
    """Compile and save the example states (no LM needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trainset = [
        dspy.Example(text=t, sentiment=s, confidence=c).with_inputs("text") for t, s, c in _CLASSIFY_TRAIN
    ]
    classifier = dspy.LabeledFewShot(k=len(trainset)).compile(build_classifier(), trainset=trainset)
    written = [out_dir / "classify.json", out_dir / "qa_v1.json", out_dir / "qa_v2.json"]
    classifier.save(str(written[0]))
    qa = build_qa()
    qa.save(str(written[1]))
    qa_v2 = build_qa()
    qa_v2.predict.signature = qa_v2.predict.signature.with_instructions(
        "Answer the question concisely, in one sentence, after thinking step by step."
    )
    qa_v2.save(str(written[2]))
    return written


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "configs" / "states"
    for p in write_states(target):
        print(f"wrote {p}")
