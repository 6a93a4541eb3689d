"""LoRA adapters in PEFT's on-disk format: read and check them against a model, without torch.

Owns: the supported target modules (``SUPPORTED_TARGETS``) and their shapes for a
``ModelConfig`` (``adapter_targets``), the parse of ``adapter_config.json``, the parse of the
header of ``adapter_model.safetensors`` from its bytes (8-byte little-endian header length, JSON
header: dtype, shape and data offsets of every tensor), the map from PEFT's tensor names to our
module names, and every check an upload needs before any GPU work (``inspect_adapter``, which
returns an ``AdapterInfo``; given no ``ModelConfig`` — an API host without the checkpoint — it
checks all but the layer numbers and the shapes, which ``adapters.load_adapter`` checks against
the model's config). Leaves loading the tensors and applying them to ``adapters.py``
(torch), and making adapters to ``tiny_adapter.py``. Imports nothing but the standard library,
``bagel.config`` and ``bagel.errors``: the API process validates uploads with it and must never
load torch.

The format is what PEFT's ``save_pretrained`` writes for a LoRA on a model in the reference
layout (our module names are the reference's, ``llm.py``): the tensor of module ``M`` is
``base_model.model.M.lora_A.weight`` ``[r, in_features]`` and ``base_model.model.M.lora_B.weight``
``[out_features, r]``, and the adapted layer computes ``W x + scale · B A x`` with
``scale = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), as PEFT's ``lora.Linear``.

Supported targets (``SUPPORTED_TARGETS``, paths inside ``language_model.model.layers.N``): the
decoder's attention projections ``self_attn.{q,k,v,o}_proj`` and their generation-expert twins
``self_attn.{q,k,v,o}_proj_moe_gen``, and the SwiGLU projections ``{gate,up,down}_proj`` of both
experts' MLPs (``mlp.*`` and ``mlp_moe_gen.*``), in every decoder layer. Not supported: the ViT,
connector, embeddings, LM head and latent projections.

Supported configs: ``peft_type`` "LORA" with one rank ``r`` and one ``lora_alpha`` (rslora or
not). Refused, each with a message naming the key: DoRA (``use_dora``), trained biases (``bias``
other than "none", ``lora_bias``), ``modules_to_save``, per-module ``rank_pattern`` /
``alpha_pattern`` (their keys are regular expressions, which an upload must not make the API
run), ``fan_in_fan_out`` (our targets are ``nn.Linear``: PEFT itself saves false for them),
initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ …: only ``true``,
``false``, "gaussian", "orthogonal" and "eva" are accepted), and any other key this module does
not know that is set to something other than null/false/empty (a LoRA variant that changes the
forward pass: aLoRA, QALoRA, layer replication, trainable tokens …). ``target_modules`` is
informational: the tensors say which modules are adapted.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from bagel.config import ModelConfig
from bagel.errors import AdapterError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LAYER_PREFIX = "language_model.model.layers"  # the decoder layers' module path
# Paths inside one decoder layer of the linears an adapter may target.
SUPPORTED_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "self_attn.q_proj_moe_gen", "self_attn.k_proj_moe_gen", "self_attn.v_proj_moe_gen", "self_attn.o_proj_moe_gen",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj",
)
# The understanding expert's attention projections, as target names (``tiny_adapter.resolve_targets``).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes ~1.5 KB
MAX_HEADER_BYTES = 4 << 20  # every target of BAGEL-7B-MoT at once is ~0.1 MB of header
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype → bytes per element
ACCEPTED_INITS = (True, False, "gaussian", "orthogonal", "eva")

_PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# Keys PEFT writes that do not change the forward pass of a plain LoRA (metadata, dropout, the
# initialisation's own settings, how the targets were selected), or that are checked below.
_INERT_KEYS = frozenset({
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping",
    "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
})
_CHECKED_KEYS = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "bias", "init_lora_weights"})


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that define the computation."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...] | None

    @property
    def scale(self) -> float:
        """PEFT's ``scaling``: ``alpha / r``, or ``alpha / √r`` with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class TensorHeader:
    """One tensor of a safetensors header: dtype name, shape, byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class AdapterTarget:
    """One adapted linear: our module name, its shape, and the two tensors' names in the file."""

    module: str
    out_features: int
    in_features: int
    key_a: str
    key_b: str


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter. ``tensor_bytes``: the data bytes of the file; ``parameter_count``: the
    numbers held once loaded (``r · (in + out)`` per target; times the element size of the
    compute dtype for the bytes it takes on the device)."""

    config: AdapterConfig
    targets: tuple[AdapterTarget, ...]
    tensor_count: int
    tensor_bytes: int

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(t.module for t in self.targets)

    @property
    def parameter_count(self) -> int:
        return sum(self.rank * (t.in_features + t.out_features) for t in self.targets)


def adapter_targets(model: ModelConfig) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every linear an adapter may target in
    ``model``, layer by layer in ``SUPPORTED_TARGETS`` order."""
    llm = model.llm
    c, inter, d = llm.hidden_size, llm.intermediate_size, llm.head_dim
    q, kv = llm.num_attention_heads * d, llm.num_key_value_heads * d
    shapes = {"q_proj": (q, c), "k_proj": (kv, c), "v_proj": (kv, c), "o_proj": (c, q),
              "gate_proj": (inter, c), "up_proj": (inter, c), "down_proj": (c, inter)}
    found = []
    for layer in range(llm.num_hidden_layers):
        for path in SUPPORTED_TARGETS:
            out_features, in_features = shapes[path.rpartition(".")[2].removesuffix("_moe_gen")]
            found.append((f"{LAYER_PREFIX}.{layer}.{path}", out_features, in_features))
    return found


def _is_set(value: object) -> bool:
    """Whether a config value asks for something (null, false, 0 and empty containers do not)."""
    return value not in (None, False, 0, "", [], {})


def read_adapter_config(data: bytes) -> AdapterConfig:
    """Parse and check the bytes of ``adapter_config.json`` (see the module docstring for what is
    accepted). Raises ``AdapterError`` naming the offending key."""
    where = ADAPTER_CONFIG_FILE
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{where}: {len(data)} bytes exceeds the {MAX_CONFIG_BYTES} byte limit")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: a JSON object is required, got {type(raw).__name__}")

    def fail(key: str, problem: str) -> AdapterError:
        return AdapterError(f"{where}: {key} = {json.dumps(raw.get(key))}: {problem}", key=key)

    if raw.get("peft_type") != "LORA":
        raise fail("peft_type", 'only "LORA" adapters are supported')
    rank = raw.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise fail("r", "the rank must be a positive integer")
    alpha = raw.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise fail("lora_alpha", "must be a finite number")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise fail("use_rslora", "must be true or false")
    if raw.get("bias", "none") != "none":
        raise fail("bias", 'trained biases are not supported (only "none")')
    if raw.get("init_lora_weights", True) not in ACCEPTED_INITS:
        raise fail("init_lora_weights", "this initialisation rewrites the base weights, which a shared base "
                                        f"cannot serve (accepted: {', '.join(map(json.dumps, ACCEPTED_INITS))})")
    refusals = {
        "use_dora": "DoRA is not supported (plain LoRA only)",
        "lora_bias": "LoRA biases are not supported",
        "modules_to_save": "fully trained modules (modules_to_save) are not supported",
        "rank_pattern": "per-module ranks are not supported (one r for every module)",
        "alpha_pattern": "per-module alphas are not supported (one lora_alpha for every module)",
        "fan_in_fan_out": "the supported targets are nn.Linear layers, whose adapters PEFT saves with false",
    }
    for key in sorted(raw):
        if key in _INERT_KEYS or key in _CHECKED_KEYS or not _is_set(raw[key]):
            continue
        raise fail(key, refusals.get(key, "this setting is not supported (a LoRA variant that changes the "
                                          "forward pass, or a key this version does not know)"))
    targets = raw.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif targets is not None and not isinstance(targets, str):
        raise fail("target_modules", "must be a string, a list of strings or null")
    return AdapterConfig(rank=rank, alpha=float(alpha), use_rslora=use_rslora, target_modules=targets)


def read_safetensors_header(data: bytes) -> dict[str, TensorHeader]:
    """The tensors of a whole safetensors file given as bytes, name → ``TensorHeader``, with the
    checks the safetensors library makes (offsets contiguous from 0 to the end of the data, each
    range the size its dtype and shape need), so a file that passes loads. Only floating-point
    tensors are accepted. Raises ``AdapterError`` naming the file and the tensor."""
    where = ADAPTER_WEIGHTS_FILE
    if len(data) < 8:
        raise AdapterError(f"{where}: {len(data)} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterError(f"{where}: header length {n} exceeds the file ({len(data)} bytes) or the "
                           f"{MAX_HEADER_BYTES} byte limit")
    try:
        raw = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: the header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{where}: the header must be a JSON object")
    raw.pop("__metadata__", None)
    tensors = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(type(v) is int and v >= 0 for v in (*shape, begin, end)))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise AdapterError(f"{where}: {name}: malformed header entry {json.dumps(entry)[:200]}")
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{where}: {name}: dtype {dtype} is not one of {', '.join(FLOAT_DTYPES)}")
        if end - begin != math.prod(shape) * FLOAT_DTYPES[dtype]:
            raise AdapterError(f"{where}: {name}: data_offsets [{begin}, {end}] do not hold a {dtype} "
                               f"tensor of shape {shape}")
        tensors[name] = TensorHeader(dtype, tuple(shape), begin, end)
    position = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.begin != position:
            raise AdapterError(f"{where}: {name}: data starts at byte {t.begin}, expected {position} "
                               "(overlapping or missing data)")
        position = t.end
    if position != len(data) - 8 - n:
        raise AdapterError(f"{where}: the tensors cover {position} bytes of data, the file holds "
                           f"{len(data) - 8 - n}")
    return tensors


_TARGET_NAME = re.compile(rf"{re.escape(LAYER_PREFIX)}\.(?P<layer>\d+)\."
                          rf"(?P<path>{'|'.join(map(re.escape, SUPPORTED_TARGETS))})")


def _unsupported(module: str, model: ModelConfig | None) -> str:
    layers = "N" if model is None else f"{{0..{model.llm.num_hidden_layers - 1}}}"
    return (f"module {module} is not a supported target{'' if model is None else ' of this model'} (supported: "
            f"{LAYER_PREFIX}.{layers}.{{{', '.join(SUPPORTED_TARGETS)}}})")


def _layer_order(module: str) -> tuple[int, int]:
    """Sort key of a supported module name: layer, then ``SUPPORTED_TARGETS`` order."""
    match = _TARGET_NAME.fullmatch(module)
    return int(match["layer"]), SUPPORTED_TARGETS.index(match["path"])


def _adapted_shape(module: str, a: tuple[int, ...], b: tuple[int, ...], shapes: dict[str, tuple[int, int]] | None,
                   seen: dict[str, tuple[str, tuple[int, int]]]) -> tuple[int, int]:
    """(out_features, in_features) of the linear ``module`` adapts: from the model's config, or
    without one from the tensors, the same for every layer's copy of a target (``seen``: target
    path → the first module and its shape)."""
    if shapes is not None:
        return shapes[module]
    if len(a) != 2 or len(b) != 2:
        raise AdapterError(f"{ADAPTER_WEIGHTS_FILE}: {module}: lora_A {list(a)} and lora_B {list(b)} must both be "
                           "2-D", module=module)
    shape = (b[0], a[1])
    first, first_shape = seen.setdefault(_TARGET_NAME.fullmatch(module)["path"], (module, shape))
    if shape != first_shape:
        raise AdapterError(f"{ADAPTER_WEIGHTS_FILE}: {module}: adapts a {shape[0]}×{shape[1]} layer, {first} a "
                           f"{first_shape[0]}×{first_shape[1]} one (every layer's copy has one shape)", module=module)
    return shape


def inspect_adapter(config_bytes: bytes, weights_bytes: bytes, model: ModelConfig | None) -> AdapterInfo:
    """Check an adapter given as the bytes of its two files against ``model``: every tensor is a
    ``lora_A``/``lora_B`` weight of a supported target, each target has both, ``lora_A`` is
    ``[r, in_features]`` and ``lora_B`` ``[out_features, r]``. With ``model`` None (no
    configuration at hand) the layer numbers and the shapes are not checked against a model,
    only the rank and that every layer's copy of a target has one shape; a later check against
    the model (``load_adapter``) does the rest. Raises ``AdapterError`` naming the module
    (``.module``) or the config key (``.key``), the value and what was expected."""
    config = read_adapter_config(config_bytes)
    tensors = read_safetensors_header(weights_bytes)
    where, r = ADAPTER_WEIGHTS_FILE, config.rank
    if not tensors:
        raise AdapterError(f"{where}: holds no tensors")
    shapes = None if model is None else {name: (out, in_) for name, out, in_ in adapter_targets(model)}
    parts: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{where}: {key} is not a LoRA weight as PEFT names them "
                               "(base_model.model.<module>.lora_A.weight / .lora_B.weight)")
        module = match["module"]
        supported = module in shapes if shapes is not None else _TARGET_NAME.fullmatch(module) is not None
        if not supported:
            raise AdapterError(f"{where}: {key}: {_unsupported(module, model)}", module=module)
        parts.setdefault(module, {})[match["part"]] = key
    targets, seen = [], {}
    order = list(shapes) if shapes is not None else sorted(parts, key=_layer_order)
    for module in (m for m in order if m in parts):
        found = parts[module]
        for part, other in (("A", "B"), ("B", "A")):
            if part not in found:
                raise AdapterError(f"{where}: {module}: lora_{part}.weight is missing "
                                   f"(lora_{other}.weight is there)", module=module)
        a, b = tensors[found["A"]].shape, tensors[found["B"]].shape
        if len(a) == 2 and len(b) == 2 and (a[0] != r or b[1] != r):
            raise AdapterError(f"{where}: {module}: rank mismatch: lora_A has {a[0]} rows and lora_B {b[1]} "
                               f"columns, {ADAPTER_CONFIG_FILE} says r = {r}", module=module)
        out_features, in_features = _adapted_shape(module, a, b, shapes, seen)
        for part, got, want in (("A", a, (r, in_features)), ("B", b, (out_features, r))):
            if got != want:
                raise AdapterError(f"{where}: {module}: lora_{part}.weight has shape {list(got)}, expected "
                                   f"{list(want)} ({'r × in_features' if part == 'A' else 'out_features × r'})",
                                   module=module)
        targets.append(AdapterTarget(module, out_features, in_features, found["A"], found["B"]))
    return AdapterInfo(config=config, targets=tuple(targets), tensor_count=len(tensors),
                       tensor_bytes=sum(t.end - t.begin for t in tensors.values()))


def read_adapter_files(folder: str | Path) -> tuple[bytes, bytes]:
    """The bytes of ``adapter_config.json`` and ``adapter_model.safetensors`` in ``folder``;
    a missing file is an ``AdapterError`` naming it."""
    folder = Path(folder)
    found = []
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        try:
            found.append((folder / name).read_bytes())
        except OSError as exc:
            raise AdapterError(f"{folder / name}: cannot be read ({exc.strerror})") from exc
    return found[0], found[1]
