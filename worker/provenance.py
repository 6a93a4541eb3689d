"""A job's reproducibility record: what made its output.

Owns: the record a GPU worker stores with a job it ran (``record``) — the engine's half from
``EngineHolder.provenance`` (weights identity, quantization, offload, dtype, device, the
versions of the engine, Python, torch, CUDA, cuDNN and bitsandbytes, the noise source) and the
job's half: every parameter as run (its seed among them, and the seed of the picture kept when
the quality gate made it again), think on or off with a hash of the
reasoning, TaylorSeer on or off, the adapter and its scale, the worker, and the SHA-256 of the
output. Leaves the engine facts to ``gpu.py``, storing it (with the job's final state, in one
UPDATE) to ``jobs.py``, the HTTP form and re-runs to ``api.routes.provenance``.

A re-run (``rerun_of``) submits the job's own resolved parameters again — the seed was drawn at
submission (``params.resolve``) — so on the same hardware, versions and thread count a CPU
worker makes the same PNG bit for bit.
"""

from __future__ import annotations

import hashlib
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.execution import ClaimedJob
    from worker.gpu import JobOutput

RECORD_VERSION = 1  # bumped when the record's fields change meaning


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def record(engine_facts: dict[str, Any], job: ClaimedJob, out: JobOutput, worker_id: str) -> dict[str, Any]:
    """The record of ``job`` run with the outcome ``out`` on the engine ``engine_facts`` describe."""
    params = dict(job.params)
    output = out.png if out.png is not None else (out.text.encode() if out.text is not None else None)
    return {
        "record_version": RECORD_VERSION,
        **engine_facts,
        "task": job.task,
        "params": params,
        "seed": params.get("seed"),
        # the seed that made the output: the next ones when the quality gate made it again
        "result_seed": int(out.stats["seed"]) if "seed" in out.stats else params.get("seed"),
        "quality_gate": params.get("quality_gate"),
        "think": job.think,
        "think_text_sha256": _sha256(out.think_text.encode()) if out.think_text is not None else None,
        "taylorseer": bool(params.get("taylorseer", False)),
        "adapter_id": job.adapter_id,
        "adapter_scale": params.get("adapter_scale") if job.adapter_id is not None else None,
        "width": job.width if job.task != "understand" else None,
        "height": job.height if job.task != "understand" else None,
        "worker_id": worker_id,
        "hostname": socket.gethostname(),
        "output_sha256": _sha256(output),
        # a session's turn: the parts of its context this worker's cache spared it from prefilling
        "session_context": None if job.session_id is None else {
            "session_id": job.session_id, "reused_parts": int(out.stats.get("context_reused_parts", 0))},
    }
