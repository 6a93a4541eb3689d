"""The GPU side of a worker process: the one module that imports ``bagel`` (and torch).

Owns: ``EngineHolder`` (loads ONE ``bagel.engine.Engine`` when the worker process starts and
keeps it; generates the tiny demo checkpoint when no model path is set; chooses the engine's
memory budget and installs the test-only fault of ``BAGEL_JOBS_FAULT_INJECTION``; hashes the
checkpoint once, at load, and states the engine's half of each job's provenance), turning
plain job inputs into ``bagel.requests.Request`` objects, and running a chunk's requests
through ``engine.run`` with progress and cooperative-cancel callbacks, with the chunk's LoRA
adapter applied (unmerged; loaded ones kept in an LRU of ``adapter_cache_bytes``), then the
quality gate's regeneration rounds (``worker.quality``). A session's turn runs as one
interleaved request built from its context's parts, starting from the session's saved context
when this worker holds it (an LRU of ``session_cache_bytes``, ``session_cache.py``) and leaving
its own there. Leaves claims, storage and state to ``execution.py``.

Failure isolation, per job, within one chunk:
  * a bad input fails alone: a request that cannot be built fails before the run, and when the
    engine rejects a batch its requests are rerun one by one;
  * a batch that does not fit — ``torch.OutOfMemoryError`` from the device, or the engine's
    ``MemoryBudgetError`` before any model work — is split in halves, each run on its own
    (recursively, the device cache emptied first), so the jobs that fit still succeed; a
    single job that does not fit fails at once with ``gpu_out_of_memory``, its size and the
    memory named, and is never retried (it would not fit next time either);
  * an adapter that does not fit the loaded model fails every job of its chunk with
    ``invalid_adapter`` naming the module (the upload check could not see the model);
  * any other device error (``torch.AcceleratorError``, a ``RuntimeError`` "CUDA error: …")
    leaves the CUDA context unusable: it is raised as ``DeviceFailure`` and the holder refuses
    every later run; the caller gives the chunk back and ends the process.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import platform
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from bagel.adapters import AdapterCache, LoadedAdapter, apply_adapter, load_adapter
from bagel.config import GenerationParams
from bagel.errors import (
    AdapterError,
    BagelError,
    CheckpointError,
    InputError,
    MemoryBudgetError,
)
from bagel.identity import noise_source, runtime_versions, weights_identity
from bagel.requests import (CancelFn, ImagePart, InterleavedRequest, ProgressFn, Request, Result,
                            TextPart)
from bagel.transforms import load_image
from worker.errors import DeviceFailure, GpuOutOfMemory, SettingsError
from worker.faults import install_fault, parse_fault
from worker.params import DEMO_MIN_SIDE_PX
from worker.quality import GateSpec, regenerate
from worker.session_cache import SessionContexts

if TYPE_CHECKING:
    from bagel.engine import Engine
    from worker.adapters import AdapterSource
    from worker.settings import Settings

log = logging.getLogger(__name__)

MIB = 2**20

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
    gate: GateSpec | None = None  # the quality gate's questions and threshold (``worker.quality``)
    # A session's turn (``worker.sessions``): its context as ("text", str) and ("image", bytes)
    # parts, run as one interleaved request (``prompt`` and ``images`` unused); its session's id.
    parts: list[tuple[str, Any]] | None = None
    session_id: str | None = None


@dataclass
class JobOutput:
    """One job's outcome. ``error_code`` set → a permanent failure (never retried). With the
    quality gate: ``gate`` holds the picture's answers (question, p_yes, yes_prob, no_prob),
    ``attempts`` every attempt's PNG (``chosen`` is ``png``'s), ``quality`` the record and
    ``regeneration_seconds`` this job's share of the extra rounds."""

    png: bytes | None = None
    text: str | None = None
    think_text: str | None = None
    canceled: bool = False
    model_seconds: float = 0.0
    error_code: str | None = None
    error_message: str | None = None
    stats: dict[str, float] = field(default_factory=dict)
    gate: list[dict[str, Any]] | None = None
    attempts: list[bytes] | None = None
    chosen: int | None = None
    quality: dict[str, Any] | None = None
    regeneration_seconds: float = 0.0
    context: Any = None  # a session turn's saved context, until the holder caches it


class EngineHolder:
    """One engine per process, loaded once (thread-safe, idempotent)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.load_seconds = 0.0
        self.budget_source = "none"
        self.device_failure: str | None = None
        self._facts: dict[str, Any] = {}  # what ``provenance`` reports, fixed at load
        self.adapters = AdapterCache(settings.adapter_cache_bytes)
        self.sessions = SessionContexts(settings.session_cache_bytes)  # sessions' last contexts
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
                    engine = Engine.load(path, quantization=self.settings.quantization, device=self.settings.device,
                                         offload=self.settings.offload)
                except CheckpointError:
                    log.error("checkpoint %s cannot be loaded; the worker refuses to start", path)
                    raise
                self.load_seconds = time.perf_counter() - start
                self._facts = _engine_facts(engine, path)
                log.info("engine loaded from %s (weights %s, quantization=%s, offload=%s, device=%s) in %.1f s",
                         path, self._facts["weights_sha256"][:16], self.settings.quantization, self.settings.offload,
                         engine.device, self.load_seconds)
                engine.memory_budget_bytes, self.budget_source = self._memory_budget(engine)
                if engine.memory_budget_bytes is None:
                    log.info("GPU memory budget: none (%s)", self.budget_source)
                else:
                    log.info("GPU memory budget: %.1f MiB (%s)", engine.memory_budget_bytes / MIB,
                             self.budget_source)
                if self.settings.fault_injection is not None:
                    install_fault(engine, parse_fault(self.settings.fault_injection))
                self.engine = engine
            return self.engine

    def provenance(self) -> dict[str, Any]:
        """The loaded engine's half of a job's reproducibility record (``worker.provenance``):
        what it loaded, how, and on which software and device (computed once, at load)."""
        self.load()
        return dict(self._facts)

    def _memory_budget(self, engine: Engine) -> tuple[int | None, str]:
        """The working memory one run may use, and where the number comes from: the setting;
        on CUDA the free memory after loading minus the margin; on CPU none."""
        if self.settings.gpu_memory_budget_bytes is not None:
            return self.settings.gpu_memory_budget_bytes, "BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES"
        if engine.device.type != "cuda":
            return None, f"device {engine.device}: set BAGEL_JOBS_GPU_MEMORY_BUDGET_BYTES for one"
        free, total = torch.cuda.mem_get_info(engine.device)
        margin = self.settings.gpu_memory_margin_bytes
        if free <= margin:
            raise SettingsError(f"BAGEL_JOBS_GPU_MEMORY_MARGIN_BYTES={margin}: keeps more than the "
                                f"{free / MIB:.0f} MiB free on {engine.device} after loading the model "
                                f"({total / MIB:.0f} MiB in all), leaving no working memory")
        return free - margin, (f"{free / MIB:.0f} MiB free on {engine.device} after loading, minus the "
                               f"{margin / MIB:.0f} MiB BAGEL_JOBS_GPU_MEMORY_MARGIN_BYTES")

    def memory_estimate(self, job: JobInput) -> int:
        """The engine's working-memory estimate (bytes) for running ``job`` on its own."""
        return self.load().memory_estimate([_build_request(job, {}, self.settings.max_image_pixels)]).total

    def _adapter(self, engine: Engine, source: AdapterSource) -> LoadedAdapter:
        return self.adapters.get(source.adapter_id, lambda: load_adapter(
            (source.read_config(), source.read_weights()), engine.config, device=engine.device,
            dtype=engine.checkpoint.dtype))

    def run(self, inputs: list[JobInput], *, progress: ProgressFn, should_cancel: CancelFn,
            adapter: AdapterSource | None = None) -> list[JobOutput]:
        """Run one chunk, with ``adapter`` applied when given. Bad inputs and jobs that do not
        fit come back as per-job errors (see the module docstring); a device error raises
        ``DeviceFailure``, here and on every later call."""
        if self.device_failure is not None:
            raise DeviceFailure(f"the device failed earlier in this process ({self.device_failure}); "
                                "it runs no more chunks")
        engine = self.load()
        if adapter is None:
            return self._run_gated(engine, inputs, progress=progress, should_cancel=should_cancel)
        try:
            loaded = self._adapter(engine, adapter)
        except AdapterError as exc:
            log.error("adapter %s refused by the loaded model: %s", adapter.adapter_id, exc)
            return [JobOutput(error_code=exc.code, error_message=f"adapter: {exc}") for _ in inputs]
        with apply_adapter(engine.model, loaded, scale=adapter.scale):
            return self._run_gated(engine, inputs, progress=progress, should_cancel=should_cancel)

    def _run_gated(self, engine: Engine, inputs: list[JobInput], *, progress: ProgressFn,
                   should_cancel: CancelFn) -> list[JobOutput]:
        """The chunk's run, then the quality gate's regeneration rounds (``worker.quality``),
        each one engine call for the jobs still below their threshold."""
        outputs = self._run(engine, inputs, progress=progress, should_cancel=should_cancel)
        if not any(job.gate is not None for job in inputs):
            return outputs
        position = {job.job_id: i for i, job in enumerate(inputs)}

        def run_round(jobs: list[JobInput]) -> list[JobOutput]:
            return self._run(engine, jobs, progress=lambda r, step, total: progress(position[jobs[r].job_id], step,
                                                                                   total),
                             should_cancel=lambda r: should_cancel(position[jobs[r].job_id]))

        return regenerate(inputs, outputs, run_round)

    def _run(self, engine: Engine, inputs: list[JobInput], *, progress: ProgressFn,
             should_cancel: CancelFn) -> list[JobOutput]:
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
        if requests:
            run = _ChunkRun(self, engine, [inputs[i] for i in positions], requests,
                            progress=lambda k, step, total: progress(positions[k], step, total),
                            should_cancel=lambda k: should_cancel(positions[k]))
            try:
                done = run.run_fitting(list(range(len(requests))))
            except Exception as exc:
                if not is_device_error(exc):
                    raise
                self.device_failure = f"{type(exc).__name__}: {exc}"
                raise DeviceFailure(self.device_failure) from exc
            for k, out in done.items():
                job = inputs[positions[k]]
                if job.session_id is not None and out.context is not None:
                    self.sessions.put(job.session_id, out.context)
                out.context = None
                outputs[positions[k]] = out
        return [out if out is not None else JobOutput(error_code="internal", error_message="no result")
                for out in outputs]


class _ChunkRun:
    """One chunk's requests (indexed 0..n-1) and the engine calls that run them: together when
    they fit, in halves when they do not."""

    def __init__(self, holder: EngineHolder, engine: Engine, jobs: list[JobInput], requests: list[Request], *,
                 progress: ProgressFn, should_cancel: CancelFn) -> None:
        self.holder = holder
        self.engine = engine
        self.jobs = jobs
        self.requests = requests
        self.progress = progress
        self.should_cancel = should_cancel

    def _call(self, idx: list[int]) -> list[Result]:
        # Callbacks name a request by its place in this call: map it back to the chunk's index.
        # A session's turn starts from its session's cached context, and leaves its own there.
        sessions = [self.jobs[k].session_id for k in idx]
        extra = {} if not any(sessions) else {
            "keep_contexts": True,
            "contexts": [self.holder.sessions.get(sid) if sid else None for sid in sessions]}
        return self.engine.run([self.requests[k] for k in idx],
                               progress=lambda r, step, total: self.progress(idx[r], step, total),
                               should_cancel=lambda r: self.should_cancel(idx[r]), **extra)

    def run_fitting(self, idx: list[int]) -> dict[int, JobOutput]:
        """Outputs of the requests ``idx``, run in one engine call when they fit."""
        over_budget = out_of_memory = None
        try:
            results = self._call(idx)
        except InputError as exc:
            if len(idx) == 1:
                return {idx[0]: JobOutput(error_code=exc.code, error_message=str(exc))}
            log.warning("engine rejected a %d-job batch (%s); rerunning its jobs one by one", len(idx), exc)
            return {k: out for i in idx for k, out in self.run_fitting([i]).items()}
        except MemoryBudgetError as exc:
            over_budget = str(exc)
        except torch.OutOfMemoryError as exc:
            out_of_memory = (str(exc).strip() or "out of memory").splitlines()[0]
        else:
            return {k: _to_output(result) for k, result in zip(idx, results, strict=True)}
        # Out of the except block: the traceback, and the activations its frames held, are gone.
        if out_of_memory is not None:
            free_device_memory(self.engine)
        if len(idx) == 1:
            return {idx[0]: self._does_not_fit(idx[0], over_budget, out_of_memory)}
        half = (len(idx) + 1) // 2
        log.warning("%d job(s) do not fit together (%s); splitting into %d + %d", len(idx),
                    over_budget or f"out of memory: {out_of_memory}", half, len(idx) - half)
        return {**self.run_fitting(idx[:half]), **self.run_fitting(idx[half:])}

    def _does_not_fit(self, k: int, over_budget: str | None, out_of_memory: str | None) -> JobOutput:
        job, engine = self.jobs[k], self.engine
        try:
            need = f"an estimated {engine.memory_estimate([self.requests[k]]).describe()}"
        except BagelError as exc:  # the run already validated it; report rather than mask the failure
            need = f"an unknown amount ({exc})"
        budget, source = engine.memory_budget_bytes, self.holder.budget_source
        if over_budget is not None and budget is not None:
            memory = f"over the {budget / MIB:.1f} MiB memory budget ({source})"
        else:
            limit = f"memory budget {budget / MIB:.1f} MiB ({source})" if budget is not None else "no memory budget"
            memory = (f"and the device ran out of memory running it alone ({limit}{device_memory(engine)}): "
                      f"{out_of_memory or over_budget}")
        message = (f"{describe_job(job, self.requests[k])} does not fit in GPU memory: it needs {need} of "
                   f"working memory, {memory}")
        log.error("job %s: %s", job.job_id, message)
        return JobOutput(error_code=GpuOutOfMemory.code, error_message=message)


def _engine_facts(engine: Engine, path: Path) -> dict[str, Any]:
    """The loaded checkpoint's identity (a hash of its files, ``bagel.identity``), the load's
    options, the device and the versions: the same for every job this process runs."""
    device = engine.device
    return {
        "weights_sha256": weights_identity(path), "model": path.name,
        "quantization": engine.checkpoint.quantization, "offload": engine.checkpoint.offload,
        "dtype": str(engine.dtype).removeprefix("torch."), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch_threads": torch.get_num_threads(), **runtime_versions(engine.checkpoint.quantization),
        "noise_source": noise_source(device) + "; edit and try-on jobs set context_seed from their input "
                        "picture's bytes (worker.gpu.picture_context_seed)",
    }


def describe_job(job: JobInput, request: Request | InterleavedRequest) -> str:
    """The size of a job, as named in a ``gpu_out_of_memory`` message."""
    if isinstance(request, InterleavedRequest):
        out = f"{job.width}x{job.height} px output" if request.output == "image" else "text output"
        size = f"a session context of {len(request.parts)} parts, {out}"
    elif request.task == "generate":
        size = f"{job.width}x{job.height} px output"
    elif request.images:
        size = "input picture {}x{} px".format(*request.images[0].size)
    else:
        size = "text output"
    steps = job.params.get("num_timesteps")
    return f"{job.task} job ({size}, {steps} steps, think {'on' if job.think else 'off'})"


def device_memory(engine: Engine) -> str:
    """``", device free X of Y MiB"`` on CUDA, empty elsewhere."""
    if engine.device.type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(engine.device)
    return f", device free {free / MIB:.0f} of {total / MIB:.0f} MiB"


def free_device_memory(engine: Engine) -> None:
    """After an out-of-memory error: collect the failed run's garbage and hand the allocator's
    cached blocks back, so the next, smaller run starts from the model's own footprint."""
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def is_device_error(exc: BaseException) -> bool:
    """True for errors that leave the CUDA context unusable: ``torch.AcceleratorError`` (what
    device-side asserts and illegal accesses raise since torch 2.8) and the older
    ``RuntimeError("CUDA error: …")``. Out of memory is not one of them."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, torch.AcceleratorError) or (isinstance(exc, RuntimeError)
                                                       and str(exc).startswith("CUDA error"))


def _build_request(job: JobInput, decoded: dict[int, Any], max_pixels: int) -> Request | InterleavedRequest:
    if job.parts is not None:
        return _interleaved(job, decoded, max_pixels)
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
                   context_seed=picture_context_seed(job.images[0]) if engine_task == "edit" else None,
                   gate_questions=job.gate.questions if job.gate is not None else ())


def _interleaved(job: JobInput, decoded: dict[int, Any], max_pixels: int) -> InterleavedRequest:
    """A session turn's request: its context's parts in order, every picture seen by both paths."""
    assert job.parts is not None
    parts: list[TextPart | ImagePart] = []
    for n, (kind, value) in enumerate(job.parts):
        if kind == "text":
            parts.append(TextPart(value))
            continue
        if id(value) not in decoded:
            decoded[id(value)] = load_image(value, field=f"parts[{n}]", max_pixels=max_pixels)
        parts.append(ImagePart(decoded[id(value)]))
    params = GenerationParams(**{k: v for k, v in job.params.items() if k in _PARAM_NAMES})
    return InterleavedRequest(parts=tuple(parts), output="text" if job.task == "understand" else "image",
                              think=job.think, width=job.width, height=job.height, params=params)


def picture_context_seed(data: bytes) -> int:
    """The posterior-noise seed of an edit's input picture: a function of its bytes alone, so
    every scene of a try-on batch (and any rerun of a job) samples the product's latent the same
    way, and the engine encodes and prefills the product once per chunk. The job's own seed
    still draws the initial noise of each image."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1


def _to_output(result: Result) -> JobOutput:
    # The engine's model_seconds is the wall time of the call this request ran in: after a
    # split, the sub-run's, not the chunk's.
    seconds = float(result.stats.get("model_seconds", 0.0))
    if result.canceled:
        return JobOutput(canceled=True, model_seconds=seconds, stats=dict(result.stats))
    png = None
    if result.image is not None:
        # Saved from a fresh image: PNG save carries ``info`` over (an ICC profile, transparency),
        # and a stored result must hold pixels only, nothing that came in with an input picture.
        image = result.image
        bare = Image.frombytes(image.mode, image.size, image.tobytes())
        buf = io.BytesIO()
        bare.save(buf, format="PNG")
        png = buf.getvalue()
    gate = None if result.gate is None else [
        {"question": a.question, "p_yes": a.p_yes, "yes_prob": a.yes_prob, "no_prob": a.no_prob} for a in result.gate]
    return JobOutput(png=png, text=result.text, think_text=result.think_text, model_seconds=seconds,
                     stats=dict(result.stats), gate=gate, context=result.context)
