"""Fixed 2-D sine-cosine position tables added to ViT tokens and VAE latent tokens.

Owns: computing the table (``sincos_table``) and the module that holds it as a parameter and
looks rows up by flattened grid id (``PositionTable``). The ids themselves come from
``transforms.grid_position_ids``; the checkpoint stores the tables, so the loader overwrites the
computed values with the stored ones (they are equal; a test checks it).

Facts from the reference (``modeling/bagel/modeling_utils.py``, after DiT/MAE): a side×side grid,
row r = i·side + j for grid row i and column j; the first half of the channels encodes the
column j and the second half the row i; each half is ``[sin(pos·ω), cos(pos·ω)]`` with
ω_k = 10000^(−k/(D/4)), evaluated in float64 and stored as float32.

Departures from the reference: none in value; the table is computed directly from the two
index grids rather than through a meshgrid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bagel.errors import CheckpointError


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table(max_side: int, dim: int) -> torch.Tensor:
    """The [max_side², dim] float32 table, row i·max_side + j for grid cell (i, j)."""
    if dim % 4:
        raise CheckpointError(f"position table: width {dim} is not a multiple of 4, which a 2-D "
                              f"sin-cos table needs")
    cells = np.arange(max_side * max_side)
    col = (cells % max_side).astype(np.float32)
    row = (cells // max_side).astype(np.float32)
    table = np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1)
    return torch.from_numpy(table).to(torch.float32)


class PositionTable(nn.Module):
    """A frozen [max_side², dim] table; ``forward(position_ids [N]) → rows [N, dim]``."""

    def __init__(self, max_side: int, dim: int) -> None:
        super().__init__()
        self.max_side = max_side
        self.dim = dim
        self.pos_embed = nn.Parameter(torch.empty(max_side * max_side, dim), requires_grad=False)
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_table(max_side, dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]
