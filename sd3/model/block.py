"""One MMDiT block (ARCHITECTURE §2) and the fp32 per-sample helper its conditioning layers use.

Shapes: B batch, N image tokens, L text tokens, D width, H heads, Dh = D/H the value head dim, Dqk the query/key
head dim (Dh, or Dh/2 with `model.qk_half_dim`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd3.config import ModelConfig
from sd3.model.attention import attention, to_autocast_dtype
from sd3.model.layers import HeadRMSNorm, Modulation, adaptive_norm, make_mlp
from sd3.model.rope import Tables


def per_sample(fn: Callable, like: torch.Tensor, cast: bool = True):
    """Run a conditioning computation on (B, D) vectors in fp32 with autocast off, and hand back its outputs in the
    autocast dtype (or fp32 when `cast` is False). These layers (time, pooled, modulation: ~30% of the weights) see
    one row per sample, so their matmuls cost nothing, while autocast would copy each of their weight matrices to
    bf16 on every step and their gradients back to fp32 — the dominant cost of these layers on a CPU.

    Devices autocast does not know (meta, used to size and count the model without memory) just run `fn`.
    """
    device = like.device.type
    if not torch.amp.is_autocast_available(device):
        return fn()
    with torch.autocast(device, enabled=False):
        out = fn()
    if cast and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(o.to(dtype) for o in out) if isinstance(out, tuple) else out.to(dtype)
    return out


def merge_pairs(t: torch.Tensor, stream: str) -> torch.Tensor:
    """`model.kv_merge_attn` (SEED_SPEC §c): average adjacent sequence pairs, (B, S, H, d) -> (B, S/2, H, d).
    Image pairs are raster neighbours (two patches side by side)."""
    if t.shape[1] % 2:
        raise ValueError(f"model.kv_merge_attn needs an even number of {stream} tokens, got {t.shape[1]}")
    return t.unflatten(1, (t.shape[1] // 2, 2)).mean(dim=2)


class JointBlock(nn.Module):
    """One MMDiT block: adaptive norms from y' = SiLU(Linear(y)), joint attention over [image, text] with per-stream
    projections (softmax: per-head QK RMSNorm; cosine: L2-normalised q/k), then gated residuals
    `x = x + attn·gate1; x = x + MLP(norm2(x))·gate2`.

    `last=True` (the final block, unless the model has a text head): text only supplies keys and values, so there
    is no text query, no text out-projection, no text MLP and only shift/scale for the text norm.
    `rope`: the model's shared rotary module, or None; its tables come with each call (built once per forward).
    """

    def __init__(self, cfg: ModelConfig, last: bool, rope: nn.Module | None):
        super().__init__()
        dim, heads = cfg.dim, cfg.num_heads
        self.heads, self.head_dim, self.last, self.rope = heads, dim // heads, last, rope
        self.qk_dim = self.head_dim // 2 if cfg.qk_half_dim else self.head_dim
        self.kind, self.kv_merge, self.backend = cfg.attention, cfg.kv_merge_attn, cfg.attention_backend
        self.checkpoint_attn, self.checkpoint_mlp = cfg.checkpoint_attn, cfg.checkpoint_mlp
        # The source applies "an MLP then SiLU" to y once per block rather than a bare SiLU (Model Details 6).
        self.cond = nn.Linear(dim, dim)
        self.mod_x = Modulation(dim, 6)  # shift1, scale1, gate1, shift2, scale2, gate2
        self.mod_c = Modulation(dim, 2 if last else 6)
        # One fused projection per stream: [q, k, v] in a single matmul instead of three.
        qk = heads * self.qk_dim
        self.qkv_x = nn.Linear(dim, 2 * qk + dim)
        self.qkv_c = nn.Linear(dim, (1 if last else 2) * qk + dim)
        softmax = cfg.attention == "softmax"

        def qk_norm(present: bool = True) -> HeadRMSNorm | None:
            return HeadRMSNorm(self.qk_dim, eps=1e-6) if softmax and present else None

        self.q_norm_x, self.k_norm_x, self.q_norm_c, self.k_norm_c = qk_norm(), qk_norm(), qk_norm(not last), qk_norm()
        # Cosine attention: the learnable per-head exponent a of the length normaliser L^σ(a), σ(0.5) at the start.
        self.norm_const = None if softmax else nn.Parameter(torch.full((heads,), 0.5))
        self.out_x = nn.Linear(dim, dim)
        self.out_c = None if last else nn.Linear(dim, dim)
        self.mlp_x = make_mlp(cfg.mlp_type, dim, cfg.hidden_scale)
        self.mlp_c = None if last else make_mlp(cfg.mlp_type, dim, cfg.hidden_scale)

    def project(self, linear: nn.Linear, s: torch.Tensor, with_query: bool) -> list[torch.Tensor]:
        """[q,] k, v of one stream s (B, S, D): each (B, S, H, d) with d = Dqk for q/k and Dh for v."""
        dims = ([self.qk_dim] if with_query else []) + [self.qk_dim, self.head_dim]
        parts = linear(s).split([self.heads * d for d in dims], dim=-1)
        return [p.unflatten(-1, (self.heads, d)) for p, d in zip(parts, dims, strict=True)]

    @staticmethod
    def normed(norm: nn.Module | None, t: torch.Tensor) -> torch.Tensor:
        return t if norm is None else norm(t)

    def attend(self, x: torch.Tensor, c: torch.Tensor,
               rope_tables: Tables | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint attention of normed streams x (B, N, D) and c (B, L, D) -> outputs (B, N, D), (B, L, D) | None."""
        N = x.shape[1]
        q_x, k_x, v_x = self.project(self.qkv_x, x, with_query=True)  # (B, N, H, Dqk|Dh)
        q_x, k_x = self.normed(self.q_norm_x, q_x), self.normed(self.k_norm_x, k_x)
        if self.last:
            k_c, v_c = self.project(self.qkv_c, c, with_query=False)  # (B, L, H, Dqk|Dh)
            q_c = None
        else:
            q_c, k_c, v_c = self.project(self.qkv_c, c, with_query=True)
            q_c = self.normed(self.q_norm_c, q_c)
        k_c = self.normed(self.k_norm_c, k_c)
        # After the QK-norm, before anything is saved for backward: see to_autocast_dtype.
        q_x, k_x, v_x, k_c, v_c = to_autocast_dtype(q_x, k_x, v_x, k_c, v_c)
        if self.rope is not None:  # image tokens only: text has no position
            q_x, k_x = self.rope(q_x, rope_tables), self.rope(k_x, rope_tables)
        if self.kv_merge:
            k_x, v_x = merge_pairs(k_x, "image"), merge_pairs(v_x, "image")  # (B, N/2, H, d)
            k_c, v_c = merge_pairs(k_c, "text"), merge_pairs(v_c, "text")  # (B, L/2, H, d)
        q = q_x if q_c is None else torch.cat([q_x, *to_autocast_dtype(q_c)], dim=1)  # (B, Sq, H, Dqk)
        k = torch.cat([k_x, k_c], dim=1)  # (B, Sk, H, Dqk), Sk = N+L, halved by a kv merge
        v = torch.cat([v_x, v_c], dim=1)  # (B, Sk, H, Dh)
        out = attention(q, k, v, self.backend, self.kind, self.norm_const).flatten(2)  # (B, Sq, D)
        if self.last:
            return self.out_x(out), None
        return self.out_x(out[:, :N]), self.out_c(out[:, N:])  # (B, N, D), (B, L, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor,
                rope_tables: Tables | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) image, c (B, L, D) text, y (B, D) conditioning (fp32 unless the weights are not) -> updated
        (x, c); c is None after a `last` block."""
        mods = per_sample(lambda: self.modulations(y), x)  # (B, 1, D) each
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        mod_c = mods[6:]
        xn = adaptive_norm(x, shift1, scale1)  # (B, N, D)
        cn = adaptive_norm(c, mod_c[0], mod_c[1])  # (B, L, D)
        if self.checkpoint_attn and torch.is_grad_enabled():
            attn_x, attn_c = checkpoint(self.attend, xn, cn, rope_tables, use_reentrant=False)
        else:
            attn_x, attn_c = self.attend(xn, cn, rope_tables)
        # addcmul: the gated residual in one pass over memory instead of a multiply and an add.
        x = torch.addcmul(x, attn_x, gate1)  # (B, N, D)
        x = torch.addcmul(x, self.run_mlp(self.mlp_x, adaptive_norm(x, shift2, scale2)), gate2)
        if self.last:
            return x, None
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = mod_c  # (B, 1, D) each
        c = torch.addcmul(c, attn_c, c_gate1)  # (B, L, D)
        c = torch.addcmul(c, self.run_mlp(self.mlp_c, adaptive_norm(c, c_shift2, c_scale2)), c_gate2)
        return x, c

    def modulations(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Image-stream shift/scale/gate ×2, then the text stream's, each (B, 1, D), from y (B, D)."""
        cond = F.silu(self.cond(y))  # (B, D)
        return self.mod_x(cond) + self.mod_c(cond)

    def run_mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_mlp and torch.is_grad_enabled():
            return checkpoint(mlp, x, use_reentrant=False)
        return mlp(x)
