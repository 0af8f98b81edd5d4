"""The VAE wrapper: latent shapes, the (z - shift) * scale convention, the decoder-less loader copy."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from sd3.encoders.hub import EncoderLoadError
from sd3.encoders.tiny import TINY_VAE_CONFIG
from sd3.encoders.vae import LatentVAE, denormalize, normalize

FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611


@pytest.fixture(scope="module")
def vae(tiny_models) -> LatentVAE:
    return LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32")


def test_encode_decode_shapes(vae):
    images = torch.rand(3, 3, 64, 48) * 2 - 1
    latents = vae.encode(images, torch.Generator().manual_seed(0))
    assert latents.shape == (3, 16, 8, 6) and latents.dtype == torch.float32
    assert vae.decode(latents).shape == (3, 3, 64, 48)


def test_normalisation_pair_is_an_exact_inverse():
    z = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(denormalize(normalize(z, FLUX_SHIFT, FLUX_SCALE), FLUX_SHIFT, FLUX_SCALE), z,
                               rtol=0, atol=1e-12)
    assert torch.equal(normalize(torch.full((1,), FLUX_SHIFT), FLUX_SHIFT, FLUX_SCALE), torch.zeros(1))


def test_encode_applies_config_shift_and_scale(tmp_path):
    """encode = (posterior sample - shift) * scale with the VAE config's factors; decode undoes exactly that."""
    torch.manual_seed(0)
    raw = AutoencoderKL(**{**TINY_VAE_CONFIG, "shift_factor": FLUX_SHIFT, "scaling_factor": FLUX_SCALE})
    raw.save_pretrained(tmp_path / "vae")
    vae = LatentVAE.load(str(tmp_path), "vae", "cpu", "fp32")
    assert (vae.shift, vae.scale) == (FLUX_SHIFT, FLUX_SCALE)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = vae.encode(images, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        z = raw.encode(images).latent_dist.sample(torch.Generator().manual_seed(1))
        expected_images = raw.decode(z).sample
    torch.testing.assert_close(latents, (z - FLUX_SHIFT) * FLUX_SCALE)
    torch.testing.assert_close(vae.decode(latents), expected_images, atol=1e-5, rtol=1e-5)


def test_missing_shift_factor_means_zero(tmp_path):
    AutoencoderKL(**{**TINY_VAE_CONFIG, "scaling_factor": 0.5}).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["shift_factor"] = None  # as in SD/SDXL VAEs
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    assert LatentVAE.load(str(tmp_path), "vae", "cpu", "fp32").shift == 0.0


def test_loader_copy_has_no_decoder(tiny_models, vae):
    encoder_only = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", with_decoder=False)
    assert encoder_only.vae.decoder is None and not encoder_only.has_decoder
    params = sum(p.numel() for p in encoder_only.vae.parameters())
    assert params < sum(p.numel() for p in vae.vae.parameters()) // 2 + 1
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(encoder_only.encode(images, torch.Generator().manual_seed(0)),
                               vae.encode(images, torch.Generator().manual_seed(0)))
    with pytest.raises(EncoderLoadError, match="with_decoder=False"):
        encoder_only.decode(torch.zeros(1, 16, 4, 4))


def test_same_generator_same_latents(vae):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a = vae.encode(images, torch.Generator().manual_seed(5))
    b = vae.encode(images, torch.Generator().manual_seed(5))
    c = vae.encode(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
