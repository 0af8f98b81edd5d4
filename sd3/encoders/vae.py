"""The frozen VAE (diffusers AutoencoderKL; FLUX.1's by default: 16 channels, /8) and the latent normalisation.

Latents follow the diffusers convention: encode = a sample of the posterior, then (z - shift) * scale; decode =
z / scale + shift, then the decoder. shift/scale come from the VAE's config (FLUX.1: 0.1159 / 0.3611; a VAE without a
shift_factor uses 0). Loader ranks load it without the decoder, which they never run.

Encoding is split in two so that hybrid mode can skip the encoder: `moments` runs the encoder over a step's images in
micro-batches (at most `chunk_size(H, W)` images per `vae.encode` call, channels_last, in the VAE's dtype) and returns
the posterior's mean and std; `sample` draws the latents from them with the step's generator, once for the whole
step, exactly as diffusers' DiagonalGaussianDistribution.sample does. The chunking therefore changes no random draw.

Memory: the encoder's peak is PEAK_ACTIVATIONS tensors of block_out_channels[0] x H x W (its full-resolution ResNet
blocks; measured with torch's MemTracker under FakeTensorMode on the FLUX.1 config, bf16: 80 / 320 / 1280 MiB per
image at 256 / 512 / 1024 px, linear in the batch). The default budget (encoders.vae_memory_gb = 8) gives 102 / 25 / 6
images per call; the source's unchunked 420 images at 256 px needed ~34 GB.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from sd3.devices import resolve_device
from sd3.encoders.hub import EncoderLoadError, load_pretrained, resolve_dtype

PEAK_ACTIVATIONS = 5  # full-resolution activations alive at once at the encoder's peak (MemTracker, see above)


def normalize(z: torch.Tensor, shift: float, scale: float, mode: str = "diffusers") -> torch.Tensor:
    """`encoders.latent_norm`: diffusers' (z - shift)·scale, or the source's z·scale + shift ("seed", which a
    checkpoint converted by `sd3 import-seed` was trained on)."""
    return z * scale + shift if mode == "seed" else (z - shift) * scale


def denormalize(latents: torch.Tensor, shift: float, scale: float, mode: str = "diffusers") -> torch.Tensor:
    return (latents - shift) / scale if mode == "seed" else latents / scale + shift


class LatentVAE:
    """A frozen AutoencoderKL on `device` in `dtype`. Images are (B, 3, H, W) in [-1, 1]; latents (B, C, H/8, W/8).

    micro_batch: images per encoder call (0 = as many as fit in memory_gb by `activation_bytes`; memory_gb 0 too =
    the whole batch); channels_last: NHWC weights and inputs; compile: torch.compile the encoder (dynamic shapes,
    so every bucket shares one graph); latent_norm: "diffusers" (z − shift)·scale, or "seed", the source's
    z·scale + shift (see normalize).
    """

    def __init__(self, vae: AutoencoderKL, device: torch.device, micro_batch: int = 0, memory_gb: float = 0.0,
                 channels_last: bool = False, compile: bool = False, latent_norm: str = "diffusers") -> None:
        if channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        if compile:
            vae.encoder = torch.compile(vae.encoder, dynamic=True)
        self.vae = vae
        self.latent_norm = latent_norm
        self.device = device
        self.micro_batch, self.memory_gb, self.channels_last = micro_batch, memory_gb, channels_last
        self.dtype = vae.dtype
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, path: str, subfolder: str = "vae", device: torch.device | str = "auto", dtype: str = "bf16",
             with_decoder: bool = True, latent_norm: str = "diffusers", **options) -> LatentVAE:
        """options: LatentVAE's micro_batch / memory_gb / channels_last / compile."""
        device = resolve_device(device)
        vae = load_pretrained(AutoencoderKL.from_pretrained, "encoders.vae", path,
                              subfolder=subfolder or None, torch_dtype=resolve_dtype(dtype))
        if not with_decoder:
            # Loader ranks only encode: dropping the decoder frees about half of the VAE's memory.
            vae.decoder = None
            vae.post_quant_conv = None
        vae.requires_grad_(False)
        return cls(vae.eval().to(device), device, latent_norm=latent_norm, **options)

    @property
    def has_decoder(self) -> bool:
        return self.vae.decoder is not None

    def activation_bytes(self, height: int, width: int) -> int:
        """Peak activation bytes of encoding one (3, height, width) image."""
        first = int(self.vae.config.block_out_channels[0])
        return PEAK_ACTIVATIONS * first * height * width * self.dtype.itemsize

    def chunk_size(self, height: int, width: int) -> int:
        """Images per encoder call at this resolution (0 = no bound)."""
        if self.micro_batch > 0:
            return self.micro_batch
        if self.memory_gb <= 0:
            return 0
        return max(1, int(self.memory_gb * 2**30) // self.activation_bytes(height, width))

    @torch.inference_mode()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), uint8 in [0, 255] or float in [-1, 1] -> the posterior's mean and std, each
        (B, C, H/8, W/8) in the VAE's dtype.

        uint8 images (the loader's, pinned on CUDA) cross to the device as they are, a quarter of float32's bytes,
        asynchronously from pinned memory, and are scaled there, by the same operations as
        sd3/data/batches.py:to_unit_range, so both inputs give the same latents.
        """
        size = self.chunk_size(images.shape[-2], images.shape[-1]) or max(1, len(images))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        means, stds = [], []
        for chunk in images.split(size):
            x = chunk.to(self.device, non_blocking=True)  # (b, 3, H, W)
            if x.dtype == torch.uint8:
                x = x.float().div_(127.5).sub_(1.0)  # exact at 0 and 255: the range is exactly [-1, 1]
            x = x.to(self.dtype).contiguous(memory_format=fmt)
            posterior = self.vae.encode(x).latent_dist
            means.append(posterior.mean)  # (b, C, h, w)
            stds.append(posterior.std)
        return torch.cat(means).contiguous(), torch.cat(stds).contiguous()  # (B, C, h, w) x 2

    def sample(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, normalised: (B, C, h, w) float32. One draw for the whole batch, as diffusers'
        DiagonalGaussianDistribution.sample, so the latents do not depend on how the encoder was chunked."""
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)  # (B, C, h, w)
        return normalize((mean + std * noise).float(), self.shift, self.scale, self.latent_norm)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/8, W/8), float32."""
        return self.sample(*self.moments(images), generator)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w), float32, nominally in [-1, 1] (not clamped)."""
        if not self.has_decoder:
            raise EncoderLoadError("this VAE was loaded with with_decoder=False (a loader rank's); it cannot decode")
        z = denormalize(latents.to(self.device).float(), self.shift, self.scale, self.latent_norm)
        return self.vae.decode(z.to(self.dtype)).sample.float()  # (B, 3, 8h, 8w)
