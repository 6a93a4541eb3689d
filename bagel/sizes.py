"""Picture sizes the model works at, without torch.

Owns: the reference's resize rule (``resized_size``: long edge at most ``max_px``, short edge
at least ``min_px``, the long edge winning, sides snapped to the stride, a pixel budget) and
``vae_size``, the size an input picture has on the VAE path — which is an edit's output size.
Torch-free on purpose: the service states an edit's or try-on's output size when the job is
submitted, in a process that never loads the model. Leaves resizing pixels to ``transforms.py``.

Facts taken from the reference (ByteDance-Seed/Bagel ``data/transforms.py``): sizes are
computed with Python ``round`` (ties to even) and snapped to the stride, at least one stride.
"""

from __future__ import annotations

from bagel.config import BagelConstants


def _snap(value: int, stride: int) -> int:
    return max(stride, int(round(value / stride) * stride))


def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    return _snap(round(width * scale), stride), _snap(round(height * scale), stride)


def resized_size(width: int, height: int, *, max_px: int, min_px: int, stride: int,
                 max_pixels: int) -> tuple[int, int]:
    """Target (width, height) of the reference's long-edge / short-edge / pixel-budget rule."""
    scale = min(max_px / max(width, height), 1.0)
    scale = max(scale, min_px / min(width, height))
    new_w, new_h = _scaled(width, height, scale, stride)
    if new_w * new_h > max_pixels:
        new_w, new_h = _scaled(new_w, new_h, max_pixels / (new_w * new_h), stride)
    if max(new_w, new_h) > max_px:
        new_w, new_h = _scaled(new_w, new_h, max_px / max(new_w, new_h), stride)
    return new_w, new_h


def vae_size(width: int, height: int, constants: BagelConstants) -> tuple[int, int]:
    """(width, height) of a width×height picture on the VAE path: an edit's output size."""
    return resized_size(width, height, max_px=constants.vae_max_px, min_px=constants.vae_min_px,
                        stride=constants.vae_stride, max_pixels=constants.max_pixels)
