"""The MMDiT of Stable Diffusion 3 with the source's changes (ARCHITECTURE §2, source README "Model Details").

A pure nn.Module: no I/O, no distributed code, no sampling. Shapes: B batch, C latent channels, h×w latent grid,
p patch, N = (h/p)(w/p) image tokens, T tokens per text part, L = 2T text tokens, D width, H heads, Dh = D/H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd3.config import ModelConfig
from sd3.model.attention import attention, check_backend, resolve_backend
from sd3.model.layers import (
    HeadRMSNorm,
    Modulation,
    PatchEmbedding,
    TextPartEmbedding,
    TimestepEmbedding,
    adaptive_norm,
    make_mlp,
)
from sd3.model.rope import Rope2d, sincos_2d

POSITIONAL_ENCODINGS = ("RoPE2d", "absolute", "NoPE")


def per_sample(fn, like: torch.Tensor, cast: bool = True):
    """Run a conditioning computation on (B, D) vectors in fp32 with autocast off, and hand back its outputs in the
    autocast dtype (or fp32 when `cast` is False). These layers (time, pooled, modulation: ~30% of the weights) see one row per sample, so their
    matmuls cost nothing, while autocast would copy each of their weight matrices to bf16 on every step and their
    gradients back to fp32 — the dominant cost of these layers on a CPU."""
    device = like.device.type
    with torch.autocast(device, enabled=False):
        out = fn()
    if cast and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(o.to(dtype) for o in out) if isinstance(out, tuple) else out.to(dtype)
    return out


class JointBlock(nn.Module):
    """One MMDiT block: adaptive norms from y' = SiLU(Linear(y)), joint attention over [image, text] with per-stream
    projections and per-head QK RMSNorm, then gated residuals `x = x + attn·gate1; x = x + MLP(norm2(x))·gate2`.

    The last block (`last=True`) has no text output path: text only supplies keys and values, so it has no text
    query, no text out-projection, no text MLP and only shift/scale for its text norm.
    """

    def __init__(self, cfg: ModelConfig, last: bool, rope: Rope2d | None):
        super().__init__()
        dim, heads = cfg.dim, cfg.num_heads
        self.heads, self.head_dim, self.last, self.rope = heads, dim // heads, last, rope
        self.backend = cfg.attention_backend
        self.checkpoint_attn, self.checkpoint_mlp = cfg.checkpoint_attn, cfg.checkpoint_mlp
        # The source applies "an MLP then SiLU" to y once per block rather than a bare SiLU (Model Details 6).
        self.cond = nn.Linear(dim, dim)
        self.mod_x = Modulation(dim, 6)  # shift1, scale1, gate1, shift2, scale2, gate2
        self.mod_c = Modulation(dim, 2 if last else 6)
        # One fused projection per stream: a single (D, 3D) matmul instead of three (D, D) ones.
        self.qkv_x = nn.Linear(dim, 3 * dim)
        self.qkv_c = nn.Linear(dim, (2 if last else 3) * dim)
        self.q_norm_x = HeadRMSNorm(self.head_dim, eps=1e-6)
        self.k_norm_x = HeadRMSNorm(self.head_dim, eps=1e-6)
        self.q_norm_c = None if last else HeadRMSNorm(self.head_dim, eps=1e-6)
        self.k_norm_c = HeadRMSNorm(self.head_dim, eps=1e-6)
        self.out_x = nn.Linear(dim, dim)
        self.out_c = None if last else nn.Linear(dim, dim)
        self.mlp_x = make_mlp(cfg.mlp_type, dim, cfg.hidden_scale)
        self.mlp_c = None if last else make_mlp(cfg.mlp_type, dim, cfg.hidden_scale)

    def attend(self, x: torch.Tensor, c: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint attention of normed streams x (B, N, D) and c (B, L, D) -> per-stream outputs (B, N, D), (B, L, D)|None."""
        B, N, D = x.shape
        L = c.shape[1]
        q_x, k_x, v_x = self.qkv_x(x).view(B, N, 3, self.heads, self.head_dim).unbind(2)  # (B, N, H, Dh) each
        q_x, k_x = self.q_norm_x(q_x), self.k_norm_x(k_x)
        if self.rope is not None:  # image tokens only: text has no position
            q_x, k_x = self.rope(q_x, h, w), self.rope(k_x, h, w)
        if self.last:
            k_c, v_c = self.qkv_c(c).view(B, L, 2, self.heads, self.head_dim).unbind(2)  # (B, L, H, Dh) each
            q = q_x  # (B, N, H, Dh): only image tokens ask
        else:
            q_c, k_c, v_c = self.qkv_c(c).view(B, L, 3, self.heads, self.head_dim).unbind(2)  # (B, L, H, Dh) each
            q = torch.cat([q_x, self.q_norm_c(q_c).to(q_x.dtype)], dim=1)  # (B, N+L, H, Dh)
        k = torch.cat([k_x, self.k_norm_c(k_c).to(k_x.dtype)], dim=1)  # (B, N+L, H, Dh)
        v = torch.cat([v_x, v_c], dim=1)  # (B, N+L, H, Dh)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), self.backend).flatten(2)  # (B, Sq, D)
        if self.last:
            return self.out_x(out), None
        return self.out_x(out[:, :N]), self.out_c(out[:, N:])  # (B, N, D), (B, L, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) image, c (B, L, D) text, y (B, D) conditioning (fp32 unless the weights are not) -> updated (x, c); c is None after the last block."""
        mods = per_sample(lambda: self.modulations(y), x)  # (B, 1, D) each
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        mod_c = mods[6:]
        xn = adaptive_norm(x, shift1, scale1)  # (B, N, D)
        cn = adaptive_norm(c, mod_c[0], mod_c[1])  # (B, L, D)
        if self.checkpoint_attn and torch.is_grad_enabled():
            attn_x, attn_c = checkpoint(self.attend, xn, cn, h, w, use_reentrant=False)
        else:
            attn_x, attn_c = self.attend(xn, cn, h, w)
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


class MMDiT(nn.Module, PyTorchModelHubMixin, library_name="sd3"):
    """The SD3-style multimodal diffusion transformer.

    forward(x, t, context, pooled) -> velocity:
      x (B, C, h, w) noisy latents; t (B,) in [0, 1], 1 = pure noise; context (B, 2T, max(text_dims)) with the
      Gemma part in tokens [0, T) (real width text_dims[0]) and the ModernBERT part in [T, 2T) (real width
      text_dims[1], zero-padded); pooled (B, pooled_dim). Returns (B, C, h, w).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # From the hub mixin's from_pretrained, cfg is the ModelConfig as config.json holds it: a dict.
        cfg = ModelConfig(**cfg) if isinstance(cfg, dict) else cfg
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"model.dim {cfg.dim} is not divisible by model.num_heads {cfg.num_heads}")
        if cfg.positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(f"model.positional_encoding '{cfg.positional_encoding}' is not one of {', '.join(POSITIONAL_ENCODINGS)}")
        if len(cfg.text_dims) != 2:
            raise ValueError(f"model.text_dims must list two widths [gemma, bert], got {cfg.text_dims}")
        check_backend(cfg.attention_backend)
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.position_scale = cfg.max_res / cfg.max_res_orig
        self.time_embed = TimestepEmbedding(dim)
        self.pooled_embed = nn.Linear(cfg.pooled_dim, dim)
        self.text_embed = nn.ModuleList(TextPartEmbedding(d, dim, cfg.text_scale_init) for d in cfg.text_dims)
        self.patch_embed = PatchEmbedding(cfg.in_channels, p, dim)
        # One RoPE module shared by all blocks so the cos/sin tables are built once per grid size.
        rope = Rope2d(dim // cfg.num_heads, self.position_scale) if cfg.positional_encoding == "RoPE2d" else None
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.num_blocks - 1, rope=rope) for i in range(cfg.num_blocks))
        self.head_cond = nn.Linear(dim, dim)
        self.head_mod = Modulation(dim, 2)
        self.head = nn.Linear(dim, cfg.in_channels * p * p)
        self.initialize_weights()

    @property
    def attention_backend(self) -> str:
        """The attention backend this model runs with on its current device and dtype."""
        probe = next(self.parameters())
        return resolve_backend(self.cfg.attention_backend, torch.empty(0, device=probe.device, dtype=probe.dtype))

    def initialize_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, "adaLN-Zero").

        Every modulation layer and the output projection start at zero, so each block's gates are 0 (the block is
        the identity) and the model outputs exactly 0: training starts from a network whose residual stream is a
        clean copy of the embeddings and whose prediction is the mean velocity, which DiT found the most stable.
        Gradients first reach the output layer, then the modulations, then the blocks, within a few steps.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.patch_embed.conv
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))  # as a linear layer over the patch
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.time_embed.proj.weight, std=0.02)
        nn.init.normal_(self.pooled_embed.weight, std=0.02)
        for block in self.blocks:
            for mod in (block.mod_x, block.mod_c):
                nn.init.zeros_(mod.linear.weight)
                nn.init.zeros_(mod.linear.bias)
        nn.init.zeros_(self.head_mod.linear.weight)
        nn.init.zeros_(self.head_mod.linear.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        multiple = cfg.patch_size * cfg.vae_downsample  # 16 px: one patch of latents
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % cfg.patch_size:
                raise ValueError(
                    f"{name} {size * cfg.vae_downsample} px (latent {size}) is not a multiple of {multiple} px"
                )
        B, T = x.shape[0], cfg.text_tokens
        if context.shape != (B, 2 * T, cfg.context_dim):
            raise ValueError(f"context must be (B, 2*text_tokens, context_dim) = ({B}, {2 * T}, {cfg.context_dim}), got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({B}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        if t.shape != (B,):
            raise ValueError(f"t must be ({B},), got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, t, context, pooled)
        cfg, p = self.cfg, self.cfg.patch_size
        B, C, h, w = x.shape
        hp, wp = h // p, w // p
        img = self.patch_embed(x)  # (B, N, D)
        if cfg.positional_encoding == "absolute":
            img = img + sincos_2d(hp, wp, cfg.dim, self.position_scale, img.device).to(img.dtype)  # (B, N, D)
        T, (d_gemma, d_bert) = cfg.text_tokens, cfg.text_dims
        txt = torch.cat(
            [self.text_embed[0](context[:, :T, :d_gemma]), self.text_embed[1](context[:, T:, :d_bert])], dim=1
        )  # (B, 2T, D): the padding columns of the narrower part are sliced off, not projected
        y = per_sample(lambda: self.time_embed(t) + self.pooled_embed(pooled.to(self.pooled_embed.weight.dtype)), x, cast=False)  # (B, D)
        for block in self.blocks:
            img, txt = block(img, txt, y, hp, wp)
        shift, scale = per_sample(lambda: self.head_mod(F.silu(self.head_cond(y))), x)  # (B, 1, D) each
        out = self.head(adaptive_norm(img, shift, scale))  # (B, N, p·p·C)
        out = out.view(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, hp, p, wp, p)
        return out.reshape(B, C, h, w)
