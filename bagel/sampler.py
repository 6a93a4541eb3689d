"""Flow-matching sampler: the shifted timestep schedule, the Euler step and CFG combination.

Owns: the schedule (computed once on the host before the loop), deciding at which steps CFG is
applied (``cfg_interval``), combining the conditional and unconditional velocities with the
text and image scales and renormalising them (``global`` per image, ``channel`` per token,
``text_channel`` per token on the text guidance only), and the Euler update. Knows no model:
it is handed velocities, so it is tested against known velocity fields.

Conventions (the reference's, see the fixture README): ``t`` runs from 1 (noise) to 0 (data),
``t = s·t / (1 + (s−1)·t)`` on ``linspace(1, 0, N)``, N−1 steps ``x ← x − v·(t_k − t_{k+1})``;
CFG is on at a step iff ``lo < t ≤ hi``, compared in float32 like the reference's tensors.

Departures from the reference: ``global`` renorm takes the norm per image (the reference takes
it over the whole packed batch and therefore only supports one image per call); for a single
image the two are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel.config import RENORM_TYPES


@dataclass(frozen=True)
class Schedule:
    """Timesteps ``t`` ``[N−1]`` (float32, host), step sizes ``dt`` ``[N−1]``, and per step
    whether CFG applies."""

    t: torch.Tensor
    dt: torch.Tensor
    cfg_on: tuple[bool, ...]

    @property
    def num_steps(self) -> int:
        return self.t.shape[0]


def make_schedule(num_timesteps: int, shift: float, cfg_interval: tuple[float, float]) -> Schedule:
    """The shifted schedule of ``num_timesteps`` points (``num_timesteps − 1`` Euler steps)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps: {num_timesteps} must be at least 2")
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    dt = t[:-1] - t[1:]
    t = t[:-1]
    lo, hi = cfg_interval
    # Compare as float32 tensors, like the reference (a Python-float comparison differs at t == 0.4).
    on = ((t > lo) & (t <= hi)).tolist()
    return Schedule(t=t, dt=dt, cfg_on=tuple(bool(x) for x in on))


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """One Euler step towards data: ``x − v·dt`` (v points from data to noise); ``dt`` is a
    0-d tensor on ``x``'s device (the loop moves the whole schedule there once)."""
    return x - v.to(x.dtype) * dt


def _segment_norms(v: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
    """Global L2 norm of each image's rows, broadcast back to ``[L, 1]``."""
    if sizes is None or len(sizes) == 1:
        return torch.linalg.vector_norm(v)
    norms = [torch.linalg.vector_norm(part).expand(part.shape[0], 1) for part in v.split(sizes)]
    return torch.cat(norms, dim=0)


def combine_cfg(v_cond: torch.Tensor, v_text_uncond: torch.Tensor, v_img_uncond: torch.Tensor | None,
                text_scale: float, img_scale: float, renorm_type: str, renorm_min: float,
                sizes: list[int] | None = None) -> torch.Tensor:
    """Guided velocity ``[L, C]`` from the three branches. ``v_img_uncond`` is only read when
    ``img_scale > 1``. ``sizes`` splits the rows into images for ``global`` renorm."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type: {renorm_type!r} is not one of {RENORM_TYPES}")
    use_img = img_scale > 1.0
    if use_img and v_img_uncond is None:
        raise ValueError("v_img_uncond is required when img_scale > 1")
    v_text = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        ratio = (torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True)
                 / (torch.linalg.vector_norm(v_text, dim=-1, keepdim=True) + 1e-8))
        v_text = v_text * ratio.clamp(min=renorm_min, max=1.0)
        return v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    v = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    if renorm_type == "global":
        ratio = _segment_norms(v_cond, sizes) / (_segment_norms(v, sizes) + 1e-8)
    else:
        ratio = (torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True)
                 / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + 1e-8))
    return v * ratio.clamp(min=renorm_min, max=1.0)


def guided_velocity(v_cond: torch.Tensor, v_text_uncond: torch.Tensor | None,
                    v_img_uncond: torch.Tensor | None, *, cfg_on: bool, text_scale: float,
                    img_scale: float, renorm_type: str, renorm_min: float,
                    sizes: list[int] | None = None) -> torch.Tensor:
    """The velocity one step uses: the conditional one when CFG is off at this step or the text
    scale is ≤ 1 (the reference ignores the image scale then), otherwise ``combine_cfg``."""
    if not cfg_on or text_scale <= 1.0:
        return v_cond
    return combine_cfg(v_cond, v_text_uncond, v_img_uncond, text_scale, img_scale, renorm_type,
                       renorm_min, sizes)


def branches_needed(cfg_on: bool, text_scale: float, img_scale: float) -> tuple[bool, bool]:
    """Which unconditional branches a step must evaluate: (text-free, image-free)."""
    text = cfg_on and text_scale > 1.0
    return text, text and img_scale > 1.0
