"""Streamed safetensors writing: the header first, then each tensor as its source makes it.

Owns: laying out a safetensors file from the names and shapes of a ``loading.TensorSource``
(``safetensors_header``) and writing it with one tensor in memory at a time
(``write_safetensors``), so a 29 GB random checkpoint (``tiny.py``'s ``full`` preset) needs
about as much RAM as its largest tensor. Leaves making the tensors to the source and reading
files back to ``safetensors`` itself (``loading.open_safetensors``).

The format (safetensors' own documentation, "Format"): 8 bytes, the little-endian u64 length N
of the header; N bytes of JSON mapping each name to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the end of the header) plus an optional
``"__metadata__"`` string map; then the raw little-endian tensor bytes, contiguous and in
offset order. Like ``safetensors.torch.save_file`` (0.4–0.8), the JSON is compact, lists
``__metadata__`` first and the tensors in data order, and is padded with spaces to a multiple
of 8 bytes. ``save_file`` orders tensors by dtype, then name; here the data follows the source's
order, so a source that yields sorted names in one dtype gives exactly ``save_file``'s bytes (a
test checks it). Assumes a little-endian host, as torch's ``save_file`` does.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import torch

from bagel.errors import CheckpointError, InputError
from bagel.loading import TensorSource

logger = logging.getLogger(__name__)

# torch dtype → safetensors dtype name (the float dtypes a checkpoint is written in)
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_HEADER_ALIGN = 8


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                       metadata: dict[str, str] | None = None) -> bytes:
    """The first bytes of a safetensors file holding ``shapes`` (in that order) in ``dtype``:
    the u64 length prefix and the padded JSON header."""
    if dtype not in DTYPE_NAMES:
        raise InputError(f"dtype: {dtype} is not one of {sorted(str(d) for d in DTYPE_NAMES)}")
    item = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * item
        entries[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def data_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of tensor data a file of ``shapes`` in ``dtype`` holds (the file minus its header)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in shapes.values()) * item


def write_safetensors(path: Path, source: TensorSource, *, dtype: torch.dtype,
                      metadata: dict[str, str] | None = None) -> int:
    """Write every tensor of ``source`` to ``path`` in ``dtype``: the header from
    ``source.shapes()`` first, then each tensor as ``source.tensors()`` yields it, cast and
    moved to the host one at a time. Returns the file size in bytes. Raises
    ``CheckpointError`` naming the source when it yields something other than what its shapes
    announced (then ``path`` is incomplete: callers write into a staging folder)."""
    shapes = source.shapes()
    header = safetensors_header(shapes, dtype, metadata)
    announced = iter(shapes.items())
    written = len(header)
    with open(path, "wb") as out:
        out.write(header)
        for key, tensor in source.tensors():
            want_key, want_shape = next(announced, (None, None))
            if key != want_key or tuple(tensor.shape) != want_shape:
                raise CheckpointError(f"{source.location}: yielded {key} {list(tensor.shape)} where its shapes "
                                      f"announced {want_key} {want_shape}")
            flat = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
            # A byte view of the tensor's own storage: written without another copy.
            out.write(memoryview(flat.view(torch.uint8).numpy()))
            written += flat.numel() * flat.element_size()
            del tensor, flat  # before the source makes the next one: one tensor alive at a time
        left = next(announced, None)
        if left is not None:
            raise CheckpointError(f"{source.location}: announced {left[0]} but never yielded it")
    logger.info("wrote %s: %d tensors, %.1f MiB", path, len(shapes), written / 2**20)
    return written
