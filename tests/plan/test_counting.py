"""FLOP counts of the real architectures on meta tensors: the shipped configs build, and the counts are right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sd3.config_loader import load_config
from sd3.model.flops import train_flops_per_image
from sd3.plan.counting import count, mmdit_flops, part_flops
from sd3.plan.encoders import FILES, PARTS, TEXT_CLASSES, load_spec, text_config, vae_kwargs


@pytest.mark.parametrize("part", PARTS)
def test_shipped_config_builds_with_the_library_class(part):
    spec = load_spec(part)
    assert spec.part == part and "/" in spec.hub_id and spec.file.endswith("config.json")
    if part == "vae":
        from diffusers import AutoencoderKL

        config = AutoencoderKL.from_config(vae_kwargs()).config
        assert spec.class_name == "AutoencoderKL" and config.latent_channels == 16
        assert len(config.block_out_channels) - 1 == 3  # /8, as model.vae_downsample
        return
    config = text_config(part)
    assert type(config).__name__ == spec.class_name == TEXT_CLASSES[part][0].__name__
    # The values the FLOPs depend on reach the config object.
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(config, key) == spec.values[key], (FILES[part], key)


def test_cpu_sdpa_is_counted():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)  # (B, H, S, Dh)
    forward = count(lambda: F.scaled_dot_product_attention(q, q, q))
    assert forward == 2 * 2 * 16 * 16 * 8 * 2  # QK^T and A·V, 2 FLOPs per multiply-add
    # torch's backward formula: 5 matmuls (QK^T recomputed, dV, dP, dQ, dK) against the forward's 2.
    assert count(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == forward * 7 // 2


@pytest.mark.parametrize("preset,res", [("sd3-1b-256", 256), ("sd3-1b-512", 512)])
def test_mmdit_count_agrees_with_the_closed_form(preset, res):
    cfg = load_config(preset).model
    flops = mmdit_flops(cfg, res, res)
    estimate = train_flops_per_image(cfg, res, res)
    assert abs(flops.model - estimate) / estimate < 0.03
    # Checkpointing attention and MLP recomputes (nearly) the whole forward: executed ~ 4/3 of model FLOPs.
    assert 1.2 < flops.executed / flops.model < 4 / 3 + 0.01


def test_mmdit_without_checkpointing_executes_its_model_flops():
    cfg = load_config("tiny-cpu").model
    flops = mmdit_flops(cfg, 64, 64)
    assert flops.executed == flops.model > 0


def test_real_encoder_counts_match_their_parameter_counts():
    # A transformer's forward is ~2 FLOPs per weight per token (plus attention): Gemma-2-2B has 2.0B non-embedding
    # weights -> ~308 GFLOP at 77 tokens; ModernBERT-large 0.35B -> ~53 GFLOP.
    gemma, bert = part_flops("gemma", 77, 0, 0), part_flops("bert", 77, 0, 0)
    assert 300e9 < gemma < 330e9
    assert 50e9 < bert < 57e9
    assert part_flops("clip", 77, 0, 0) == pytest.approx(13.3e9, rel=0.02)
    vae_256, vae_512 = part_flops("vae", 0, 256, 256), part_flops("vae", 0, 512, 512)
    assert vae_256 == pytest.approx(273e9, rel=0.02)
    assert 4 < vae_512 / vae_256 < 4.2  # convolutions scale with pixels, the mid-block attention a little faster
