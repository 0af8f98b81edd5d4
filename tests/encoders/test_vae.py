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


# FLUX.1-schnell's vae/config.json (the encoder's shape; the weights do not matter for memory).
FLUX_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                   layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=FLUX_SCALE, shift_factor=FLUX_SHIFT)


def spy_encode(vae: LatentVAE, monkeypatch) -> list[int]:
    """Images per call of the wrapped AutoencoderKL.encode."""
    calls: list[int] = []
    real = vae.vae.encode

    def encode(x, *args, **kwargs):
        calls.append(len(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(vae.vae, "encode", encode)
    return calls


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 5])
def test_gpu_ready_vae_encode_never_exceeds_the_chunk(tiny_models, monkeypatch, micro_batch):
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", micro_batch=micro_batch)
    calls = spy_encode(vae, monkeypatch)
    vae.encode(torch.rand(5, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    assert max(calls) <= micro_batch and sum(calls) == 5


def test_gpu_ready_vae_chunk_from_the_memory_budget(tiny_models, monkeypatch):
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", memory_gb=0)
    per_image = vae.activation_bytes(32, 48)
    assert per_image == 5 * 8 * 32 * 48 * 4  # PEAK_ACTIVATIONS x block_out_channels[0] x H x W x fp32
    vae.memory_gb = 3.5 * per_image / 2**30
    assert vae.chunk_size(32, 48) == 3
    calls = spy_encode(vae, monkeypatch)
    vae.encode(torch.rand(7, 3, 32, 48) * 2 - 1)
    assert calls == [3, 3, 1]


@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_latents_equal_the_whole_batch_encode(tiny_models, channels_last):
    """Chunks + one noise draw per step == diffusers' encode + sample of the whole batch (the path before chunking)."""
    raw = AutoencoderKL.from_pretrained(str(tiny_models.root / "flux"), subfolder="vae").eval()
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", micro_batch=2,
                         channels_last=channels_last)
    images = torch.rand(5, 3, 32, 48) * 2 - 1
    with torch.inference_mode():
        z = raw.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(4))  # (5, 16, 4, 6)
    latents = vae.encode(images, torch.Generator().manual_seed(4))
    assert latents.is_contiguous()
    torch.testing.assert_close(latents, normalize(z, vae.shift, vae.scale), atol=1e-5, rtol=1e-5)


def test_flux_activation_estimate_matches_memtracker():
    """PEAK_ACTIVATIONS is what torch's MemTracker measures for the FLUX.1 encoder (fake tensors, bf16)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    torch.manual_seed(0)
    model = AutoencoderKL(**FLUX_CONFIG).to(torch.bfloat16).eval()
    model.decoder = None
    vae = LatentVAE(model, torch.device("cpu"), memory_gb=8.0)
    assert vae.activation_bytes(256, 256) == 80 * 2**20 and vae.activation_bytes(1024, 1024) == 1280 * 2**20
    assert [vae.chunk_size(r, r) for r in (256, 512, 1024)] == [102, 25, 6]
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, 128, 64, dtype=torch.bfloat16)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, torch.inference_mode():
            model.encode(x)
        peak = tracker.get_tracker_snapshot("peak")
    activations = sum(device[_MemRefType.ACT] for device in peak.values())
    assert activations == pytest.approx(2 * vae.activation_bytes(128, 64), rel=0.05)


def test_compile_wraps_the_encoder(tiny_models):
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", compile=True)
    assert isinstance(vae.vae.encoder, torch._dynamo.eval_frame.OptimizedModule)


def test_gpu_ready_uint8_images_give_the_float_paths_latents(vae):
    """The loader's uint8 images are scaled on the VAE's device by the same operations as to_unit_range."""
    from sd3.data.batches import to_channels_first, to_unit_range

    pixels = torch.randint(0, 256, (3, 32, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    images = to_channels_first(pixels.numpy())  # (3, 3, 32, 48) uint8
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 48)
    floats = to_unit_range(pixels.numpy())
    assert floats.min() == -1 and floats.max() == 1
    for a, b in zip(vae.moments(images), vae.moments(floats), strict=True):
        assert torch.equal(a, b)
