"""2D positions of image patches: rotary embedding (RoPE2d, the default) and fixed sin-cos (the `absolute` option).

Positions are divided by `max_res / max_res_orig` so a model trained at 256 px sees the same position range when
fine-tuned at 512 or 1024 px (interpolated positions), as the source did.
"""

from __future__ import annotations

import torch
from torch import nn


def grid_positions(h: int, w: int, position_scale: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch in row-major order, divided by `position_scale`: two (h·w,) fp32 tensors."""
    rows = torch.arange(h, dtype=torch.float32, device=device) / position_scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / position_scale
    return rows.repeat_interleave(w), cols.repeat(h)  # (N,), (N,)


class Rope2d(nn.Module):
    """2D rotary embedding: the first half of the head dim rotates with the patch row, the second with its column.

    Each half uses the "rotate half" pairing (channel i with i + head_dim/4), so applying it is two multiplies
    and one add on contiguous memory. cos/sin tables are built once per grid size and cached.
    """

    def __init__(self, head_dim: int, position_scale: float, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE2d needs a head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        self.head_dim = head_dim
        self.position_scale = position_scale
        self.register_buffer("freqs", base ** (-torch.arange(quarter, dtype=torch.float32) / quarter), persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, each (N, 1, head_dim), to broadcast over (B, N, H, head_dim)."""
        key = (h, w, self.freqs.device, dtype)
        if key not in self._tables:
            rows, cols = grid_positions(h, w, self.position_scale, self.freqs.device)
            angle_r = rows[:, None] * self.freqs[None]  # (N, Dh/4)
            angle_c = cols[:, None] * self.freqs[None]  # (N, Dh/4)
            cos = torch.cat([angle_r.cos(), angle_r.cos(), angle_c.cos(), angle_c.cos()], dim=-1)  # (N, Dh)
            # The sign of the rotation lives in the table: rotated = x·cos + swap(x)·sin_signed.
            sin = torch.cat([-angle_r.sin(), angle_r.sin(), -angle_c.sin(), angle_c.sin()], dim=-1)  # (N, Dh)
            self._tables[key] = (cos[:, None].to(dtype), sin[:, None].to(dtype))
        return self._tables[key]

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """x: (B, N, H, Dh) image queries or keys on an h×w patch grid -> rotated, same shape."""
        cos, sin = self.tables(h, w, x.dtype)
        quarter = self.head_dim // 4
        swapped = x.unflatten(-1, (2, 2, quarter)).flip(-2).flatten(-3)  # (B, N, H, Dh): [b_r, a_r, b_c, a_c]
        return x * cos + swapped * sin


def sincos_2d(h: int, w: int, dim: int, position_scale: float, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (the SD3 paper's `absolute` option): (N, dim), half rows, half columns."""
    if dim % 4:
        raise ValueError(f"absolute positions need a model dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (D/4,)
    rows, cols = grid_positions(h, w, position_scale, device)
    angle_r, angle_c = rows[:, None] * omega, cols[:, None] * omega  # (N, D/4) each
    return torch.cat([angle_r.sin(), angle_r.cos(), angle_c.sin(), angle_c.cos()], dim=-1)  # (N, D)
