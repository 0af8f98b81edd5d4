"""The frozen VAE (diffusers AutoencoderKL; FLUX.1's by default: 16 channels, /8) and the latent normalisation.

Latents follow the diffusers convention: encode = a sample of the posterior, then (z - shift) * scale; decode =
z / scale + shift, then the decoder. shift/scale come from the VAE's config (FLUX.1: 0.1159 / 0.3611; a VAE without a
shift_factor uses 0). Loader ranks load it without the decoder, which they never run.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from sd3.devices import resolve_device
from sd3.encoders.hub import EncoderLoadError, load_pretrained, resolve_dtype


def normalize(z: torch.Tensor, shift: float, scale: float, mode: str = "diffusers") -> torch.Tensor:
    """`encoders.latent_norm`: diffusers' (z - shift)·scale, or the source's z·scale + shift ("seed", which a
    checkpoint converted by `sd3 import-seed` was trained on)."""
    return z * scale + shift if mode == "seed" else (z - shift) * scale


def denormalize(latents: torch.Tensor, shift: float, scale: float, mode: str = "diffusers") -> torch.Tensor:
    return (latents - shift) / scale if mode == "seed" else latents / scale + shift


class LatentVAE:
    """A frozen AutoencoderKL on `device` in `dtype`. Images are (B, 3, H, W) in [-1, 1]; latents (B, C, H/8, W/8)."""

    def __init__(self, vae: AutoencoderKL, device: torch.device, latent_norm: str = "diffusers") -> None:
        self.vae = vae
        self.latent_norm = latent_norm
        self.device = device
        self.dtype = vae.dtype
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, path: str, subfolder: str = "vae", device: torch.device | str = "auto", dtype: str = "bf16",
             with_decoder: bool = True, latent_norm: str = "diffusers") -> LatentVAE:
        device = resolve_device(device)
        vae = load_pretrained(AutoencoderKL.from_pretrained, "encoders.vae", path,
                              subfolder=subfolder or None, torch_dtype=resolve_dtype(dtype))
        if not with_decoder:
            # Loader ranks only encode: dropping the decoder frees about half of the VAE's memory.
            vae.decoder = None
            vae.post_quant_conv = None
        vae.requires_grad_(False)
        return cls(vae.eval().to(device), device, latent_norm)

    @property
    def has_decoder(self) -> bool:
        return self.vae.decoder is not None

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8), float32."""
        x = images.to(device=self.device, dtype=self.dtype)
        z = self.vae.encode(x).latent_dist.sample(generator=generator)  # (B, C, H/8, W/8)
        return normalize(z.float(), self.shift, self.scale, self.latent_norm)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w), float32, nominally in [-1, 1] (not clamped)."""
        if not self.has_decoder:
            raise EncoderLoadError("this VAE was loaded with with_decoder=False (a loader rank's); it cannot decode")
        z = denormalize(latents.to(self.device).float(), self.shift, self.scale, self.latent_norm)
        return self.vae.decode(z.to(self.dtype)).sample.float()  # (B, 3, 8h, 8w)
