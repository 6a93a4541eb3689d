"""What a caller hands to ``Engine.run`` and what it gets back.

Owns: the request and result value types (a result's quality-gate answers included) and the
checks that need no model (task, prompt, images present, gate questions). Model-dependent
checks (image decodable, size within the model's maximum) are done by the engine, which knows
the checkpoint. Leaves execution to ``engine.py`` and the gate's scoring to ``gate.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from bagel.config import TASKS, GenerationParams
from bagel.errors import InputError

MAX_PROMPT_CHARS = 8000
MAX_GATE_QUESTIONS = 16
GATED_TASKS = ("generate", "edit")

# progress(request_index, step, total_steps) — called from the denoising loop, host side.
ProgressFn = Callable[[int, int, int], None]
# should_cancel(request_index) -> True to stop that request at the next step boundary.
CancelFn = Callable[[int], bool]


@dataclass
class Request:
    """One unit of work. ``images`` are decoded RGB(A) pictures (see ``transforms.load_image``).

    task: "generate" (prompt → image of ``width``×``height``), "edit" (images[0] + prompt →
    image of the VAE-resized input's size), "understand" (images + prompt → text).
    ``think`` generates reasoning text first. ``init_noise`` ([h·w, 64], packed layout) and
    ``posterior_noise`` ([1, 16, H/8, W/8]) replace the seeded draws (golden tests).

    ``context_seed`` seeds the VAE posterior noise of an edit's input picture on its own
    generator; the request's seed then draws only the initial noise. None: the request's
    generator draws the posterior noise first, as the reference does. Edits that share a
    picture and a ``context_seed`` (or the same ``posterior_noise``) share one encoder pass,
    one sampled latent and one prefilled picture context — a try-on chunk sets the same value
    (e.g. a hash of the product file) on every scene so the product is encoded once.

    ``gate_questions`` (generate and edit only; a list is stored as a tuple): yes/no questions,
    already formatted, that the same run asks the understanding path about the request's own
    picture (``gate.py``); ``Result.gate`` then holds one ``GateAnswer`` per question.
    """

    task: str
    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    think: bool = False
    width: int = 1024
    height: int = 1024
    params: GenerationParams = field(default_factory=GenerationParams)
    init_noise: torch.Tensor | None = None
    posterior_noise: torch.Tensor | None = None
    context_seed: int | None = None
    gate_questions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"task: {self.task!r} is not one of {TASKS}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("prompt: must be a non-empty string")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt: {len(self.prompt)} characters exceeds the {MAX_PROMPT_CHARS} limit")
        if self.task == "edit" and len(self.images) != 1:
            raise InputError(f"images: edit takes exactly 1 input image, got {len(self.images)}")
        if self.task == "understand" and not self.images:
            raise InputError("images: understand needs at least 1 input image")
        if self.task == "generate" and self.images:
            raise InputError("images: generate takes no input image (use edit)")
        if self.context_seed is not None:
            if isinstance(self.context_seed, bool) or not isinstance(self.context_seed, int) \
                    or not 0 <= self.context_seed < 2**63:
                raise InputError(f"context_seed: {self.context_seed!r} must be an integer in 0..2^63-1")
            if self.posterior_noise is not None:
                raise InputError("context_seed: give either context_seed or posterior_noise, not both")
        self._check_gate_questions()

    def _check_gate_questions(self) -> None:
        if isinstance(self.gate_questions, list):
            self.gate_questions = tuple(self.gate_questions)
        if not isinstance(self.gate_questions, tuple):
            raise InputError(f"gate_questions: a list of question strings is required, "
                             f"got {type(self.gate_questions).__name__}")
        if not self.gate_questions:
            return
        if self.task not in GATED_TASKS:
            raise InputError(f"gate_questions: only a generate or edit request's picture can be judged "
                             f"(task {self.task!r})")
        if len(self.gate_questions) > MAX_GATE_QUESTIONS:
            raise InputError(f"gate_questions: {len(self.gate_questions)} questions exceed the "
                             f"{MAX_GATE_QUESTIONS} question limit")
        for k, question in enumerate(self.gate_questions):
            if not isinstance(question, str) or not question.strip():
                raise InputError(f"gate_questions[{k}]: must be a non-blank string, got {question!r}")
            if len(question) > MAX_PROMPT_CHARS:
                raise InputError(f"gate_questions[{k}]: {len(question)} characters exceeds the "
                                 f"{MAX_PROMPT_CHARS} limit")


@dataclass(frozen=True)
class GateAnswer:
    """One gate question's score. ``yes_prob`` / ``no_prob``: the float32 softmax over the whole
    vocabulary of the first answer token, summed over the yes / no token ids (``gate.py``);
    ``p_yes = yes_prob / (yes_prob + no_prob)``, 0.5 when both are 0."""

    question: str
    p_yes: float
    yes_prob: float
    no_prob: float


@dataclass
class Result:
    """Outcome of one request: ``image`` for generate/edit, ``text`` for understand,
    ``think_text`` when think was on, ``canceled`` when should_cancel stopped it (then no
    image/text). ``gate``: one ``GateAnswer`` per gate question, in order (None when the request
    asked none or was canceled). ``stats`` holds counters (forwards, context encodes,
    model seconds) used by the service and the benchmark."""

    image: Image.Image | None = None
    text: str | None = None
    think_text: str | None = None
    canceled: bool = False
    gate: list[GateAnswer] | None = None
    stats: dict[str, float] = field(default_factory=dict)
