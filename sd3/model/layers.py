"""The small building blocks of the MMDiT: conditioning embeddings, adaptive norms, MLPs.

Shapes: B batch, N image tokens, L text tokens, D model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def scalar_parameter(value: float) -> nn.Parameter:
    """A learnable scalar stored with shape (1,), not (): FSDP2's fully_shard refuses 0-dim parameters."""
    return nn.Parameter(torch.tensor([float(value)]))


def fit_scalar(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`value` reshaped to `shape` when it is a 0-dim tensor saved for a (1,) scalar parameter (checkpoints written
    before the scalars became (1,)); anything else is returned as it is, so real shape mismatches still fail."""
    return value.reshape(shape) if value.dim() == 0 and tuple(shape) == (1,) else value


class ScalarsLoad(nn.Module):
    """Mixin: loads checkpoints whose scalar parameters were saved with shape () (see `fit_scalar`)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, param in self.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = fit_scalar(state_dict[key], param.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TimestepEmbedding(ScalarsLoad):
    """Sinusoidal embedding of `t · s` then a linear layer, with a learnable time scale `s` (init 1000).

    The source (003_5bc3fb5fdb7c8fe6.txt, Model Details 4) lets the model learn the range the timestep is spread over,
    starting from the usual 0-1000 of DDPM-style models; t itself stays in [0, 1].
    """

    def __init__(self, dim: int, frequency_dim: int = 256, init_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # (F/2,)
        self.time_scale = scalar_parameter(init_scale)  # (1,)
        self.proj = nn.Linear(frequency_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Kept in fp32 even under autocast: sin/cos of arguments up to ~1000 lose all precision in bf16.
        angles = (t.float() * self.time_scale.float())[:, None] * self.freqs[None]  # (B, F/2)
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, F)
        return self.proj(emb.to(self.proj.weight.dtype))  # (B, D)


class SeedTimestepEmbedding(ScalarsLoad):
    """The source's time embedding (`model.time_embedding = "seed"`, SEED_SPEC §g item 1): a D-wide sinusoid of
    t·s with angles a_k = t·s / 10000^(2k/D), k < D, laid out [sin(a_0, a_2, ...), cos(a_1, a_3, ...)], then a
    Linear(D, D) without bias. Its lowest frequency is 10000^-2; kept only so converted checkpoints are exact."""

    def __init__(self, dim: int, init_scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the seed time embedding needs an even model dim, got {dim}")
        freqs = max_period ** (-2 * torch.arange(dim, dtype=torch.float64) / dim)  # (D,): fp64 so 1e-8 is exact
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.time_scale = scalar_parameter(init_scale)  # (1,)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = (t.float() * self.time_scale.float())[:, None] * self.freqs[None]  # (B, D), fp32 as above
        emb = torch.cat([torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])], dim=-1)  # (B, D)
        return self.proj(emb.to(self.proj.weight.dtype))  # (B, D)


def make_time_embedding(kind: str, dim: int) -> nn.Module:
    return SeedTimestepEmbedding(dim) if kind == "seed" else TimestepEmbedding(dim)


class TextPartEmbedding(ScalarsLoad):
    """One text encoder's tokens -> model width: RMSNorm, a learnable scalar (model.text_scale_init), a projection.

    Each encoder gets its own norm because their statistics differ, and the scalar because some encoders
    (Gemma) emit very large activations (source, Model Details 3). The source's start, 0.01, keeps the text's
    initial influence small.
    """

    def __init__(self, in_dim: int, dim: int, init_scale: float = 0.01):
        super().__init__()
        self.norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.scale = scalar_parameter(init_scale)  # (1,)
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens) * self.scale)  # (B, T, d_i) -> (B, T, D)


class PatchEmbedding(nn.Module):
    """Patchify latents with a stride-p convolution, then a linear layer (ARCHITECTURE §2)."""

    def __init__(self, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, D, h/p, w/p)
        return self.proj(x.flatten(2).transpose(1, 2))  # (B, N, D), row-major over the patch grid


class Modulation(nn.Module):
    """`chunks` vectors of width D (shift / scale / gate ...) from the block's conditioning y'."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(cond).unsqueeze(1).chunk(self.chunks, dim=-1)  # each (B, 1, D)


class HeadRMSNorm(nn.RMSNorm):
    """Per-head RMSNorm of queries or keys (x: (B, S, H, Dh)), with its weight cast to the input's dtype so bf16
    activations take torch's fused kernel instead of the slow mixed-dtype path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def adaptive_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, then `·(1 + scale) + shift`: the conditioning sets the affine per sample."""
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)  # (B, S, D)
    return torch.addcmul(shift, x, 1 + scale)  # (B, S, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP: W2(SiLU(W1 x) · W3 x). Hidden width = D·hidden_scale (the source's convention: hidden_scale 4.0
    with SwiGLU, three full-width matrices; not LLaMA's 2/3 shrink). The two input matrices are one fused linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, S, H) each
        return self.w2(F.silu(gate) * up)  # (B, S, D)


class GeluMLP(nn.Module):
    """Linear, tanh-GELU, linear: the SD3 paper's MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, S, D)


MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP}


def make_mlp(kind: str, dim: int, hidden_scale: float) -> nn.Module:
    if kind not in MLPS:
        raise ValueError(f"model.mlp_type '{kind}' is not one of {', '.join(MLPS)}")
    return MLPS[kind](dim, int(dim * hidden_scale))
