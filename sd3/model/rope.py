"""Positions of image patches: rotary embeddings (RoPE2d, the default; 1D RoPE; RoPE2dV2) and fixed sin-cos
(the `absolute` option). Text never gets a position (SEED_SPEC §b).

Positions are divided by `position_scale` = max_res / max_res_orig so a model trained at 256 px sees the same
position range when fine-tuned at 512 or 1024 px (interpolated positions); the source's RoPE2d ignored it, which
`model.rope_interpolate = false` reproduces.

Every rotary module splits its work in two: `tables(h, w)` builds the cos/sin tables of a grid (pure, fp32), and
`forward(x, tables)` applies them. The model builds the tables once per forward, outside the (checkpointed,
compiled) blocks: a cache written inside a block broke torch.compile's graph at every new bucket shape.
"""

from __future__ import annotations

import torch
from torch import nn

Tables = tuple[torch.Tensor, ...]


def grid_positions(h: int, w: int, position_scale: float,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch in row-major order, divided by `position_scale`: two (h·w,) fp32 tensors."""
    rows = torch.arange(h, dtype=torch.float32, device=device) / position_scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / position_scale
    return rows.repeat_interleave(w), cols.repeat(h)  # (N,), (N,)


def _frequencies(count: int, exponent_step: float, base: float = 10000.0) -> torch.Tensor:
    return base ** (-torch.arange(count, dtype=torch.float32) * exponent_step)  # (count,)


class Rope2d(nn.Module):
    """2D rotary embedding: the first half of the head dim rotates with the patch row, the second with its column.

    Each half uses the "rotate half" pairing (channel i with i + head_dim/4), so applying it is two multiplies
    and one add on contiguous memory. The source pairs channels (2i, 2i+1) instead; `sd3 import-seed` permutes
    its q/k weights to this pairing, which leaves every logit unchanged.
    """

    def __init__(self, head_dim: int, position_scale: float, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE2d needs a q/k head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        self.head_dim, self.position_scale = head_dim, position_scale
        self.register_buffer("freqs", _frequencies(quarter, 1 / quarter, base), persistent=False)  # (Dh/4,)

    def tables(self, h: int, w: int) -> Tables:
        """cos and signed sin, each (N, 1, head_dim) fp32, to broadcast over (B, N, H, head_dim)."""
        rows, cols = grid_positions(h, w, self.position_scale, self.freqs.device)
        angle_r = rows[:, None] * self.freqs[None]  # (N, Dh/4)
        angle_c = cols[:, None] * self.freqs[None]  # (N, Dh/4)
        cos = torch.cat([angle_r.cos(), angle_r.cos(), angle_c.cos(), angle_c.cos()], dim=-1)  # (N, Dh)
        # The sign of the rotation lives in the table: rotated = x·cos + swap(x)·sin_signed.
        sin = torch.cat([-angle_r.sin(), angle_r.sin(), -angle_c.sin(), angle_c.sin()], dim=-1)  # (N, Dh)
        return cos[:, None], sin[:, None]

    def forward(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        """x: (B, N, H, Dh) image queries or keys -> rotated, same shape and dtype."""
        cos, sin = (t.to(x.dtype) for t in tables)
        swapped = x.unflatten(-1, (2, 2, self.head_dim // 4)).flip(-2).flatten(-3)  # [b_r, a_r, b_c, a_c]
        return x * cos + swapped * sin


class Rope1d(nn.Module):
    """1D rotary embedding over the image tokens in raster order (the source's `RoPE`): position n / scale,
    frequencies 10000^(−2i/Dh), rotate-half pairing (channel i with i + Dh/2)."""

    def __init__(self, head_dim: int, position_scale: float, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even q/k head dim, got {head_dim}")
        half = head_dim // 2
        self.head_dim, self.position_scale = head_dim, position_scale
        self.register_buffer("freqs", _frequencies(half, 1 / half, base), persistent=False)  # (Dh/2,)

    def tables(self, h: int, w: int) -> Tables:
        pos = torch.arange(h * w, dtype=torch.float32, device=self.freqs.device) / self.position_scale  # (N,)
        angle = pos[:, None] * self.freqs[None]  # (N, Dh/2)
        cos = torch.cat([angle.cos(), angle.cos()], dim=-1)  # (N, Dh)
        sin = torch.cat([-angle.sin(), angle.sin()], dim=-1)  # (N, Dh)
        return cos[:, None], sin[:, None]

    def forward(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        cos, sin = (t.to(x.dtype) for t in tables)
        swapped = x.unflatten(-1, (2, self.head_dim // 2)).flip(-2).flatten(-2)  # (B, N, H, Dh): [b, a]
        return x * cos + swapped * sin


class Rope2dV2(nn.Module):
    """The source's RoPE2dV2 (SEED_SPEC §b): the first d3 = ⌊Dh/3⌋·3 channels as triples v_j = x[3j:3j+3], each
    multiplied by the 3-D rotation M = R_z(θ)·R_x(α) with θ = row·ω_j, α = col·ω_j (positions divided by the
    scale), ω_j = 10000^(−3j/d3); the remaining channels pass through.

    Reading: "each triple is multiplied by M" is taken as M·v (v a column). The source writes the result back
    de-interleaved (all first components, then all second, then all third); we keep the triples in place, since
    q and k get the same permutation and no logit changes. Unlike RoPE2d the logits are not purely relative:
    3-D rotations do not commute.
    """

    def __init__(self, head_dim: int, position_scale: float, base: float = 10000.0):
        super().__init__()
        if head_dim < 3:
            raise ValueError(f"RoPE2dV2 needs a q/k head dim of at least 3, got {head_dim}")
        self.triples = head_dim // 3
        self.head_dim, self.position_scale = head_dim, position_scale
        self.register_buffer("freqs", _frequencies(self.triples, 1 / self.triples, base), persistent=False)  # (d3/3,)

    def tables(self, h: int, w: int) -> Tables:
        """cos θ, sin θ, cos α, sin α, each (N, 1, d3/3) fp32."""
        rows, cols = grid_positions(h, w, self.position_scale, self.freqs.device)
        theta, alpha = rows[:, None] * self.freqs[None], cols[:, None] * self.freqs[None]  # (N, d3/3) each
        return tuple(t[:, None] for t in (theta.cos(), theta.sin(), alpha.cos(), alpha.sin()))

    def forward(self, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        ct, st, ca, sa = (t.to(x.dtype) for t in tables)  # (N, 1, d3/3) each
        d3 = 3 * self.triples
        v0, v1, v2 = x[..., :d3].unflatten(-1, (self.triples, 3)).unbind(-1)  # (B, N, H, d3/3) each
        o0 = ct * v0 - st * ca * v1 + st * sa * v2  # row 1 of M
        o1 = st * v0 + ct * ca * v1 - ct * sa * v2  # row 2
        o2 = sa * v1 + ca * v2  # row 3
        rotated = torch.stack([o0, o1, o2], dim=-1).flatten(-2)  # (B, N, H, d3)
        return torch.cat([rotated, x[..., d3:]], dim=-1)  # (B, N, H, Dh)


ROTARY = {"RoPE2d": Rope2d, "RoPE": Rope1d, "RoPE2dV2": Rope2dV2}


def make_rope(kind: str, head_dim: int, position_scale: float) -> nn.Module | None:
    """The rotary module of `model.positional_encoding`, or None for absolute / NoPE."""
    return ROTARY[kind](head_dim, position_scale) if kind in ROTARY else None


def sincos_2d(h: int, w: int, dim: int, position_scale: float, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (the SD3 paper's `absolute` option): (N, dim), half rows, half columns."""
    if dim % 4:
        raise ValueError(f"absolute positions need a model dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (D/4,)
    rows, cols = grid_positions(h, w, position_scale, device)
    angle_r, angle_c = rows[:, None] * omega, cols[:, None] * omega  # (N, D/4) each
    return torch.cat([angle_r.sin(), angle_r.cos(), angle_c.sin(), angle_c.cos()], dim=-1)  # (N, D)
