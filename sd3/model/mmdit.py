"""The MMDiT of Stable Diffusion 3 with the source's changes (ARCHITECTURE §2, source README "Model Details").

A pure nn.Module: no I/O, no distributed code, no sampling. Shapes: B batch, C latent channels, h×w latent grid,
p patch, N = (h/p)(w/p) image tokens, T tokens per text part, L = 2T text tokens, D width, H heads, Dh = D/H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from sd3.config import ModelConfig
from sd3.model.attention import check_backend, resolve_backend
from sd3.model.block import JointBlock, per_sample
from sd3.model.layers import Modulation, PatchEmbedding, TextPartEmbedding, adaptive_norm, make_time_embedding
from sd3.model.rope import make_rope, sincos_2d


class MMDiT(nn.Module, PyTorchModelHubMixin, library_name="sd3"):
    """The SD3-style multimodal diffusion transformer.

    forward(x, t, context, pooled) -> velocity:
      x (B, C, h, w) noisy latents; t (B,) in [0, 1], 1 = pure noise; context (B, 2T, max(text_dims)) with the
      Gemma part in tokens [0, T) (real width text_dims[0]) and the ModernBERT part in [T, 2T) (real width
      text_dims[1], zero-padded); pooled (B, pooled_dim). Returns (B, C, h, w); with `return_text=True` (a model
      with `text_loss`) also the text head's prediction of the context, (B, 2T, context_dim).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # From the hub mixin's from_pretrained, cfg is the ModelConfig as config.json holds it: a dict.
        cfg = ModelConfig(**cfg) if isinstance(cfg, dict) else cfg
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"model.dim {cfg.dim} is not divisible by model.num_heads {cfg.num_heads}")
        if len(cfg.text_dims) != 2:
            raise ValueError(f"model.text_dims must list two widths [gemma, bert], got {cfg.text_dims}")
        head_dim = cfg.dim // cfg.num_heads
        if cfg.qk_half_dim and head_dim % 2:
            raise ValueError(f"model.qk_half_dim needs an even head dim, got {head_dim} (model.dim / model.num_heads)")
        qk_dim = head_dim // 2 if cfg.qk_half_dim else head_dim
        check_backend(cfg.attention_backend, cfg.attention, qk_dim, head_dim)
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        self.position_scale = cfg.max_res / cfg.max_res_orig
        self.time_embed = make_time_embedding(cfg.time_embedding, dim)
        self.pooled_embed = nn.Linear(cfg.pooled_dim, dim)
        self.text_embed = nn.ModuleList(TextPartEmbedding(d, dim, cfg.text_scale_init) for d in cfg.text_dims)
        self.patch_embed = PatchEmbedding(cfg.in_channels, p, dim)
        # One rotary module shared by all blocks; its tables are built once per forward (see rope.py).
        rope_scale = self.position_scale if cfg.rope_interpolate else 1.0
        self.rope = make_rope(cfg.positional_encoding, qk_dim, rope_scale)
        # With a text head every block keeps its text path: the head reads the last block's text stream (§e).
        self.blocks = nn.ModuleList(
            JointBlock(cfg, last=i == cfg.num_blocks - 1 and not cfg.text_loss, rope=self.rope)
            for i in range(cfg.num_blocks)
        )
        # The source's final layer takes shift/scale straight from y; ours first applies SiLU(Linear(y)).
        self.head_cond = None if cfg.head_modulation == "seed" else nn.Linear(dim, dim)
        self.head_mod = Modulation(dim, 2)
        self.head = nn.Linear(dim, cfg.in_channels * p * p)
        self.text_head = nn.Linear(dim, cfg.context_dim) if cfg.text_loss else None
        self.initialize_weights()

    @property
    def attention_backend(self) -> str:
        """The attention backend this model runs with on its current device and dtype."""
        probe = next(self.parameters())
        block = self.blocks[0]
        if block.kind == "cosine":
            return "cosine"
        q = torch.empty(0, block.qk_dim, device=probe.device, dtype=probe.dtype)
        return resolve_backend(self.cfg.attention_backend, q, block.head_dim)

    def initialize_weights(self) -> None:
        """DiT's initialisation (Peebles & Xie 2023, "adaLN-Zero").

        Every modulation layer and the output projections start at zero, so each block's gates are 0 (the block is
        the identity) and the model outputs exactly 0: training starts from a network whose residual stream is a
        clean copy of the embeddings and whose prediction is the mean velocity, which DiT found the most stable.
        Gradients first reach the output layer, then the modulations, then the blocks, within a few steps.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        conv = self.patch_embed.conv
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))  # as a linear layer over the patch
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.time_embed.proj.weight, std=0.02)
        nn.init.normal_(self.pooled_embed.weight, std=0.02)
        zeroed = [self.head_mod.linear, self.head] + [self.text_head] * (self.text_head is not None)
        for block in self.blocks:
            zeroed += [block.mod_x.linear, block.mod_c.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def head_input(self, y: torch.Tensor) -> torch.Tensor:
        """What the final norm's modulation reads: SiLU(head_cond(y)), or y itself (`head_modulation = "seed"`)."""
        return y if self.head_cond is None else F.silu(self.head_cond(y))

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
            raise ValueError(f"context must be (B, 2*text_tokens, context_dim) = ({B}, {2 * T}, {cfg.context_dim}), "
                             f"got {tuple(context.shape)}")
        if pooled.shape != (B, cfg.pooled_dim):
            raise ValueError(f"pooled must be ({B}, {cfg.pooled_dim}), got {tuple(pooled.shape)}")
        if t.shape != (B,):
            raise ValueError(f"t must be ({B},), got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                return_text: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.check_inputs(x, t, context, pooled)
        if return_text and self.text_head is None:
            raise ValueError("return_text=True needs a model built with model.text_loss = true")
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
        pooled = pooled.to(self.pooled_embed.weight.dtype)
        y = per_sample(lambda: self.time_embed(t) + self.pooled_embed(pooled), x, cast=False)  # (B, D)
        # Built here, outside the blocks, so nothing is cached inside a checkpointed or compiled region.
        rope_tables = self.rope.tables(hp, wp) if self.rope is not None else None  # fp32, (N, 1, ·)
        for block in self.blocks:
            img, txt = block(img, txt, y, rope_tables)
        shift, scale = per_sample(lambda: self.head_mod(self.head_input(y)), x)  # (B, 1, D) each
        out = self.head(adaptive_norm(img, shift, scale))  # (B, N, p·p·C)
        out = out.view(B, hp, wp, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, hp, p, wp, p)
        out = out.reshape(B, C, h, w)
        if not return_text:
            return out
        return out, self.text_head(txt)  # (B, C, h, w), (B, 2T, context_dim)
