"""LoRA adapters on a loaded model, unmerged: one base in memory serves any number of adapters.

Owns: loading a checked adapter's tensors onto the model's device in its compute dtype
(``load_adapter`` → ``LoadedAdapter``), applying one to a model for the duration of a block
(``apply_adapter``), and a per-process LRU of loaded adapters under a byte limit
(``AdapterCache``). Leaves the format and every check that needs no tensor to
``adapter_format.py``, which the API runs on uploads without torch, and the runs themselves to
the engine, which knows nothing of adapters.

How an adapter is applied: a forward hook on each target linear adds ``s · (x Aᵀ) Bᵀ`` to the
layer's output, with ``s`` = the adapter's ``scale`` (``lora_alpha / r``, see
``adapter_format``) times the caller's ``scale``, PEFT's ``lora.Linear`` forward without
dropout. No weight is touched, so it works the same on every base module type (``nn.Linear``,
``quant.Int8Linear``, bitsandbytes' NF4 ``Linear4bit``) and leaves the base as it was when the
block exits; the hooks are removed even when the block raises. A and B stay in the compute
dtype on the device: with bf16 weights the low-rank path runs in bf16, as PEFT's does on a bf16
model. The worker runs a chunk that names an adapter as::

    adapter = cache.get(adapter_id, lambda: load_adapter(folder, engine.config,
                                                         device=engine.device, dtype=engine.dtype))
    with apply_adapter(engine.model, adapter, scale=strength):
        results = engine.run(requests, progress=..., should_cancel=...)

Every request of that run uses the adapter (a chunk never mixes adapters). The engine keeps no
context between runs (its KV cache lives for one ``run``), so nothing computed under one
adapter leaks into the next run.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from bagel.adapter_format import AdapterInfo, inspect_adapter, read_adapter_files
from bagel.config import ModelConfig
from bagel.errors import AdapterError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter on a device: ``weights`` maps each target module name to (A ``[r, in]``,
    B ``[out, r]``) in ``dtype``; ``nbytes`` is what they hold there."""

    info: AdapterInfo
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    device: torch.device
    dtype: torch.dtype
    nbytes: int

    @property
    def scale(self) -> float:
        return self.info.scale


def load_adapter(source: str | Path | tuple[bytes, bytes], config: ModelConfig, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """Check an adapter against ``config`` (``adapter_format.inspect_adapter``) and load its
    tensors onto ``device`` in ``dtype``. ``source``: a folder holding ``adapter_config.json``
    and ``adapter_model.safetensors``, or those two files' bytes. Raises ``AdapterError`` (an
    ``InputError``) naming the module or key at fault, also for non-finite numbers."""
    config_bytes, weights_bytes = source if isinstance(source, tuple) else read_adapter_files(source)
    info = inspect_adapter(config_bytes, weights_bytes, config)
    try:
        tensors = load_safetensors(weights_bytes)
    except SafetensorError as exc:
        raise AdapterError(f"adapter_model.safetensors: cannot be read ({exc})") from exc
    device = torch.device(device)
    weights, nbytes = {}, 0
    for target in info.targets:
        pair = []
        for key in (target.key_a, target.key_b):
            tensor = tensors.pop(key)
            if not torch.isfinite(tensor).all():  # load time: one check per tensor, off any step loop
                raise AdapterError(f"adapter_model.safetensors: {target.module}: {key} holds non-finite numbers",
                                   module=target.module)
            pair.append(tensor.to(device=device, dtype=dtype).contiguous())
            nbytes += pair[-1].nbytes
        weights[target.module] = (pair[0], pair[1])
    logger.info("loaded a rank-%d LoRA adapter: %d modules, %.1f MB on %s", info.rank, len(weights),
                nbytes / 2**20, device)
    return LoadedAdapter(info=info, weights=weights, device=device, dtype=dtype, nbytes=nbytes)


def _hook(a: torch.Tensor, b: torch.Tensor, s: float) -> Callable:
    def add_low_rank(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(args[0], a), b)
        return output.add(delta.to(output.dtype), alpha=s)

    return add_low_rank


@contextlib.contextmanager
def apply_adapter(model: nn.Module, adapter: LoadedAdapter, scale: float = 1.0) -> Iterator[None]:
    """Within the block, every target linear of ``model`` (a ``BagelModel``, e.g.
    ``engine.model``) adds ``scale · adapter.scale · (x Aᵀ) Bᵀ`` to its output. ``scale``
    weighs the adapter (0: the base, 1: the adapter as trained). Raises ``AdapterError`` when
    ``scale`` is not a finite number, the adapter sits on another device or dtype than the
    model, or a target is missing from the model or shaped otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise AdapterError(f"scale: {scale!r} must be a finite number", key="scale")
    weight = model.get_submodule("language_model.model.embed_tokens").weight
    if (weight.device, weight.dtype) != (adapter.device, adapter.dtype):
        raise AdapterError(f"adapter: loaded on {adapter.device} as {adapter.dtype}, the model is on "
                           f"{weight.device} as {weight.dtype}")
    modules = {}
    for target in adapter.info.targets:
        try:
            module = model.get_submodule(target.module)
        except AttributeError as exc:
            raise AdapterError(f"adapter: {target.module}: no such module in the model",
                               module=target.module) from exc
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != (target.out_features, target.in_features):
            raise AdapterError(f"adapter: {target.module}: the model's layer is {shape[0]}×{shape[1]}, the "
                               f"adapter's {target.out_features}×{target.in_features}", module=target.module)
        modules[target.module] = module
    s = scale * adapter.scale
    handles = [module.register_forward_hook(_hook(*adapter.weights[name], s)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class AdapterCache:
    """Loaded adapters by id, least recently used first out, holding at most ``max_bytes`` of
    adapter tensors between calls (during a miss the new adapter is loaded before the old ones
    go, so the peak is the limit plus one adapter). Not thread-safe, like the engine it feeds.
    ``hits``, ``misses`` and ``evictions`` count since creation."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise AdapterError(f"max_bytes: {max_bytes!r} must be a positive number of bytes", key="max_bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(adapter.nbytes for adapter in self._entries.values())

    def keys(self) -> list[str]:
        """Ids held, least recently used first."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, load: Callable[[], LoadedAdapter]) -> LoadedAdapter:
        """The adapter ``key``: from the cache (now the most recent), or ``load()`` on a miss,
        after which the least recently used adapters go until the total fits. An adapter larger
        than the whole limit raises ``AdapterError`` and is not kept."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        adapter = load()
        if adapter.nbytes > self.max_bytes:
            raise AdapterError(f"adapter {key}: {adapter.nbytes} bytes on the device exceeds the "
                               f"{self.max_bytes} byte adapter cache limit")
        self._entries[key] = adapter
        while self.nbytes > self.max_bytes:
            evicted, _ = self._entries.popitem(last=False)
            self.evictions += 1
            logger.info("adapter cache: evicted %s (%d adapters, %d bytes left)", evicted, len(self), self.nbytes)
        return adapter
