"""Per-request parameters of a job: tasks, per-task defaults, allowed ranges, sizes, prompts
and metadata.

Owns: the service's view of BAGEL's hyper-parameters (names and defaults follow the reference
app; ranges are the service's own, a little tighter than what the engine accepts), the try-on
task (an edit with a product image and a scene prompt, defaults tuned to keep the product as
it is) and output-size rules (an edit's or try-on's output size computed at submit from the input
picture with the engine's own torch-free rule, ``bagel.sizes``). Leaves running them to the engine
(``bagel.config.GenerationParams`` checks again on the worker), HTTP shapes to ``api/`` and
the webhook URL policy to ``webhook_targets.py``.

Every error names the field, the value and the limit. ``resolve`` always returns a complete
dict with a seed, so a job row holds exactly what the worker will run.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bagel.config import BagelConstants
from bagel.sizes import vae_size
from worker.errors import InvalidInput, InvalidParameter

TASKS = ("generate", "edit", "understand", "tryon")
IMAGE_OUTPUT_TASKS = ("generate", "edit", "tryon")
RENORM_TYPES = ("global", "channel", "text_channel")
MAX_PROMPT_CHARS = 8000
MAX_METADATA_BYTES = 16 * 1024
SIDE_MULTIPLE_PX = 16
MIN_SIDE_PX = 16
SEED_MAX = 2**63 - 1
# The tiny demo checkpoint's minimum picture side: ``worker.gpu`` writes the checkpoint with it, and
# the API states edit and try-on output sizes with it.
DEMO_MIN_SIDE_PX = 256
_TEXT_WHITESPACE = "\t\n\r"

# Images each task takes: (minimum, maximum).
INPUT_IMAGES = {"generate": (0, 0), "edit": (1, 1), "tryon": (1, 1), "understand": (1, 4)}


@dataclass(frozen=True)
class Range:
    """Allowed values of one hyper-parameter; ``low_open`` excludes ``low`` itself."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.kind is bool:
            return "true or false"
        left = "<" if self.low_open else "<="
        return f"{self.low} {left} value <= {self.high}"


LIMITS: dict[str, Range] = {
    "cfg_text_scale": Range(float, 0.0, 30.0),
    "cfg_img_scale": Range(float, 0.0, 30.0),
    "cfg_interval": Range(float, 0.0, 1.0),  # a pair [start, end], start <= end
    "timestep_shift": Range(float, 0.0, 20.0, low_open=True),
    "num_timesteps": Range(int, 2, 200),
    "cfg_renorm_min": Range(float, 0.0, 1.0),
    "cfg_renorm_type": Range(str, choices=RENORM_TYPES),
    "max_think_tokens": Range(int, 1, 4096),
    "max_new_tokens": Range(int, 1, 4096),
    "do_sample": Range(bool),
    "text_temperature": Range(float, 0.0, 10.0, low_open=True),
    "seed": Range(int, 0, SEED_MAX),
    "taylorseer": Range(bool),
}

_BASE = {
    "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": [0.4, 1.0], "timestep_shift": 3.0,
    "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global", "max_think_tokens": 1024,
    "max_new_tokens": 512, "do_sample": False, "text_temperature": 0.3,
    # TaylorSeer step caching (the reference's enable_taylorseer): an approximation that skips
    # about 3 in 5 decoder passes of a 50-step image; off by default, as in the reference.
    "taylorseer": False,
}
_EDIT = {**_BASE, "cfg_img_scale": 2.0, "cfg_interval": [0.0, 1.0], "cfg_renorm_type": "text_channel"}
# Try-on: stronger image guidance over the whole schedule keeps the product's shape, colours and
# printed text; the scene prompt still steers everything around it.
_TRYON = {**_EDIT, "cfg_img_scale": 2.5}
DEFAULTS: dict[str, dict[str, Any]] = {"generate": _BASE, "edit": _EDIT, "tryon": _TRYON, "understand": _BASE}

TRYON_TEMPLATE = ("Place this exact product into the scene described below. Keep the product itself "
                  "unchanged: the same shape, proportions, colours, materials, logo and printed text. "
                  "Change only its surroundings, lighting and placement. Scene: {scene}")


def check_task(task: str, field: str = "task") -> str:
    if task not in TASKS:
        raise InvalidParameter(f"{field}: {task!r} is not one of {list(TASKS)}", field=field)
    return task


def engine_task(task: str) -> str:
    """The engine's task for a service task (try-on runs as an edit)."""
    return "edit" if task == "tryon" else check_task(task)


def engine_prompt(task: str, prompt: str) -> str:
    """The prompt the engine sees: try-on wraps the scene in the product-keeping instruction."""
    prompt = prompt.strip()
    return TRYON_TEMPLATE.format(scene=prompt) if task == "tryon" else prompt


def check_text(text: str, field: str, *, allow_whitespace: bool = True, what: str = "",
               error: type[InvalidInput] = InvalidParameter) -> str:
    """Refuse C0 control characters (U+0000..U+001F) in any text that reaches the database:
    Postgres cannot store NUL, and the others are never meant in a prompt, a key or a URL.
    ``allow_whitespace`` lets tab, newline and carriage return through (prompts, metadata
    values); ``what`` names the text inside the field (a metadata key). Positions count from 0."""
    allowed = _TEXT_WHITESPACE if allow_whitespace else ""
    for position, char in enumerate(text):
        if char < " " and char not in allowed:
            subject = f"{what} " if what else ""
            raise error(f"{field}: {subject}contains the control character U+{ord(char):04X} at position "
                        f"{position}", field=field)
    return text


def check_prompt(prompt: Any, field: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidParameter(f"{field}: must be a non-empty string", field=field)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidParameter(f"{field}: {len(prompt)} characters exceeds the {MAX_PROMPT_CHARS} limit",
                               field=field)
    return check_text(prompt, field)


def _check_number(name: str, value: Any, rng: Range, field: str) -> Any:
    if rng.kind is bool:
        if not isinstance(value, bool):
            raise InvalidParameter(f"{field}: {value!r} must be {rng.describe()}", field=field)
        return value
    if rng.choices:
        if value not in rng.choices:
            raise InvalidParameter(f"{field}: {value!r} is not {rng.describe()}", field=field)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"{field}: {value!r} is not a number", field=field)
    if rng.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidParameter(f"{field}: {value!r} must be a whole number", field=field)
        value = int(value)
    else:
        value = float(value)
    too_low = value <= rng.low if rng.low_open else value < rng.low
    if too_low or value > rng.high:
        raise InvalidParameter(f"{field}: {value!r} is outside the allowed range {rng.describe()}", field=field)
    return value


def resolve(task: str, user_params: dict[str, Any] | None, think: bool, *, field: str = "params") -> dict[str, Any]:
    """Task defaults overlaid with the user's values, each checked against ``LIMITS``; a seed is
    drawn when none is given. Unknown names are refused."""
    check_task(task)
    user_params = dict(user_params or {})
    unknown = sorted(set(user_params) - set(LIMITS))
    if unknown:
        raise InvalidParameter(f"{field}.{unknown[0]}: unknown parameter (known: {sorted(LIMITS)})",
                               field=f"{field}.{unknown[0]}")
    out = dict(DEFAULTS[task])
    for name, value in user_params.items():
        if value is None:
            continue
        where = f"{field}.{name}"
        if name == "cfg_interval":
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise InvalidParameter(f"{where}: {value!r} must be a pair [start, end]", field=where)
            start = _check_number(name, value[0], LIMITS[name], f"{where}[0]")
            end = _check_number(name, value[1], LIMITS[name], f"{where}[1]")
            if start > end:
                raise InvalidParameter(f"{where}: start {start} is after end {end} (need start <= end)",
                                       field=where)
            out[name] = [start, end]
        else:
            out[name] = _check_number(name, value, LIMITS[name], where)
    if out.get("seed") is None:
        out["seed"] = secrets.randbelow(2**31)
    out["think"] = bool(think)
    return out


@functools.cache
def picture_constants(model_path: Path | None) -> BagelConstants:
    """The picture-resize constants of the checkpoint the GPU workers run, read without torch:
    its optional ``bagel_config.json`` (the real checkpoint has none, so the reference's values
    hold even where the API does not mount the model), or the tiny demo checkpoint's when no
    model path is set."""
    if model_path is None:
        return replace(BagelConstants(), vae_min_px=DEMO_MIN_SIDE_PX, vit_min_px=DEMO_MIN_SIDE_PX)
    return BagelConstants.from_folder(model_path)


def resolve_size(task: str, width: int | None, height: int | None, *, max_side_px: int,
                 input_size: tuple[int, int] | None, constants: BagelConstants) -> tuple[int | None, int | None]:
    """Output size (None for understand, which answers in text). Generate takes
    ``width``×``height`` (default the largest square allowed, up to 1024), multiples of 16 in
    16..``max_side_px``. Edit and try-on refuse an explicit size: their output has the size the
    model resizes the input picture to (``input_size``, upright; ``bagel.sizes.vae_size`` with
    the checkpoint's ``constants``), so the job states it from submission on."""
    if task != "generate":
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                raise InvalidParameter(f"{name}: not accepted for task {task!r} ({_size_rule(task, constants)})",
                                       field=name)
        if task not in IMAGE_OUTPUT_TASKS:
            return None, None
        assert input_size is not None, "the input count is checked before the size"
        return vae_size(*input_size, constants)
    default = min(1024, max_side_px) // SIDE_MULTIPLE_PX * SIDE_MULTIPLE_PX
    sides = []
    for name, value in (("width", width), ("height", height)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParameter(f"{name}: {value!r} is not a whole number of pixels", field=name)
        if not MIN_SIDE_PX <= value <= max_side_px:
            raise InvalidParameter(f"{name}: {value} px is outside {MIN_SIDE_PX}..{max_side_px} px", field=name)
        if value % SIDE_MULTIPLE_PX:
            raise InvalidParameter(f"{name}: {value} px is not a multiple of {SIDE_MULTIPLE_PX}", field=name)
        sides.append(value)
    return sides[0], sides[1]


def _size_rule(task: str, constants: BagelConstants) -> str:
    if task not in IMAGE_OUTPUT_TASKS:
        return "it answers in text"
    return (f"the output has the input picture's size, scaled so that its short side is at least "
            f"{constants.vae_min_px} px and its long side at most {constants.vae_max_px} px (the long side wins), "
            f"sides rounded to multiples of {constants.vae_stride} px; the job's width and height show it from "
            "submission on")


def check_input_count(task: str, count: int, field: str = "input_file_ids") -> None:
    low, high = INPUT_IMAGES[task]
    if not low <= count <= high:
        want = str(low) if low == high else f"{low}..{high}"
        raise InvalidParameter(f"{field}: task {task!r} takes {want} input image(s), got {count}", field=field)


def check_metadata(metadata: Any, field: str = "metadata") -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidParameter(f"{field}: must be a JSON object", field=field)
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidParameter(f"{field}: {size:,} bytes of JSON exceeds the {MAX_METADATA_BYTES:,} byte limit",
                               field=field)
    _check_metadata_text(metadata, field)
    return metadata


def _check_metadata_text(value: Any, field: str) -> None:
    """Keys (no control characters at all) and string values (tab/newline/CR allowed), at any
    depth; the field is the path to the value (``metadata.tags[2]``)."""
    if isinstance(value, str):
        check_text(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(str(key), field, allow_whitespace=False, what=f"key {str(key)!r}")
            _check_metadata_text(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_metadata_text(item, f"{field}[{i}]")
