"""Configuration of the model (from the checkpoint's JSON) and of one request (GenerationParams).

Owns: the three architecture configs read from a checkpoint folder, the BAGEL constants the
reference applies on top of them at load time, and the per-request generation knobs with their
validation and per-task defaults. Leaves deployment settings to the service.

Departures from the reference: none in meaning. The reference scatters these values over
``app.py`` and ``inferencer.py``; here they are one frozen dataclass per concern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bagel.errors import CheckpointError, InputError

RENORM_TYPES = ("global", "channel", "text_channel")
TASKS = ("generate", "edit", "understand")
BAGEL_CONFIG_FILE = "bagel_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file is missing from the checkpoint folder") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _require(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise CheckpointError(f"{path}: required field {key!r} is missing")
    return raw[key]


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder with the reference's load-time overrides (qk_norm on, untied embeddings,
    every layer a mixture-of-transformers layer with a `_moe_gen` copy)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: Path) -> LLMConfig:
        raw = _read_json(path)
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")
        kwargs = {n: int(_require(raw, n, path)) for n in names}
        for opt in ("rms_norm_eps", "rope_theta"):
            if opt in raw:
                kwargs[opt] = float(raw[opt])
        if "max_position_embeddings" in raw:
            kwargs["max_position_embeddings"] = int(raw["max_position_embeddings"])
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(f"{path}: num_attention_heads {cfg.num_attention_heads} is not a "
                                  f"multiple of num_key_value_heads {cfg.num_key_value_heads}")
        return cfg


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP vision tower as BAGEL uses it: no rope, last layer dropped (the JSON stores N+1)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # layers actually used (JSON value minus one)
    num_attention_heads: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size

    @classmethod
    def from_file(cls, path: Path) -> ViTConfig:
        raw = _read_json(path)
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        kwargs = {n: int(_require(raw, n, path)) for n in names}
        kwargs["num_hidden_layers"] -= 1  # the reference drops the last SigLIP layer
        for opt in ("patch_size", "image_size", "num_channels"):
            if opt in raw:
                kwargs[opt] = int(raw[opt])
        if "layer_norm_eps" in raw:
            kwargs["layer_norm_eps"] = float(raw["layer_norm_eps"])
        if kwargs["num_hidden_layers"] < 1:
            raise CheckpointError(f"{path}: num_hidden_layers must be at least 2 (one is dropped)")
        return cls(**kwargs)


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder parameters. The real checkpoint ships no JSON for it: these defaults are
    the FLUX values the reference hard-codes; ``ae_config.json`` overrides them when present."""

    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_folder(cls, folder: Path) -> VAEConfig:
        path = folder / "ae_config.json"
        if not path.exists():
            return cls()
        raw = _read_json(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown fields {unknown}")
        if "ch_mult" in raw:
            raw["ch_mult"] = tuple(int(m) for m in raw["ch_mult"])
        return cls(**raw)


@dataclass(frozen=True)
class BagelConstants:
    """Values the reference sets in code when it builds BAGEL, not stored in the checkpoint."""

    latent_patch_size: int = 2
    max_latent_size: int = 64  # latent patches per side → 64·16 = 1024 px maximum
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    vae_max_px: int = 1024  # ImageTransform(1024, 512, 16)
    vae_min_px: int = 512
    vae_stride: int = 16
    vit_max_px: int = 980  # ImageTransform(980, 224, 14)
    vit_min_px: int = 224
    vit_stride: int = 14
    max_pixels: int = 14 * 14 * 9 * 1024

    @classmethod
    def from_folder(cls, folder: Path) -> BagelConstants:
        """The reference's values, overridden by the optional ``bagel_config.json``. The real
        checkpoint has no such file; tiny test checkpoints use it to lower the transforms'
        minimum sides (``vae_min_px``, ``vit_min_px``) so CPU tests and demos stay small."""
        path = folder / BAGEL_CONFIG_FILE
        if not path.exists():
            return cls()
        raw = _read_json(path)
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise CheckpointError(f"{path}: unknown fields {unknown}")
        consts = cls(**raw)
        if not (0 < consts.vae_min_px <= consts.vae_max_px and 0 < consts.vit_min_px <= consts.vit_max_px):
            raise CheckpointError(f"{path}: need 0 < vae_min_px <= vae_max_px and 0 < vit_min_px <= vit_max_px")
        return consts

    def latent_downsample(self, vae: VAEConfig) -> int:
        return vae.downsample * self.latent_patch_size

    def max_image_side_px(self, vae: VAEConfig) -> int:
        return self.max_latent_size * self.latent_downsample(vae)


@dataclass(frozen=True)
class ModelConfig:
    """Everything architectural about one checkpoint folder."""

    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig
    constants: BagelConstants = field(default_factory=BagelConstants)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder does not exist")
        return cls(
            llm=LLMConfig.from_file(folder / "llm_config.json"),
            vit=ViTConfig.from_file(folder / "vit_config.json"),
            vae=VAEConfig.from_folder(folder),
            constants=BagelConstants.from_folder(folder),
        )


@dataclass(frozen=True)
class GenerationParams:
    """Per-request knobs, with the reference app's defaults. ``for_task`` gives the per-task
    defaults (edit: image CFG 2.0, interval from 0.0, text_channel renorm)."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"
    max_think_tokens: int = 1024
    max_new_tokens: int = 512
    do_sample: bool = False
    text_temperature: float = 0.3
    seed: int | None = None
    # TaylorSeer step caching (taylorseer.py; the reference's enable_taylorseer, off by default):
    # full evaluations during the warm-up, then one in `interval`; derivatives up to `order`.
    taylorseer: bool = False
    taylorseer_warmup: int = 5
    taylorseer_interval: int = 3
    taylorseer_order: int = 6

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_interval", tuple(float(x) for x in self.cfg_interval))
        checks = [
            ("cfg_text_scale", 0.0 <= self.cfg_text_scale <= 30.0, "0..30"),
            ("cfg_img_scale", 0.0 <= self.cfg_img_scale <= 30.0, "0..30"),
            ("cfg_interval", len(self.cfg_interval) == 2
             and 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0, "0 <= start <= end <= 1"),
            ("timestep_shift", 0.0 < self.timestep_shift <= 20.0, "0 < shift <= 20"),
            ("num_timesteps", 2 <= self.num_timesteps <= 1000, "2..1000"),
            ("cfg_renorm_min", 0.0 <= self.cfg_renorm_min <= 1.0, "0..1"),
            ("cfg_renorm_type", self.cfg_renorm_type in RENORM_TYPES, f"one of {RENORM_TYPES}"),
            ("max_think_tokens", 1 <= self.max_think_tokens <= 16384, "1..16384"),
            ("max_new_tokens", 1 <= self.max_new_tokens <= 16384, "1..16384"),
            ("text_temperature", 0.0 < self.text_temperature <= 10.0, "0 < t <= 10"),
            ("taylorseer", isinstance(self.taylorseer, bool), "true or false"),
            ("taylorseer_warmup", 1 <= self.taylorseer_warmup <= 1000, "1..1000"),
            ("taylorseer_interval", 1 <= self.taylorseer_interval <= 100, "1..100"),
            ("taylorseer_order", 0 <= self.taylorseer_order <= 8, "0..8"),
        ]
        for name, ok, limit in checks:
            if not ok:
                raise InputError(f"{name}: {getattr(self, name)!r} is outside the allowed range {limit}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InputError(f"seed: {self.seed!r} must be in 0..2^63-1")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> GenerationParams:
        if task not in TASKS:
            raise InputError(f"task: {task!r} is not one of {TASKS}")
        base = cls()
        if task == "edit":
            base = replace(base, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                           cfg_renorm_type="text_channel")
        return replace(base, **overrides)
