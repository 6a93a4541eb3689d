"""The FLUX autoencoder BAGEL uses to turn pictures into 16-channel latents and back.

Owns: the convolutional encoder and decoder (ResNet blocks, one self-attention block in the
middle, 2× down/up-sampling between levels), posterior sampling, and the latent scale/shift,
so callers see latents in the model's space on both sides (``encode`` returns
``scale·(z − shift)``, ``decode`` undoes it). Leaves resizing, normalisation and the packed
latent layout to ``transforms.py`` and weight loading to ``loading.py``.

Facts from the reference (``modeling/autoencoder.py``, itself from black-forest-labs/flux):
parameter names (``encoder.down.N.block.M.*``, ``decoder.up.N.*``, ``mid.block_1/attn_1/block_2``,
``nin_shortcut`` when a block changes width), GroupNorm with 32 groups and eps 1e-6, SiLU,
downsampling by a stride-2 3×3 conv after padding one zero row/column at the bottom/right,
nearest 2× upsampling followed by a 3×3 conv, one more ResNet block per decoder level than per
encoder level, single-head attention over all h·w positions with 1×1-conv projections, and the
posterior ``mean + exp(logvar/2)·ε`` with channels split [mean | logvar].

Departures from the reference:
- The encoder keeps only the current activation (the reference keeps every level's output in
  a list until the end), which matters at 1024×1024.
- Activations and residual sums are done in place on fresh tensors; ``F.silu`` replaces
  ``x·sigmoid(x)`` (same function, float32 results agree to rounding).
- ``encode`` takes the posterior noise as an argument (or a ``torch.Generator``) instead of
  drawing from the global RNG.
- The decoder runs channels-last (``DECODER_LAYOUT``); its output is handed back contiguous.
- Inputs are cast to the weights' dtype, so the module runs in whatever dtype it was loaded in;
  GroupNorm statistics are accumulated in float32 by PyTorch's kernels in every dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bagel.config import VAEConfig
from bagel.errors import InputError

_GROUPS = 32
_EPS = 1e-6
# The decoder (run once per output picture) keeps its activations and convolution weights
# channels-last: oneDNN's convolutions (CPU) and cuDNN's tensor-core kernels run faster on that
# layout (the `small` decoder at 256 px on the 2-core CPU: 0.58–0.76 → 0.46–0.49 s per picture;
# golden decoder output within 7e-6). The encoder stays contiguous: on the golden tiny VAE the
# channels-last kernels' different summation order grew to 1.7e-3 in the latent (1e-4 allowed),
# and batched requests encode a product once anyway.
DECODER_LAYOUT = torch.channels_last


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_GROUPS, channels, eps=_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv, twice, plus a (1×1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over every spatial position, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # Positions as rows [B, H·W, C] (free for the decoder's channels-last layout), and the
        # 1×1 convolutions as the matrix products they are: q, k and v come out contiguous, so
        # SDPA takes its fast kernel (strided [B, 1, H·W, C] views of conv outputs sent it down
        # the slow path: 204 ms for the two calls of a round trip against 46 ms contiguous).
        rows = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)

        def project(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
            return F.linear(t, conv.weight.view(c, c), conv.bias)

        out = F.scaled_dot_product_attention(project(self.q, rows)[:, None], project(self.k, rows)[:, None],
                                             project(self.v, rows)[:, None])[:, 0]
        out = project(self.proj_out, out).view(b, height, width, c).permute(0, 3, 1, 2)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()  # the encoder's layout (its golden parity depends on it)
        return out.add_(x)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row and column at the bottom/right, 3×3 conv stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour repeat, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, then an optional resampling step."""

    def __init__(self, widths: list[tuple[int, int]], resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in widths)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """[B, 3, H, W] → [B, 2·z_channels, ⌈H/8⌉, ⌈W/8⌉] (posterior mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths_in = (1, *cfg.ch_mult)
        last = len(cfg.ch_mult) - 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            width_in, width = cfg.ch * widths_in[level], cfg.ch * mult
            widths = [(width_in if n == 0 else width, width) for n in range(cfg.num_res_blocks)]
            resample = Downsample(width) if level != last else None
            self.down.append(Level(widths, resample, "downsample"))
        width = cfg.ch * cfg.ch_mult[-1]
        self.mid = MidBlock(width)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """[B, z_channels, h, w] → [B, out_ch, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width)
        # Built from the lowest resolution up, stored by level index (up.0 = full resolution),
        # as the checkpoint names them.
        levels: list[Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[level]
            widths = [(width if n == 0 else out, out) for n in range(cfg.num_res_blocks + 1)]
            width = out
            levels.insert(0, Level(widths, Upsample(out) if level != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoEncoder(nn.Module):
    """Encoder + decoder with the latent scale/shift; state_dict keys match ``ae.safetensors``."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pictures [B, 3, H, W] in [-1, 1] → the posterior's ``(mean, logvar)``, each
        [B, z, H/8, W/8] in the VAE's own (unscaled) space. This is the whole encoder pass;
        ``sample`` turns it into latents cheaply, as often as needed."""
        moments = self.encoder(x.to(self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, *, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior ``(mean, logvar)`` [B', z, h, w] → sampled latents ``mean + exp(logvar/2)·ε``,
        scaled/shifted into the model's space. ``noise`` ε may hold more rows than the posterior
        when the posterior has one row (one picture, several draws: it broadcasts); without it ε
        is drawn with ``generator`` (or the global RNG when that is None too)."""
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif noise.shape[1:] != mean.shape[1:] or mean.shape[0] not in (1, noise.shape[0]):
            raise InputError(f"noise: shape {tuple(noise.shape)} given, the posterior of this "
                             f"picture has shape {tuple(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.scale_factor * (z - self.shift_factor)

    def encode(self, x: torch.Tensor, *, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Pictures [B, 3, H, W] in [-1, 1] → sampled latents [B, z, H/8, W/8], scaled/shifted:
        ``posterior`` then ``sample``. ``noise`` (same shape as the latent) is the posterior ε;
        without it ε is drawn with ``generator`` (or the global RNG when that is None too)."""
        mean, logvar = self.posterior(x)
        if noise is not None and noise.shape != mean.shape:
            raise InputError(f"noise: shape {tuple(noise.shape)} given, the posterior of this "
                             f"picture has shape {tuple(mean.shape)}")
        return self.sample(mean, logvar, noise=noise, generator=generator)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures → posterior-mean latents, scaled/shifted like ``encode``."""
        mean, _ = self.posterior(x)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, z, h, w] (model space) → raw decoder output [B, 3, 8h, 8w] in ~[-1, 1]."""
        z = z.to(self.dtype) / self.scale_factor + self.shift_factor
        return self.decoder(z.contiguous(memory_format=DECODER_LAYOUT)).contiguous()

    def use_decoder_layout(self) -> AutoEncoder:
        """Store the decoder's convolution weights in ``DECODER_LAYOUT`` (the loader calls this
        once)."""
        self.decoder.to(memory_format=DECODER_LAYOUT)
        return self
