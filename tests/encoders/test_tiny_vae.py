"""The tiny VAE written by make-tiny really reconstructs the synthetic shapes (issue 7: PSNR >= 25 dB held out)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from sd3.encoders.tiny import TINY_VAE_CONFIG, TINY_VAE_WEIGHTS
from sd3.encoders.tiny_vae import psnr, shape_sets, train_tiny_vae
from sd3.encoders.vae import LatentVAE


def test_shipped_tiny_vae_reconstructs_heldout_shapes(tiny_models):
    assert TINY_VAE_WEIGHTS.is_file(), "sd3/assets/tiny_vae.safetensors is missing (see sd3/encoders/tiny_vae.py)"
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32")
    assert psnr(vae, shape_sets(96)) >= 25.0
    # Latents are normalised to about unit variance, as FLUX's shift/scale do for its VAE.
    latents = torch.cat([vae.encode(x, torch.Generator().manual_seed(0)).flatten() for x in shape_sets(32, seed=7)])
    assert abs(float(latents.mean())) < 0.2 and 0.7 < float(latents.std()) < 1.3


def test_training_improves_reconstruction(tmp_path):
    """The training loop itself (sampling, loss, optimizer, schedule), on a shallow /2 VAE that learns in a few steps;
    the real tiny VAE's training is what made the shipped weights checked above."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "block_out_channels": [8, 8],
                           "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2})
    vae.save_pretrained(tmp_path / "vae")
    heldout = shape_sets(16)
    before = psnr(LatentVAE.load(str(tmp_path), "vae", "cpu", "fp32"), heldout)
    train_tiny_vae(vae, steps=20, batch_size=8, lr=3e-3, eval_every=0)
    vae.save_pretrained(tmp_path / "vae")
    after = psnr(LatentVAE.load(str(tmp_path), "vae", "cpu", "fp32"), heldout)
    assert after > before + 1.0

