"""CPU offload of the decoder layers: the load mode ``offload="layers"``.

Owns: the offload modes (``OFFLOAD_MODES``, ``check_mode``), parking each decoder layer's
tensors in host memory while the load streams them in (``LayerOffload.tensor_loaded``), and
streaming the layers back to the device through two buffers while the model runs
(``LayerOffload.start`` and its forward hooks). Leaves what a layer is to ``llm.py``, the
quantized modules to ``quant.py``, the load itself to ``loading.py`` and the byte figures per
mode to ``memory.py``.

What stays where. A layer's tensors are everything its modules hold: parameters, buffers
(``Int8Linear``'s row absmax) and an NF4 weight's quantization state (per-block ``absmax`` and
the ``code`` table, tensors of bitsandbytes' ``QuantState`` rather than of the module). They
live in host memory — on CUDA in one pinned block per layer, so the copies can run
asynchronously; on the CPU (host and device the same memory) where the load put them. The
embeddings, LM head, final norms, ViT, connector, VAE and the small projections stay resident.

How a forward goes. ``Qwen2MoTModel.forward`` calls the layers 0..n-1 in order, and nothing
else walks them (the denoising loop, prefill, decode and TaylorSeer all go through it; the KV
cache and the attention hold no layer weights). Two device buffers, each shaped like one
layer, hold at most two layers at a time. The pre-forward hook of layer i makes sure layer i is
in a buffer (staging it there if it is not: the first forward, or a call out of order), makes
the compute stream wait for that copy, points the layer's modules at the buffer, and starts
the copy of layer i+1 (layer 0 after the last: the next forward's first) into the other buffer
on a side stream. That buffer last held layer i-1: the copy waits, on the device, for the
event the compute stream recorded when layer i-1 finished, so the copy of layer i+1 overlaps
the compute of layer i. The forward hook (run even when the forward raises) records that
event for layer i's buffer and points the modules back at the host tensors. The buffers live
as long as the model and are never freed, so no ``record_stream`` is needed: the two events
per buffer order every reuse, the host never waits, and device memory stays at exactly two
layers however far the host runs ahead of the device. On the CPU the same hooks, ordering and
buffers run with plain synchronous copies, so a result equals the resident mode's bit for bit.

bitsandbytes' ``Linear4bit`` re-lays its weight out on its first forward on a CPU with
AVX512-BF16 (``_convert_weight_packed_for_cpu``: the packed weight and its absmax change
shape and dtype). On the CPU each NF4 linear of a layer therefore runs one zero row before
its tensors are captured, so the layout that streams is the one every forward uses — the
resident mode makes the same change on its first forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from bagel.errors import InputError

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "layers")
# Each tensor of a layer's pinned host block starts on this boundary (as the CUDA caching
# allocator's blocks do), so every view is aligned for its dtype and for the copy engine.
PIN_ALIGN_BYTES = 512
RESIDENT_LAYERS = 2  # device buffers: the layer computing and the next one being copied


def check_mode(mode: str | None) -> str:
    """The offload mode ``mode`` names (``None`` means "none"), else raise ``InputError``."""
    if mode is None:
        return "none"
    if mode not in OFFLOAD_MODES:
        raise InputError(f"offload: {mode!r} is not one of {OFFLOAD_MODES}")
    return mode


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to ``PIN_ALIGN_BYTES``."""
    return -(-nbytes // PIN_ALIGN_BYTES) * PIN_ALIGN_BYTES


def pinned_allocation_bytes(nbytes: int) -> int:
    """Host memory a pinned block of ``nbytes`` takes: PyTorch's pinned-memory allocator
    (``CachingHostAllocator``) rounds every allocation up to a power of two by default."""
    return 1 << max(nbytes - 1, 0).bit_length()


@dataclass(frozen=True)
class _Slot:
    """One tensor a layer's module holds: a parameter (swapped through ``.data``, so a
    bitsandbytes ``Params4bit`` keeps its type and quantization state), a buffer, or a tensor
    attribute of an NF4 weight's ``QuantState``."""

    owner: object
    name: str
    kind: str  # "param" | "buffer" | "state"

    def get(self) -> torch.Tensor:
        if self.kind == "param":
            return self.owner._parameters[self.name].data
        if self.kind == "buffer":
            return self.owner._buffers[self.name]
        return getattr(self.owner, self.name)

    def set(self, tensor: torch.Tensor) -> None:
        if self.kind == "param":
            self.owner._parameters[self.name].data = tensor
        elif self.kind == "buffer":
            self.owner._buffers[self.name] = tensor
        else:
            setattr(self.owner, self.name, tensor)


def layer_slots(layer: nn.Module) -> list[_Slot]:
    """Every tensor ``layer`` holds, in module order (the same order for every layer)."""
    slots = []
    for module in layer.modules():
        slots += [_Slot(module, leaf, "param") for leaf, p in module._parameters.items() if p is not None]
        slots += [_Slot(module, leaf, "buffer") for leaf, b in module._buffers.items() if b is not None]
        state = getattr(module._parameters.get("weight"), "quant_state", None)
        if state is not None:
            slots += [_Slot(state, name, "state") for name in ("absmax", "code")
                      if isinstance(getattr(state, name, None), torch.Tensor)]
    return slots


def _load_slot_count(layer: nn.Module) -> int:
    """Tensors a load delivers into ``layer``: its parameters and persistent buffers."""
    return sum(sum(p is not None for p in m._parameters.values())
               + sum(b is not None and leaf not in m._non_persistent_buffers_set for leaf, b in m._buffers.items())
               for m in layer.modules())


@dataclass
class _Buffer:
    """One layer's worth of device tensors, the layer it holds, and (CUDA) its two events:
    ``ready`` (recorded on the side stream after a copy into it) and ``released`` (recorded on
    the compute stream after its layer's forward; waiting on an event never recorded returns
    at once, so a fresh buffer's first copy waits for nothing)."""

    tensors: list[torch.Tensor]
    layer: int | None = None
    ready: torch.cuda.Event | None = None
    released: torch.cuda.Event | None = None


class LayerOffload:
    """The decoder layers of one model in host memory, streamed to ``device`` while it runs.

    Made before the load streams tensors in (``tensor_loaded`` parks each layer once it is
    complete), started after it (``start``). ``copies`` counts layer copies made;
    ``device_bytes`` and ``host_bytes`` are the two buffers and the parked layers."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.layers: list[nn.Module] = list(model.language_model.model.layers)
        self.host: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.copies = 0
        self._slots: list[list[_Slot]] = [[] for _ in self.layers]
        self._blocks: list[torch.Tensor] = []  # the pinned host blocks (CUDA)
        self._buffers: list[_Buffer] = []
        self._copy_stream: torch.cuda.Stream | None = None
        self._layer_of = {id(m): i for i, layer in enumerate(self.layers) for m in layer.modules()}
        self._waiting = [_load_slot_count(layer) for layer in self.layers]

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    # ---- during the load ------------------------------------------------------------------

    def tensor_loaded(self, module: nn.Module) -> None:
        """The load has put one tensor into ``module``: once every tensor of a layer is in,
        move that layer to host memory (CUDA), so the device holds one layer at a time."""
        i = self._layer_of.get(id(module))
        if i is None:
            return
        self._waiting[i] -= 1
        if self._waiting[i] == 0 and self.is_cuda:
            self._park(i)

    def _park(self, i: int) -> None:
        """Copy layer ``i``'s tensors into one pinned host block and point its modules there."""
        slots = layer_slots(self.layers[i])
        tensors = [slot.get() for slot in slots]
        block = torch.empty(sum(aligned(t.nbytes) for t in tensors), dtype=torch.uint8, pin_memory=True)
        self._blocks.append(block)
        offset = 0
        for slot, t in zip(slots, tensors, strict=True):
            view = block[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            slot.set(view)
            offset += aligned(t.nbytes)

    # ---- after the load -------------------------------------------------------------------

    def start(self, dtype: torch.dtype) -> None:
        """Capture every layer's host tensors, allocate the two device buffers and hook the
        layers. ``dtype``: the load dtype (the activations' dtype)."""
        assert not any(self._waiting), f"layers with tensors still to load: {self._waiting}"
        for i, layer in enumerate(self.layers):
            if not self.is_cuda:
                _settle_cpu_layouts(layer, dtype)
            self._slots[i] = layer_slots(layer)
            self.host[i] = [slot.get() for slot in self._slots[i]]
        signature = [(t.shape, t.dtype) for t in self.host[0]]
        assert all([(t.shape, t.dtype) for t in h] == signature for h in self.host), "layers differ in shape"
        if self.is_cuda:
            torch.cuda.synchronize(self.device)  # the load's kernels are done with what the buffers reuse
            self._copy_stream = torch.cuda.Stream(self.device)
        for _ in range(RESIDENT_LAYERS):
            buf = _Buffer([torch.empty_like(t, device=self.device) for t in self.host[0]])
            if self.is_cuda:
                buf.ready, buf.released = torch.cuda.Event(), torch.cuda.Event()
            self._buffers.append(buf)
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: self._before(i))
            layer.register_forward_hook(lambda module, args, out, i=i: self._after(i), always_call=True)
        logger.info("offload: %d decoder layers in %shost memory (%.1f MB), %d on %s at a time (%.1f MB)",
                    len(self.layers), "pinned " if self.is_cuda else "", self.host_bytes / 2**20,
                    RESIDENT_LAYERS, self.device, self.device_bytes / 2**20)

    @property
    def host_bytes(self) -> int:
        """Host memory of the parked layers: the pinned blocks as allocated (CUDA), else the
        layers' tensors."""
        if self._blocks:
            return sum(pinned_allocation_bytes(block.nbytes) for block in self._blocks)
        return sum(t.nbytes for h in self.host for t in h)

    @property
    def device_bytes(self) -> int:
        return sum(t.nbytes for buf in self._buffers for t in buf.tensors)

    @property
    def staged(self) -> tuple[int | None, ...]:
        """The layer each device buffer holds (None: none yet)."""
        return tuple(buf.layer for buf in self._buffers)

    def buffer_tensors(self) -> list[torch.Tensor]:
        """The device buffers' tensors (both buffers)."""
        return [t for buf in self._buffers for t in buf.tensors]

    # ---- while the model runs -------------------------------------------------------------

    def _holding(self, layer: int) -> _Buffer | None:
        return next((buf for buf in self._buffers if buf.layer == layer), None)

    def _other(self, buf: _Buffer) -> _Buffer:
        return self._buffers[1] if buf is self._buffers[0] else self._buffers[0]

    def _stage(self, layer: int, buf: _Buffer) -> None:
        """Copy ``layer`` into ``buf``: on CUDA on the side stream, once the compute stream is
        done with what ``buf`` held (no host wait)."""
        buf.layer = layer
        self.copies += 1
        if not self.is_cuda:
            for dst, src in zip(buf.tensors, self.host[layer], strict=True):
                dst.copy_(src)
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(buf.released)
            for dst, src in zip(buf.tensors, self.host[layer], strict=True):
                dst.copy_(src, non_blocking=True)
            buf.ready.record(self._copy_stream)

    def _bind(self, layer: int, tensors: list[torch.Tensor]) -> None:
        for slot, t in zip(self._slots[layer], tensors, strict=True):
            slot.set(t)

    def _before(self, layer: int) -> None:
        buf = self._holding(layer)
        nxt = (layer + 1) % len(self.layers)
        if buf is None:  # not prefetched: the first forward, or a layer called out of order
            buf = self._buffers[0] if self._buffers[0].layer != nxt else self._buffers[1]
            self._stage(layer, buf)
        if self.is_cuda:
            torch.cuda.current_stream(self.device).wait_event(buf.ready)
        self._bind(layer, buf.tensors)
        if nxt != layer and self._holding(nxt) is None:
            self._stage(nxt, self._other(buf))

    def _after(self, layer: int) -> None:
        buf = self._holding(layer)
        if self.is_cuda:
            buf.released.record(torch.cuda.current_stream(self.device))
        self._bind(layer, self.host[layer])


def _settle_cpu_layouts(layer: nn.Module, dtype: torch.dtype) -> None:
    """Run one zero row through each NF4 linear of ``layer`` on the CPU, so bitsandbytes makes
    its first-forward layout change now (see the module docstring)."""
    with torch.no_grad():
        for module in layer.modules():
            if getattr(module._parameters.get("weight"), "quant_state", None) is not None:
                module(torch.zeros(1, module.in_features, dtype=dtype))
