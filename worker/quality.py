"""The quality gate: BAGEL judges its own picture and the job is made again when it falls short.

Owns: the versioned question sets (per task, with the job's prompt written in; a tenant may
replace them: ``check_question_set``, ``bagel-jobs tenant gate-questions``), the gate's settings
on a job (``GateSpec``, from ``params["quality_gate"]``), the score (the mean over the questions
of P(yes) / (P(yes) + P(no)) for the answer's first token, ``bagel.gate``), the regeneration
rounds (``regenerate``: the jobs of a chunk below their threshold run again together with the
next seed, up to ``max_regenerations`` times; the best attempt is the result) and the job's
record (``record``: every attempt's seed, score and answers, which one is the result, the
verdict ``passed`` or ``best_effort``). Torch-free: the engine calls go through the function
``worker.gpu`` hands in. Leaves the scoring passes to the engine (``bagel.gate``), storing the
attempts' pictures to ``execution.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from worker.errors import InvalidParameter

if TYPE_CHECKING:
    from worker.gpu import JobInput, JobOutput

log = logging.getLogger(__name__)

QUESTIONS_VERSION = "builtin-1"  # bumped whenever a built-in question changes
_NO_DEFECTS = ("Is the {picture} free of obvious defects such as distorted shapes, extra or missing limbs, garbled "
               "text, smeared areas or noise? Answer yes or no.")
BUILTIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "generate": (
        "Does this picture show the following: {prompt}? Answer yes or no.",
        _NO_DEFECTS.replace("{picture}", "picture"),
    ),
    "edit": (
        ("The first picture is the original and the second is the edited result. Does the second picture carry "
         "out this instruction: {prompt}? Answer yes or no."),
        _NO_DEFECTS.replace("{picture}", "second picture"),
    ),
    "tryon": (
        ("The first picture shows a product and the second is a photo made with it. Is the product from the first "
         "picture visible in the second, unaltered in shape, colour and markings? Answer yes or no."),
        "Does the scene of the second picture match this description: {prompt}? Answer yes or no.",
        _NO_DEFECTS.replace("{picture}", "second picture"),
    ),
}
GATED_TASKS = tuple(BUILTIN_QUESTIONS)
DEFAULT_THRESHOLD = 0.5
DEFAULT_REGENERATIONS = 2
MAX_REGENERATIONS = 4
MAX_QUESTIONS = 8  # per task in a tenant's set (the engine takes up to 16)
MAX_QUESTION_CHARS = 500
SEED_MODULUS = 2**63  # seeds are 0..2^63-1 (``worker.params.SEED_MAX``)


@dataclass(frozen=True)
class GateSpec:
    """One job's gate: its threshold and regenerations (from its params) and its questions,
    already written for its prompt, with the version of the set they came from."""

    threshold: float
    max_regenerations: int
    questions: tuple[str, ...]
    version: str


def gate_params(threshold: float | None, max_regenerations: int | None) -> dict[str, Any]:
    """What a job stores as ``params["quality_gate"]`` (defaults filled in)."""
    return {"threshold": DEFAULT_THRESHOLD if threshold is None else float(threshold),
            "max_regenerations": DEFAULT_REGENERATIONS if max_regenerations is None else int(max_regenerations)}


def check_question_set(data: Any) -> dict[str, list[str]]:
    """A tenant's question set: ``{task: [question, …]}`` for some of generate, edit and tryon
    (a task left out keeps the built-in questions); each question mentions the job's prompt as
    ``{prompt}`` if at all. Raises ``InvalidParameter`` naming the entry and the limit."""
    if not isinstance(data, Mapping) or not data:
        raise InvalidParameter("gate_questions: must be a JSON object of task → list of questions",
                               field="gate_questions")
    out: dict[str, list[str]] = {}
    for task, questions in data.items():
        where = f"gate_questions.{task}"
        if task not in GATED_TASKS:
            raise InvalidParameter(f"{where}: {task!r} is not one of {list(GATED_TASKS)}", field=where)
        if not isinstance(questions, list) or not 1 <= len(questions) <= MAX_QUESTIONS:
            raise InvalidParameter(f"{where}: must be a list of 1..{MAX_QUESTIONS} questions", field=where)
        for n, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip() or len(question) > MAX_QUESTION_CHARS:
                raise InvalidParameter(f"{where}[{n}]: must be a non-blank text of at most {MAX_QUESTION_CHARS} "
                                       "characters", field=f"{where}[{n}]")
            try:
                question.format(prompt="")
            except (KeyError, IndexError, ValueError) as exc:
                raise InvalidParameter(f"{where}[{n}]: the only placeholder is {{prompt}} ({exc!r})",
                                       field=f"{where}[{n}]") from exc
        out[task] = list(questions)
    return out


def spec_for(task: str, prompt: str, params: Mapping[str, Any], tenant_set: Mapping[str, list[str]] | None
             ) -> GateSpec | None:
    """The job's gate, or None when it asked for none."""
    gate = params.get("quality_gate")
    if not gate or task not in GATED_TASKS:
        return None
    if tenant_set and task in tenant_set:
        templates = tuple(tenant_set[task])
        digest = hashlib.sha256(json.dumps(tenant_set, sort_keys=True).encode()).hexdigest()[:12]
        version = f"tenant-{digest}"
    else:
        templates, version = BUILTIN_QUESTIONS[task], QUESTIONS_VERSION
    return GateSpec(threshold=float(gate["threshold"]), max_regenerations=int(gate["max_regenerations"]),
                    questions=tuple(t.format(prompt=prompt) for t in templates), version=version)


def score(answers: list[dict[str, Any]]) -> float:
    """The mean P(yes) over the questions."""
    return sum(a["p_yes"] for a in answers) / len(answers)


@dataclass
class Attempt:
    """One picture the gate judged: its seed, score and answers, and the engine's output."""

    seed: int
    score: float
    answers: list[dict[str, Any]]
    output: JobOutput


def regenerate(inputs: list[JobInput], outputs: list[JobOutput],
               run_round: Callable[[list[JobInput]], list[JobOutput]]) -> list[JobOutput]:
    """The gated jobs whose picture scored below their threshold run again with the next seed,
    all of a round in one engine call (``run_round``), until each passes or has used its
    ``max_regenerations``; each gated output then is its best attempt's, with every attempt
    (``attempts``), the record (``quality``) and the time of its extra rounds. A job canceled
    in a later round ends canceled; one whose later round failed keeps its best picture so far."""
    attempts: dict[int, list[Attempt]] = {}
    for k, (job, out) in enumerate(zip(inputs, outputs, strict=True)):
        if job.gate is not None and out.png is not None and out.gate is not None:
            attempts[k] = [Attempt(int(job.params["seed"]), score(out.gate), out.gate, out)]
    open_ = set(attempts)  # jobs that may still regenerate
    extra_s: dict[int, float] = {}
    while True:
        again = [k for k in sorted(open_) if attempts[k][-1].score < inputs[k].gate.threshold
                 and len(attempts[k]) <= inputs[k].gate.max_regenerations]
        if not again:
            break
        round_inputs = [replace(inputs[k], params={**inputs[k].params,
                                                   "seed": (attempts[k][-1].seed + 1) % SEED_MODULUS})
                        for k in again]
        started = time.perf_counter()
        results = run_round(round_inputs)
        elapsed = time.perf_counter() - started
        log.info("quality gate: %d job(s) below their threshold made again in %.2f s", len(again), elapsed)
        for k, job, out in zip(again, round_inputs, results, strict=True):
            extra_s[k] = extra_s.get(k, 0.0) + elapsed / len(again)
            if out.canceled:
                outputs[k] = replace(out, regeneration_seconds=extra_s[k])
                del attempts[k]
                open_.discard(k)
            elif out.png is None or out.gate is None:
                log.warning("quality gate: job %s's attempt with seed %s failed (%s); its best attempt stands",
                            job.job_id, job.params["seed"], out.error_code)
                open_.discard(k)
            else:
                attempts[k].append(Attempt(int(job.params["seed"]), score(out.gate), out.gate, out))
    for k, tried in attempts.items():
        best = max(range(len(tried)), key=lambda i: tried[i].score)
        outputs[k] = replace(tried[best].output, attempts=[a.output.png for a in tried], chosen=best,
                             regeneration_seconds=extra_s.get(k, 0.0),
                             quality=record(inputs[k].gate, tried, best))
    return outputs


def record(gate: GateSpec, attempts: list[Attempt], chosen: int) -> dict[str, Any]:
    """The job's quality record, without the attempts' storage keys (``execution.py`` adds
    them once they are stored)."""
    best = attempts[chosen]
    return {
        "gate": "passed" if best.score >= gate.threshold else "best_effort",
        "score": round(best.score, 6), "threshold": gate.threshold, "max_regenerations": gate.max_regenerations,
        "questions_version": gate.version, "chosen": chosen,
        "attempts": [{"seed": a.seed, "score": round(a.score, 6), "answers": a.answers} for a in attempts],
    }
