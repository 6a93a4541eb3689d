"""What a caller hands to ``Engine.run`` and what it gets back.

Owns: the request and result value types — the fixed tasks (``Request``), interleaved texts and
pictures (``InterleavedRequest`` of ``TextPart`` / ``ImagePart``), a result's quality-gate
answers and its saved context — the checks that need no model (task, prompt, images present,
gate questions, parts), and the posterior-noise seed a picture gets when its part names none
(``picture_noise_seed``). Model-dependent checks (image decodable, size within the model's
maximum) are done by the engine, which knows the checkpoint. Leaves execution to ``engine.py``
(interleaved contexts to ``interleaved.py``), the gate's scoring to ``gate.py`` and what a
saved context holds to ``saved_contexts.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from bagel.config import TASKS, GenerationParams
from bagel.errors import InputError
from bagel.saved_contexts import SavedContext

MAX_PROMPT_CHARS = 8000
MAX_GATE_QUESTIONS = 16
GATED_TASKS = ("generate", "edit")
OUTPUTS = ("text", "image")

# progress(request_index, step, total_steps) — called from the denoising loop, host side.
ProgressFn = Callable[[int, int, int], None]
# should_cancel(request_index) -> True to stop that request at the next step boundary.
CancelFn = Callable[[int], bool]


def _check_seed(value: object, field_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InputError(f"{field_name}: {value!r} must be an integer in 0..2^63-1")


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
            _check_seed(self.context_seed, "context_seed")
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


def picture_noise_seed(image: Image.Image) -> int:
    """The posterior-noise seed of a picture whose ``ImagePart`` names none: 63 bits of a hash of
    its mode, size and pixel bytes, so the same picture gets the same latent in any request (a
    session sends its pictures again every turn, and a saved prefix must not depend on the
    turn's seed)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "big") >> 1


@dataclass(frozen=True)
class TextPart:
    """A text of an interleaved request: one ``<|im_start|>`` … ``<|im_end|>`` segment."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """A picture of an interleaved request: its SigLIP (ViT) block when ``understand``, its clean
    VAE latent block when ``generate`` (read only by a request whose output is an image); at
    least one of the two. ``noise_seed`` seeds the VAE posterior noise of this picture on its
    own generator; None: ``picture_noise_seed`` of the picture."""

    image: Image.Image
    understand: bool = True
    generate: bool = True
    noise_seed: int | None = None


@dataclass
class InterleavedRequest:
    """Texts and pictures in any order (a conversation), answered with a text or a picture — the
    reference's ``interleave_inference`` (contexts: ``interleaved.py``).

    ``output``: "text" (an answer, as the understand task: pictures are read through their ViT
    block only; with ``think`` the reply's ``<think>…</think>`` part becomes ``think_text``) or
    "image" (as generate/edit, with both CFG contexts; with ``think`` a planning text is decoded
    first). The output picture has the size of the last picture with a VAE block (``generate``),
    else ``width``×``height`` snapped to the latent stride. ``init_noise`` replaces the seeded
    initial noise (golden tests). A list of parts is stored as a tuple.
    """

    parts: tuple[TextPart | ImagePart, ...]
    output: str
    think: bool = False
    width: int = 1024
    height: int = 1024
    params: GenerationParams = field(default_factory=GenerationParams)
    init_noise: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):
            self.parts = tuple(self.parts)
        if not isinstance(self.parts, tuple) or not self.parts:
            raise InputError("parts: a non-empty list of TextPart and ImagePart is required")
        if self.output not in OUTPUTS:
            raise InputError(f"output: {self.output!r} is not one of {OUTPUTS}")
        if not isinstance(self.think, bool):
            raise InputError(f"think: {self.think!r} must be true or false")
        for k, part in enumerate(self.parts):
            if isinstance(part, TextPart):
                self._check_text(k, part)
            elif isinstance(part, ImagePart):
                self._check_image(k, part)
            else:
                raise InputError(f"parts[{k}]: a TextPart or ImagePart is required, got {type(part).__name__}")
        if not any(isinstance(part, TextPart) for part in self.parts):
            raise InputError(f"parts: at least one TextPart is required, got {len(self.parts)} pictures and no text")
        if self.init_noise is not None and self.output == "text":
            raise InputError("init_noise: a text output generates no picture")

    @staticmethod
    def _check_text(k: int, part: TextPart) -> None:
        if not isinstance(part.text, str) or not part.text.strip():
            raise InputError(f"parts[{k}].text: must be a non-empty string")
        if len(part.text) > MAX_PROMPT_CHARS:
            raise InputError(f"parts[{k}].text: {len(part.text)} characters exceeds the {MAX_PROMPT_CHARS} limit")

    def _check_image(self, k: int, part: ImagePart) -> None:
        if not isinstance(part.image, Image.Image):
            raise InputError(f"parts[{k}].image: a decoded PIL picture is required, got {type(part.image).__name__}")
        for name in ("understand", "generate"):
            if not isinstance(getattr(part, name), bool):
                raise InputError(f"parts[{k}].{name}: {getattr(part, name)!r} must be true or false")
        if not part.understand and not part.generate:
            raise InputError(f"parts[{k}]: understand and generate are both false, so the picture is in no context")
        if not part.understand and self.output == "text":
            raise InputError(f"parts[{k}].understand: false, but a text output reads a picture only through its "
                             "ViT block")
        if part.noise_seed is not None:
            _check_seed(part.noise_seed, f"parts[{k}].noise_seed")


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
    """Outcome of one request: ``image`` for generate/edit (and an interleaved request's image
    output), ``text`` for understand (and a text output), ``think_text`` when think was on,
    ``canceled`` when should_cancel stopped it (then no image/text). ``gate``: one
    ``GateAnswer`` per gate question, in order (None when the request asked none or was
    canceled). ``context``: with ``run(..., keep_contexts=True)``, an interleaved request's
    main context after its parts (None otherwise). ``stats`` holds counters (forwards, context
    encodes, model seconds) used by the service and the benchmark."""

    image: Image.Image | None = None
    text: str | None = None
    think_text: str | None = None
    canceled: bool = False
    gate: list[GateAnswer] | None = None
    context: SavedContext | None = None
    stats: dict[str, float] = field(default_factory=dict)
