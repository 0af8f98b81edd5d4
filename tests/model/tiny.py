"""A tiny MMDiT config shared by the model tests: every code path of the 1.2B model at a few thousand parameters."""

import torch

from sd3.config import ModelConfig


def tiny_config(**changes) -> ModelConfig:
    cfg = ModelConfig(
        in_channels=4, num_blocks=3, dim=32, num_heads=4, hidden_scale=2.0, text_tokens=5,
        text_dims=[12, 8], pooled_dim=6, max_res=64, max_res_orig=64,
    )
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def make_inputs(cfg: ModelConfig, batch: int, h: int, w: int, seed: int = 0):
    """Latents (B, C, h, w), t (B,), context (B, 2T, D) with the BERT part zero-padded, pooled (B, P)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g)
    context = torch.randn(batch, 2 * cfg.text_tokens, cfg.context_dim, generator=g)
    context[:, cfg.text_tokens :, cfg.text_dims[1] :] = 0
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return x, t, context, pooled

