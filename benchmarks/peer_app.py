"""The peer baseline: a DSPy program behind FastAPI, as in DSPy's deployment tutorial
(https://dspy.ai/tutorials/deployment/): a module-level program, ``dspy.configure`` at
import, ``POST /predict`` that awaits the program and returns the prediction's fields.

It serves the same program as our ``qa`` model (``serve_app.examples:build_qa`` with
``configs/states/qa_v1.json`` loaded) against the same LM simulator, with the same LM
settings (no DSPy cache, no retries). No cache, no coalescing, no admission control: that
is the baseline.

    PEER_LM_API_BASE=http://127.0.0.1:8100/v1 \\
        uvicorn benchmarks.peer_app:app --workers 1 --host 127.0.0.1 --port 8001 --no-access-log

Environment: ``PEER_LM_API_BASE`` (the simulator's ``/v1`` URL, required), ``PEER_LM_MODEL``
(default ``openai/sim-qa``), ``PEER_LM_TIMEOUT_S`` (default 5, like our model's LM timeout).

Request ``{"question": "..."}``; response ``{"status": "success", "data": {"reasoning": ...,
"answer": ...}}`` (the tutorial's shape); a failure is HTTP 500 with the error text.
"""

from __future__ import annotations

import os
from pathlib import Path

import dspy
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from serve_app.examples import build_qa

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-map fetch from the internet

_STATE = Path(__file__).resolve().parents[1] / "configs" / "states" / "qa_v1.json"

app = FastAPI(title="DSPy program API (peer baseline)")


class Question(BaseModel):
    question: str


lm = dspy.LM(
    os.environ.get("PEER_LM_MODEL", "openai/sim-qa"),
    api_base=os.environ["PEER_LM_API_BASE"],
    api_key="sim",
    cache=False,
    num_retries=0,
    timeout=float(os.environ.get("PEER_LM_TIMEOUT_S", "5")),
    max_tokens=512,
    temperature=0.0,
)
dspy.configure(lm=lm)

program = build_qa()
program.load(str(_STATE))


@app.post("/predict")
async def predict(question: Question) -> dict:
    try:
        result = await program.acall(question=question.question)
        return {"status": "success", "data": result.toDict()}
    except Exception as exc:  # noqa: BLE001 - the tutorial's handler
        raise HTTPException(status_code=500, detail=str(exc)) from None


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}
