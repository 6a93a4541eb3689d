"""What identifies an engine's output: the checkpoint it loaded, the software it ran on and where
its noise came from — the engine's half of a reproducibility record.

Owns: the weights identity of a checkpoint folder (``weights_identity``), the versions that can
change a result (``runtime_versions``: this package, Python, torch, CUDA, cuDNN, bitsandbytes)
and the description of how a request's noise is drawn (``noise_source``, as ``engine.py`` draws
it). Leaves loading to ``loading.py`` and storing the record to whoever runs the engine (the job
service keeps one per job).

The weights identity is a SHA-256 over ``ema.safetensors`` and ``ae.safetensors`` read straight
from the files, not from the loaded modules: per file, every tensor's name, dtype and shape from
the safetensors header (in sorted name order) and a sample of its stored bytes — the first and
the last ``SAMPLE_BYTES`` (all of it when smaller). So it is cheap (a header and two short reads
per tensor, whatever the checkpoint's size), the same for the same files whatever quantization,
dtype, device or offload the load used (those are recorded beside it), and it changes when a
tensor is renamed, reshaped, recast, or changed within its sampled bytes. A change confined to the middle of a large tensor is not seen:
it identifies a checkpoint, it does not verify one byte for byte. The JSON configs and the
tokenizer files are not part of it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from bagel.errors import CheckpointError
from bagel.loading import AE_FILE, EMA_FILE

SAMPLE_BYTES = 4096  # sampled from each end of every tensor's stored bytes
DISTRIBUTION = "bagel-jobs"  # the installed distribution that ships this package: the engine's version
_HEADER_LEN = struct.Struct("<Q")


def _file_samples(path: Path) -> Iterator[bytes]:
    """What one safetensors file contributes to the identity: its name, then per tensor (sorted by
    name) its name, dtype, shape and byte count, and its sampled bytes."""
    try:
        with path.open("rb") as f:
            (size,) = _HEADER_LEN.unpack(f.read(_HEADER_LEN.size))
            header = json.loads(f.read(size))
            data_start = _HEADER_LEN.size + size
            yield path.name.encode()
            for name in sorted(k for k in header if k != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                yield json.dumps([name, entry["dtype"], entry["shape"], end - begin]).encode()
                f.seek(data_start + begin)
                if end - begin <= 2 * SAMPLE_BYTES:
                    yield f.read(end - begin)
                    continue
                yield f.read(SAMPLE_BYTES)
                f.seek(data_start + end - SAMPLE_BYTES)
                yield f.read(SAMPLE_BYTES)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def weights_identity(folder: str | Path) -> str:
    """The hex SHA-256 identifying the checkpoint in ``folder`` (see the module docstring)."""
    digest = hashlib.sha256()
    for name in (EMA_FILE, AE_FILE):
        for chunk in _file_samples(Path(folder) / name):
            digest.update(chunk)
    return digest.hexdigest()


def engine_version() -> str:
    """The version of the installed distribution this package ships in ("unknown" when it runs
    from a source tree that was never installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def runtime_versions(quantization: str) -> dict[str, str | None]:
    """Versions that can change a result: the engine, Python, torch, CUDA and cuDNN (None on a
    build without them), and bitsandbytes when the load quantized (None otherwise)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "engine_version": engine_version(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": None if cudnn is None else str(cudnn),
        "bitsandbytes_version": importlib.metadata.version("bitsandbytes") if quantization != "none" else None,
    }


def noise_source(device: torch.device) -> str:
    """How ``Engine.run`` draws a request's noise on ``device``, in words."""
    return (f"torch.Generator(device='{device}').manual_seed(params.seed); the initial latent noise is "
            f"torch.randn(float32) from it on {device}; an edit's VAE posterior sample comes from a second "
            "generator seeded with the request's context_seed when set, else from the first draw of the same")
