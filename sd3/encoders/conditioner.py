"""Decoded images + captions -> the Batch a model rank consumes (run on a loader rank, or in-process when colocated)."""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

import numpy as np
import torch

from sd3.batch import Batch
from sd3.config import Config
from sd3.devices import resolve_device
from sd3.encoders.hub import EncoderLoadError, resolve_dtype
from sd3.encoders.text import TextEncoders
from sd3.encoders.timing import timed
from sd3.encoders.vae import LatentVAE

if TYPE_CHECKING:
    from sd3.data.batches import RawBatch

PARTS = ("gemma", "bert", "clip", "vae")  # keys of Conditioner.timings


class Conditioner:
    """Runs the frozen text encoders and the VAE encoder on `device` (a torch.device, or "auto"/"cpu"/"cuda").

    Text encoders run in length-sorted micro-batches (encoders.trim_text), the VAE in chunks bounded by
    encoders.vae_micro_batch / vae_memory_gb; no per-sample loops. `timings` holds the cumulative seconds spent per
    part (PARTS); image decoding is timed by the RowLoader. Output floats are in cfg.encoders.batch_dtype.
    `peak_memory_bytes` is the peak of the last call: torch.cuda.max_memory_allocated over the call on CUDA; on
    CPU the process's peak RSS so far (getrusage ru_maxrss: the OS keeps no per-step peak), see `memory_source`.
    """

    def __init__(self, cfg: Config, device: torch.device | str = "auto") -> None:
        self.device = resolve_device(device)
        enc = cfg.encoders
        if self.device.type == "cpu" and enc.cpu_threads > 0:
            torch.set_num_threads(enc.cpu_threads)
        self.text = TextEncoders.load(enc, cfg.model.text_tokens, self.device)
        self.vae = LatentVAE.load(enc.vae, enc.vae_subfolder, self.device, enc.vae_dtype, with_decoder=False,
                                  micro_batch=enc.vae_micro_batch, memory_gb=enc.vae_memory_gb,
                                  channels_last=enc.vae_channels_last, compile=enc.vae_compile,
                                  latent_norm=enc.latent_norm)
        self.batch_dtype = resolve_dtype(enc.batch_dtype)
        self.timings: dict[str, float] = {part: 0.0 for part in PARTS}
        self.peak_memory_bytes = 0
        self.memory_source = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_max_rss"
        check_dims(cfg, self.text, self.vae)

    @torch.inference_mode()
    def __call__(self, raw: RawBatch, generator: torch.Generator | None = None) -> Batch:
        """raw.images (B, 3, H, W) uint8 or in [-1, 1], raw.captions (B,) -> Batch on this conditioner's device.

        generator: draws the VAE posterior samples (pass the sampler's per-step generator for a replayable stream).
        A batch whose rows were all skipped (B = 0) gives an empty Batch of the same trailing shapes.
        """
        if len(raw.captions) == 0:
            return self.empty(raw.images.shape[-2], raw.images.shape[-1])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        context, pooled = self.text.encode(list(raw.captions), self.timings)  # (B, 2T, D), (B, P)
        with timed(self.timings, "vae", self.device):
            if raw.posterior is not None:  # data.latent_cache: the posterior was computed once, draw from it
                mean, std = raw.posterior.to(self.device, self.vae.dtype).unbind(1)  # (B, C, h, w) x 2
                latents = self.vae.sample(mean, std, generator)  # (B, C, H/8, W/8)
            else:
                latents = self.vae.encode(raw.images, generator)  # (B, C, H/8, W/8)
        row_ids = torch.as_tensor(np.asarray(raw.row_ids, dtype=np.int64)).to(self.device)  # (B,)
        self.peak_memory_bytes = peak_memory_bytes(self.device)
        dtype = self.batch_dtype
        return Batch(latents.to(dtype), context.to(dtype), pooled.to(dtype), row_ids)

    def empty(self, height: int, width: int) -> Batch:
        f = self.vae.downsample
        return Batch.empty((self.vae.latent_channels, height // f, width // f),
                           (2 * self.text.text_tokens, self.text.context_dim), self.text.pooled_dim,
                           self.batch_dtype, self.device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes since the last reset on CUDA; on CPU the process's peak resident set (ru_maxrss is in KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def check_dims(cfg: Config, text: TextEncoders, vae: LatentVAE) -> None:
    """The encoders must produce what cfg.model expects; say which key disagrees, before any batch is made."""
    model = cfg.model
    found = {
        "model.text_dims": (text.text_dims, list(model.text_dims)),
        "model.pooled_dim": (text.pooled_dim, model.pooled_dim),
        "model.in_channels": (vae.latent_channels, model.in_channels),
        "model.vae_downsample": (vae.downsample, model.vae_downsample),
    }
    for key, (actual, expected) in found.items():
        if actual != expected:
            raise EncoderLoadError(f"{key} is {expected} but the encoders in [encoders] give {actual}")
