"""Bodies of the quality gate and of exact-request dedupe (pydantic): the gate a job asks for,
what the gate recorded, and how a job relates to an identical one.

Owns: their wire format; the limits come from ``worker.quality``. Leaves the rest of the job's
body to ``api.schemas``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.quality import DEFAULT_REGENERATIONS, DEFAULT_THRESHOLD, MAX_REGENERATIONS

Dedupe = Literal["hit", "waiting", "miss"]
DEDUPE_TEXT = ("exact-request dedupe: `hit` — answered from an identical job's result (`dedupe_of`), no GPU time; "
               "`waiting` — waits on the identical job `dedupe_of` still running; `miss` — it runs itself; null — it "
               "does not qualify (no seed given, the tenant opted out, a re-run)")
DEDUPE_OF_TEXT = "the identical job whose result answers it (hit) or that it waits on (waiting)"
Gate = Literal["passed", "best_effort"]
GATE_TEXT = "`passed`: the result reached the threshold; `best_effort`: no attempt did, the best one is the result"


class QualityGateIn(BaseModel):
    """Ask BAGEL to judge its own picture: a fixed set of yes/no questions about the result and
    the request, scored by the probability of "yes"; below the threshold the job is made again
    with the next seed, up to ``max_regenerations`` times, and the best attempt is the result."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"threshold": 0.6, "max_regenerations": 2}]})

    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0, description="the least score (mean over the questions "
                             "of P(yes) / (P(yes) + P(no))) that passes")
    max_regenerations: int = Field(DEFAULT_REGENERATIONS, ge=0, le=MAX_REGENERATIONS, description="attempts after "
                                   "the first, each with the next seed, each counted in GPU-seconds")


class QualityAnswer(BaseModel):
    question: str = Field(description="the question as asked (the job's prompt written in)")
    p_yes: float = Field(description="P(yes) / (P(yes) + P(no)) of the answer's first token")
    yes_prob: float = Field(description="probability of the yes tokens")
    no_prob: float = Field(description="probability of the no tokens")


class QualityAttempt(BaseModel):
    seed: int = Field(description="the seed this attempt was made with")
    score: float = Field(description="the mean p_yes of its answers")
    answers: list[QualityAnswer] = Field(description="one per question")
    url: str | None = Field(None, description="a download URL of this attempt's picture")


class QualityOut(BaseModel):
    """The quality gate's record: every attempt and the verdict."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "gate": "passed", "score": 0.71, "threshold": 0.6, "max_regenerations": 2, "questions_version": "builtin-1",
        "chosen": 1, "attempts": [
            {"seed": 7, "score": 0.42, "answers": [{"question": "Does the scene …? Answer yes or no.", "p_yes": 0.42,
                                                    "yes_prob": 0.3, "no_prob": 0.41}], "url": None},
            {"seed": 8, "score": 0.71, "answers": [{"question": "Does the scene …? Answer yes or no.", "p_yes": 0.71,
                                                    "yes_prob": 0.5, "no_prob": 0.2}], "url": None}]}]})

    gate: Gate = Field(description=GATE_TEXT)
    score: float = Field(description="the result's score")
    threshold: float = Field(description="the score that passes")
    max_regenerations: int = Field(description="the attempts after the first it could make")
    questions_version: str = Field(description="the question set: `builtin-N`, or `tenant-<hash>` for the tenant's own")
    chosen: int = Field(description="the index of the attempt that is the result")
    attempts: list[QualityAttempt] = Field(description="every attempt, in order")


class QualitySummary(BaseModel):
    gate: Gate = Field(description=GATE_TEXT)
    score: float = Field(description="the result's score")
    threshold: float = Field(description="the score that passes")
    attempts: int = Field(description="how many pictures were made")
