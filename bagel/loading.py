"""Checkpoint loading: turns a BAGEL checkpoint folder, or any source of its tensors, into
modules on a device.

Owns: the one explicit map between checkpoint key names and our module names, the choice of
which linears are quantized, the tensor-source interface (``TensorSource``: names and shapes
first, then one tensor at a time) with its file-backed implementation (``open_safetensors``),
the strict streamed load of a source into ``BagelModel`` (``ema.safetensors``) and
``AutoEncoder`` (``ae.safetensors``), and the resulting ``LoadedCheckpoint``. Leaves the
architecture to ``model.py``/``vae.py``, the JSON configs to ``config.py``, the tokenizer files
to ``tokenizer.py``, the quantized modules to ``quant.py``, the offload of the decoder layers to
``offload.py`` and the random source (random weights made straight on the device, for
measurements without the real files) to ``tiny.py``.

How a load goes (``load_checkpoint`` for a folder; steps 2-6 are ``load_from_sources``, which
``tiny.random_checkpoint`` calls with random sources — one code path for both):
1. read the three configs (``ModelConfig.from_folder``) and the tokenizer, and open the two
   safetensors files as sources;
2. build ``BagelModel`` and ``AutoEncoder`` on the meta device (no memory, no init cost);
3. if a quantization mode is asked for, swap the LLM decoder linears for empty quantized ones;
4. check each source's names and shapes (for a file: its safetensors header) against the
   modules before any data is read: every checkpoint tensor maps to a parameter or persistent
   buffer, every one of those has a tensor, shapes agree — else ``CheckpointError`` naming the
   source (the file) and the first offending keys;
5. stream tensors one at a time from the source: cast floating tensors to the load dtype, move
   them to the device (quantizing there when the target is quantized) and assign them in place
   of the meta tensor. No second full copy of the model is ever held; on CPU in the file's own
   dtype nothing is copied at all (the parameters stay views of the mapped file, paged in on
   first use), and a random source that makes its tensors on the device in the load dtype is
   never copied either. With ``offload="layers"`` on CUDA each decoder layer moves to pinned
   host memory as soon as its last tensor has arrived (``offload.LayerOffload``), so the
   device holds the resident weights plus one layer at most while loading;
6. recompute non-persistent buffers (rotary tables and the like) by calling ``reset_buffers()``
   on every module that has one, then check that nothing is left on meta; with offload, start
   streaming the layers (two device buffers, forward hooks on every layer).

Quantized layers (``nf4``/``int8``): the q/k/v/o projections and the gate/up/down MLP of every
decoder layer, for both experts (understanding and ``_moe_gen``). They hold ~90% of the 14 B
parameters of BAGEL-7B-MoT, which is where the memory goes. Kept in the load dtype:
``lm_head`` and the token embeddings (the reference app's bitsandbytes set-up also leaves the
output head alone, and an embedding is a lookup, not a matmul), the SigLIP tower and connector
(small, and its features feed every understanding answer), the timestep/latent projections and
position tables (tiny, precision-sensitive), and the VAE (convolutions, not linears).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bagel import offload as offloading
from bagel import quant
from bagel.config import ModelConfig
from bagel.errors import CheckpointError, InputError
from bagel.model import BagelModel
from bagel.tokenizer import Tokenizer
from bagel.vae import AutoEncoder

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"

# The name map: (checkpoint key prefix, module key prefix). Our modules mirror the reference's
# layout, so every entry is the identity — but every key must match one of these prefixes, and a
# key that matches none is reported as unexpected. Checkpoint key names appear nowhere else.
EMA_NAME_MAP: tuple[tuple[str, str], ...] = (
    ("language_model.", "language_model."),  # Qwen2 MoT decoder, embeddings, lm_head
    ("vit_model.", "vit_model."),  # SigLIP tower (patch embedding stored as a Linear)
    ("connector.", "connector."),  # ViT → LLM MLP
    ("vit_pos_embed.", "vit_pos_embed."),  # 2-D sin-cos table for ViT tokens [70², hidden]
    ("latent_pos_embed.", "latent_pos_embed."),  # 2-D sin-cos table for latents [64², hidden]
    ("time_embedder.", "time_embedder."),  # timestep MLP
    ("vae2llm.", "vae2llm."),  # latent patch → LLM hidden
    ("llm2vae.", "llm2vae."),  # LLM hidden → velocity patch
)
AE_NAME_MAP: tuple[tuple[str, str], ...] = (
    ("encoder.", "encoder."),
    ("decoder.", "decoder."),
)
# Checkpoint names of the linears that quantization replaces (see the module docstring).
QUANTIZED_LINEAR_KEY = re.compile(
    r"language_model\.model\.layers\.\d+\."
    r"(self_attn\.[qkvo]_proj(_moe_gen)?|mlp(_moe_gen)?\.(gate|up|down)_proj)\.weight"
)

_ERROR_LIST_LEN = 5  # how many offending keys an error message names


def to_module_key(checkpoint_key: str, name_map: tuple[tuple[str, str], ...]) -> str | None:
    """The module key a checkpoint key loads into, or None when no map entry covers it."""
    for ckpt_prefix, module_prefix in name_map:
        if checkpoint_key.startswith(ckpt_prefix):
            return module_prefix + checkpoint_key[len(ckpt_prefix):]
    return None


def to_checkpoint_key(module_key: str, name_map: tuple[tuple[str, str], ...]) -> str | None:
    """Inverse of ``to_module_key`` (used when writing a checkpoint, e.g. by ``tiny.py``)."""
    for ckpt_prefix, module_prefix in name_map:
        if module_key.startswith(module_prefix):
            return ckpt_prefix + module_key[len(module_prefix):]
    return None


def should_quantize(module_name: str) -> bool:
    """Whether the ``nn.Linear`` called ``module_name`` inside ``BagelModel`` is quantized."""
    key = to_checkpoint_key(f"{module_name}.weight", EMA_NAME_MAP)
    return key is not None and QUANTIZED_LINEAR_KEY.fullmatch(key) is not None


@dataclass
class LoadedCheckpoint:
    """A checkpoint on its device. ``weight_bytes``: bytes held by the parameters, buffers and
    quantization statistics of ``model`` and ``vae`` together after the load (with offload,
    the decoder layers' host copies included and the two device buffers not: those are
    ``offloader.device_bytes``). ``offloader``: the streaming of the decoder layers when
    ``offload`` is "layers", else None."""

    config: ModelConfig
    model: BagelModel
    vae: AutoEncoder
    tokenizer: Tokenizer
    weight_bytes: int
    quantization: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    offload: str = "none"
    offloader: offloading.LayerOffload | None = None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or one of the names in ``DTYPES``; anything else is an ``InputError``."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InputError(f"dtype: {value} is not one of float32, bfloat16, float16")
        return value
    if value not in DTYPES:
        raise InputError(f"dtype: {value!r} is not one of {sorted(DTYPES)}")
    return DTYPES[value]


def resolve_device(device: torch.device | str) -> torch.device:
    """"auto" means the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"device: {device!r} is not a torch device name ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} asked for but CUDA is not available here")
    return resolved


def tensor_slots(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(module key, owning module, leaf name, is_parameter) for every parameter and persistent
    buffer under ``root`` — the slots a checkpoint must fill."""
    for prefix, module in root.named_modules():
        dot = f"{prefix}." if prefix else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                yield dot + leaf, module, leaf, True
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                yield dot + leaf, module, leaf, False


def _expected_shape(module: nn.Module, leaf: str) -> tuple[int, ...]:
    """Shape a checkpoint tensor must have for this slot (the float shape for quantized linears,
    whose meta parameter keeps the original [out, in] shape until data arrives)."""
    if quant.is_quantized(module) and leaf == "weight":
        return (module.out_features, module.in_features)
    return tuple(getattr(module, leaf).shape)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_ERROR_LIST_LEN])
    more = len(keys) - _ERROR_LIST_LEN
    return shown + (f" (and {more} more)" if more > 0 else "")


class TensorSource(Protocol):
    """Where a load's tensors come from: every name and shape first (a safetensors header), then
    the tensors themselves one at a time. ``location`` names the source in error messages (a
    file path, or e.g. "random tiny checkpoint, seed 0: ema")."""

    location: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint key → shape of every tensor the source holds, read without any data, in
        the order ``tensors()`` yields them."""
        ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint key, tensor) for every key of ``shapes()``, each once, made or read only
        when asked for: a consumer that drops each tensor holds one at a time."""
        ...


class SafetensorsSource:
    """A ``TensorSource`` over an open, memory-mapped safetensors file. ``tensors()`` yields CPU
    tensors in sorted key order in the file's dtype, views of the mapped file (no copy)."""

    def __init__(self, path: Path, handle) -> None:
        self.location = str(path)
        self._path = path
        self._handle = handle

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(self._handle.get_slice(key).get_shape()) for key in sorted(self._handle.keys())}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in sorted(self._handle.keys()):
            try:
                tensor = self._handle.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise CheckpointError(f"{self._path}: tensor {key} cannot be read ({exc})") from exc
            yield key, tensor


@contextmanager
def open_safetensors(path: Path) -> Iterator[SafetensorsSource]:
    """``path`` as a ``TensorSource`` while the block runs; a missing or unreadable file is a
    ``CheckpointError`` naming it. Loaded CPU views keep the mapping alive after the block."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing from the checkpoint folder")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle:
        yield SafetensorsSource(path, handle)


def stream_into(root: nn.Module, source: TensorSource, name_map: tuple[tuple[str, str], ...], *,
                device: torch.device, dtype: torch.dtype,
                on_loaded: Callable[[nn.Module], None] | None = None) -> int:
    """Strictly load the tensors of ``source`` into the meta-built ``root``, one at a time,
    calling ``on_loaded(module)`` after each lands in its module. Returns the number of tensors
    loaded. Raises ``CheckpointError`` naming the source and the first missing, unexpected or
    mis-shaped keys before any data is read, or when the source delivers something other than
    what its shapes announced."""
    slots = {key: (module, leaf, is_param) for key, module, leaf, is_param in tensor_slots(root)}
    where = source.location
    shapes = source.shapes()
    mapped = {key: to_module_key(key, name_map) for key in shapes}
    unexpected = [k for k, m in mapped.items() if m is None or m not in slots]
    wanted = set(mapped.values())
    missing = sorted(to_checkpoint_key(k, name_map) or k for k in slots if k not in wanted)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {_first(unexpected)}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))
    misshaped = []
    for key, got in shapes.items():
        module, leaf, _ = slots[mapped[key]]
        want = _expected_shape(module, leaf)
        if got != want:
            misshaped.append(f"{key} has shape {list(got)}, the model expects {list(want)}")
    if misshaped:
        raise CheckpointError(f"{where}: {len(misshaped)} mis-shaped tensors: {_first(misshaped)}")
    delivered: set[str] = set()
    for key, tensor in source.tensors():
        announced = list(shapes[key]) if key in shapes else "no tensor of that name"
        if key in delivered or list(tensor.shape) != announced:
            raise CheckpointError(f"{where}: tensor {key} arrived with shape {list(tensor.shape)}"
                                  f"{' a second time' if key in delivered else ''}; announced: {announced}")
        delivered.add(key)
        module, leaf, is_param = slots[mapped[key]]
        if quant.is_quantized(module) and leaf == "weight":
            quant.assign_quantized_weight(module, tensor, device, dtype)
            del tensor  # the float weight goes before the source makes the next tensor
        else:
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.to(device)
            if is_param:
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[leaf] = tensor
        if on_loaded is not None:
            on_loaded(module)
    if len(delivered) != len(shapes):
        never = sorted(set(shapes) - delivered)
        raise CheckpointError(f"{where}: {len(never)} announced tensors never arrived: {_first(never)}")
    return len(delivered)


def _finish_buffers(root: nn.Module, device: torch.device, location: str) -> None:
    """Materialise non-persistent buffers on ``device`` and have their modules recompute them
    (``reset_buffers()``), then insist that no parameter or buffer is left on meta."""
    no_reset = []
    for name, module in root.named_modules():
        meta = [leaf for leaf, buf in module._buffers.items() if buf is not None and buf.device.type == "meta"]
        for leaf in meta:
            module._buffers[leaf] = torch.empty_like(module._buffers[leaf], device=device)
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
        elif meta:
            no_reset.extend(f"{name}.{leaf}" if name else leaf for leaf in meta)
    left = [name for name, t in [*root.named_parameters(), *root.named_buffers()]
            if t.device.type == "meta"]
    left += no_reset
    if left:
        raise CheckpointError(f"{location}: {len(left)} tensors left uninitialised after loading: {_first(left)}")


def build_empty(config: ModelConfig) -> tuple[BagelModel, AutoEncoder]:
    """``BagelModel`` and ``AutoEncoder`` for ``config`` on the meta device (no storage)."""
    with torch.device("meta"):
        return BagelModel(config), AutoEncoder(config.vae)


def _load_arguments(quantization: str | None, device: torch.device | str, dtype: torch.dtype | str,
                    offload: str | None) -> tuple[str, torch.device, torch.dtype, str]:
    """The checked quantization mode, device, dtype and offload mode of a load (``InputError``
    otherwise)."""
    quantization = quant.check_mode(quantization)
    offload = offloading.check_mode(offload)
    if quantization != "none":
        quant.bitsandbytes_module(quantization)
    return quantization, resolve_device(device), parse_dtype(dtype), offload


def load_from_sources(config: ModelConfig, tokenizer: Tokenizer, ema: TensorSource, ae: TensorSource, *,
                      label: str, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                      quantization: str = "none", offload: str = "none",
                      started: float | None = None) -> LoadedCheckpoint:
    """Steps 2-6 of the module docstring: modules for ``config`` built on meta, quantized linears
    swapped in when asked, ``ema`` streamed into ``BagelModel`` and ``ae`` into ``AutoEncoder``
    on ``device`` in ``dtype``, the decoder layers kept in host memory with ``offload="layers"``.
    ``label`` names the checkpoint in the log line; ``started`` (a ``time.perf_counter()``
    value) is when the load began, if before this call."""
    started = time.perf_counter() if started is None else started
    quantization, device, dtype, offload = _load_arguments(quantization, device, dtype, offload)
    model, vae = build_empty(config)
    quant.swap_linears(model, should_quantize, quantization, dtype)
    offloader = offloading.LayerOffload(model, device) if offload == "layers" else None
    n_ema = stream_into(model, ema, EMA_NAME_MAP, device=device, dtype=dtype,
                        on_loaded=None if offloader is None else offloader.tensor_loaded)
    n_ae = stream_into(vae, ae, AE_NAME_MAP, device=device, dtype=dtype)
    _finish_buffers(model, device, ema.location)
    _finish_buffers(vae, device, ae.location)
    model.eval()
    vae.use_decoder_layout().eval()
    if offloader is not None:
        offloader.start(dtype)
    weight_bytes = quant.memory_bytes(model, vae)
    seconds = time.perf_counter() - started
    logger.info("loaded %s: %d+%d tensors, %.1f MB of weights on %s as %s (quantization %s, offload %s) in %.2f s",
                label, n_ema, n_ae, weight_bytes / 2**20, device, str(dtype).removeprefix("torch."),
                quantization, offload, seconds)
    return LoadedCheckpoint(config=config, model=model, vae=vae, tokenizer=tokenizer,
                            weight_bytes=weight_bytes, quantization=quantization, device=device,
                            dtype=dtype, load_seconds=seconds, offload=offload, offloader=offloader)


def load_checkpoint(folder: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str = torch.float32, quantization: str = "none",
                    offload: str = "none") -> LoadedCheckpoint:
    """Load the checkpoint folder (real BAGEL-7B-MoT layout) onto ``device`` in ``dtype``,
    quantizing the LLM decoder linears when ``quantization`` is "nf4" or "int8" and keeping
    the decoder layers in host memory, streamed to the device as they run, when ``offload``
    is "layers" (``offload.py``)."""
    started = time.perf_counter()
    folder = Path(folder)
    quantization, device, dtype, offload = _load_arguments(quantization, device, dtype, offload)
    config = ModelConfig.from_folder(folder)
    tokenizer = Tokenizer.from_dir(folder)
    if len(tokenizer) > config.llm.vocab_size:
        raise CheckpointError(f"{folder / 'llm_config.json'}: vocab_size {config.llm.vocab_size} is smaller "
                              f"than the tokenizer's {len(tokenizer)} tokens")
    with open_safetensors(folder / EMA_FILE) as ema, open_safetensors(folder / AE_FILE) as ae:
        return load_from_sources(config, tokenizer, ema, ae, label=str(folder), device=device, dtype=dtype,
                                 quantization=quantization, offload=offload, started=started)


def _paper_tensor_bytes(module_name: str, module: nn.Module, quantization: str, item: int) -> Iterator[int]:
    """Bytes of each tensor ``module`` (built on meta) holds after a load: NF4 packs 4 bits per
    weight and keeps one float32 absmax per 64 weights and a 16-entry float32 code table, INT8
    one byte per weight and one float32 scale per output row."""
    quantized = quantization != "none" and type(module) is nn.Linear and should_quantize(module_name)
    for leaf, param in [*module._parameters.items(), *module._buffers.items()]:
        if param is None:
            continue
        n = param.numel()
        if quantized and leaf == "weight":
            if quantization == "nf4":
                yield from (n // 2, (n // quant.NF4_BLOCKSIZE) * 4, 16 * 4)
            else:
                yield from (n, module.out_features * 4)
        else:
            yield n * (item if param.is_floating_point() else param.element_size())


def paper_weight_bytes(config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16,
                       quantization: str = "none") -> int:
    """Weight bytes a load of ``config`` would hold, computed from the meta-built modules (no
    file needed; sizes per tensor as ``_paper_tensor_bytes``). Equals ``weight_bytes`` of a
    real load (a test checks it), so it gives the figures for checkpoints too big to load here."""
    quantization = quant.check_mode(quantization)
    model, vae = build_empty(config)
    item = torch.empty((), dtype=dtype).element_size()
    modules = [*model.named_modules(), *(("vae." + n, m) for n, m in vae.named_modules())]
    return sum(size for name, module in modules for size in _paper_tensor_bytes(name, module, quantization, item))


def paper_layer_tensor_bytes(config: ModelConfig, *, dtype: torch.dtype = torch.bfloat16,
                             quantization: str = "none") -> list[int]:
    """Bytes of each tensor one decoder layer holds after a load (every layer has the same):
    what ``offload="layers"`` keeps on the host and copies to the device per layer."""
    quantization = quant.check_mode(quantization)
    model, _ = build_empty(config)
    item = torch.empty((), dtype=dtype).element_size()
    first = set(map(id, model.language_model.model.layers[0].modules()))
    return [size for name, module in model.named_modules() if id(module) in first
            for size in _paper_tensor_bytes(name, module, quantization, item)]
