"""The GPU side of a worker process: the one module that imports ``bagel`` (and torch).

Owns: ``EngineHolder`` (loads ONE ``bagel.engine.Engine`` when the worker process starts and
keeps it; generates the tiny demo checkpoint when no model path is set), turning plain job
inputs into ``bagel.requests.Request`` objects, and one ``engine.run`` call per chunk with
progress and cooperative-cancel callbacks. A bad input is isolated to its own job: a request
that cannot be built fails alone, and when the engine rejects a batch, its requests are rerun
one by one so only the offending job fails. Leaves claims, storage and state to
``execution.py``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bagel.config import GenerationParams
from bagel.errors import BagelError, CheckpointError, InputError
from bagel.requests import CancelFn, ProgressFn, Request, Result
from bagel.transforms import load_image

if TYPE_CHECKING:
    from bagel.engine import Engine
    from worker.settings import Settings

log = logging.getLogger(__name__)

DEMO_MIN_SIDE_PX = 256

_PARAM_NAMES = frozenset(f.name for f in fields(GenerationParams))
# The service's "tryon" is the engine's edit with try-on defaults (chosen in worker.params).
_ENGINE_TASK = {"generate": "generate", "edit": "edit", "understand": "understand", "tryon": "edit"}


@dataclass
class JobInput:
    """What the engine needs for one job, already read from the database and storage."""

    job_id: str
    task: str
    prompt: str
    images: list[bytes]
    think: bool
    width: int
    height: int
    params: dict[str, Any]


@dataclass
class JobOutput:
    """One job's outcome. ``error_code`` set → a permanent failure (never retried)."""

    png: bytes | None = None
    text: str | None = None
    think_text: str | None = None
    canceled: bool = False
    model_seconds: float = 0.0
    error_code: str | None = None
    error_message: str | None = None
    stats: dict[str, float] = field(default_factory=dict)


class EngineHolder:
    """One engine per process, loaded once (thread-safe, idempotent)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    def model_path(self) -> Path:
        """The configured checkpoint, or the tiny demo checkpoint (created on first use)."""
        if self.settings.model_path is not None:
            return Path(self.settings.model_path)
        from bagel.tiny import make_tiny
        from worker.settings import TINY_MODEL_DIR

        folder = TINY_MODEL_DIR
        if not (folder / "ema.safetensors").exists():
            log.warning("BAGEL_JOBS_MODEL_PATH is unset: generating a tiny RANDOM checkpoint in %s", folder)
            # The demo checkpoint keeps 256-px product shots at 256 px (the real model's
            # transforms would upscale them to 512) so the embedded demo stays quick on a CPU.
            make_tiny(folder, seed=0, size="tiny", min_side_px=DEMO_MIN_SIDE_PX)
        log.warning("!!! using the tiny RANDOM demo checkpoint in %s: outputs are noise; set "
                    "BAGEL_JOBS_MODEL_PATH to the real BAGEL-7B-MoT weights for real images !!!", folder)
        return folder

    def load(self) -> Engine:
        with self._lock:
            if self.engine is None:
                from bagel.engine import Engine

                path = self.model_path()
                start = time.perf_counter()
                try:
                    self.engine = Engine.load(path, quantization=self.settings.quantization,
                                              device=self.settings.device)
                except CheckpointError:
                    log.error("checkpoint %s cannot be loaded; the worker refuses to start", path)
                    raise
                self.load_seconds = time.perf_counter() - start
                log.info("engine loaded from %s (quantization=%s, device=%s) in %.1f s", path,
                         self.settings.quantization, self.settings.device, self.load_seconds)
            return self.engine

    def run(self, inputs: list[JobInput], *, progress: ProgressFn, should_cancel: CancelFn) -> list[JobOutput]:
        """Run one chunk. Permanent input problems come back as per-job errors; anything else
        (out of memory, device errors) raises and the caller retries the chunk."""
        engine = self.load()
        outputs: list[JobOutput | None] = [None] * len(inputs)
        requests: list[Request] = []
        positions: list[int] = []
        decoded: dict[int, Any] = {}
        for i, job in enumerate(inputs):
            try:
                requests.append(_build_request(job, decoded, self.settings.max_image_pixels))
                positions.append(i)
            except InputError as exc:
                outputs[i] = JobOutput(error_code=exc.code, error_message=str(exc))

        def run_subset(idx: list[int]) -> list[Result]:
            return engine.run([requests[k] for k in idx],
                              progress=lambda r, step, total: progress(positions[idx[r]], step, total),
                              should_cancel=lambda r: should_cancel(positions[idx[r]]))

        if requests:
            start = time.perf_counter()
            try:
                results: list[Result | BagelError] = list(run_subset(list(range(len(requests)))))
            except InputError as exc:
                if len(requests) == 1:
                    results = [exc]
                else:
                    log.warning("engine rejected a %d-job chunk (%s); rerunning its jobs one by one",
                                len(requests), exc)
                    results = [_run_alone(run_subset, k) for k in range(len(requests))]
            elapsed = time.perf_counter() - start
            for k, result in enumerate(results):
                outputs[positions[k]] = _to_output(result, elapsed / len(requests))
        return [out if out is not None else JobOutput(error_code="internal", error_message="no result")
                for out in outputs]


def _run_alone(run_subset: Any, k: int) -> Result | BagelError:
    try:
        return run_subset([k])[0]
    except InputError as exc:
        return exc


def _build_request(job: JobInput, decoded: dict[int, Any], max_pixels: int) -> Request:
    images = []
    for n, data in enumerate(job.images):
        key = id(data)
        if key not in decoded:  # a chunk shares its input images: decode each once
            decoded[key] = load_image(data, field=f"input_file_ids[{n}]", max_pixels=max_pixels)
        images.append(decoded[key])
    engine_task = _ENGINE_TASK.get(job.task)
    if engine_task is None:
        raise InputError(f"task: {job.task!r} is not one of {sorted(_ENGINE_TASK)}")
    params = GenerationParams(**{k: v for k, v in job.params.items() if k in _PARAM_NAMES})
    return Request(task=engine_task, prompt=job.prompt, images=images, think=job.think,
                   width=job.width, height=job.height, params=params,
                   context_seed=picture_context_seed(job.images[0]) if engine_task == "edit" else None)


def picture_context_seed(data: bytes) -> int:
    """The posterior-noise seed of an edit's input picture: a function of its bytes alone, so
    every scene of a try-on batch (and any rerun of a job) samples the product's latent the same
    way, and the engine encodes and prefills the product once per chunk. The job's own seed
    still draws the initial noise of each image."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1


def _to_output(result: Result | BagelError, share_s: float) -> JobOutput:
    if isinstance(result, BagelError):
        return JobOutput(error_code=result.code, error_message=str(result))
    seconds = float(result.stats.get("model_seconds", share_s))
    if result.canceled:
        return JobOutput(canceled=True, model_seconds=seconds, stats=dict(result.stats))
    png = None
    if result.image is not None:
        buf = io.BytesIO()
        result.image.save(buf, format="PNG")
        png = buf.getvalue()
    return JobOutput(png=png, text=result.text, think_text=result.think_text, model_seconds=seconds,
                     stats=dict(result.stats))
