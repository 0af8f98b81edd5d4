"""`sd3 bench sample_memory PRESET`: peak memory of sampling one image with a preset's model size, random weights.

No checkpoint needed: the MMDiT of the preset (created in the sampling dtype, as Pipeline.from_checkpoint does) and a
FLUX.1-size VAE decoder, both random. Measured in this process (peak resident set size, and CUDA's peak allocation
on a GPU), so run it as its own command. The real text encoders (Gemma-2-2B, ModernBERT-large, Meta-CLIP) cannot be
fetched offline: by default they are excluded and the prompt embeddings are random tensors of their shapes, which
is what the MMDiT sees once the encoders have left the device. With --with-text-encoders, models of their published
sizes are built with random weights (tiny offline tokenizers) and encode the prompt first; on the CPU they stay
resident, so the figure is the sum of all stages. The source needed ~15 GB of GPU memory at 512² (its README).
Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from diffusers import AutoencoderKL
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    ModernBertConfig,
    ModernBertModel,
)

from sd3.bench import print_result
from sd3.config import Config
from sd3.config_loader import load_config
from sd3.devices import resolve_device, resolve_dtype
from sd3.encoders.text import TextEncoders
from sd3.encoders.tiny import bert_tokenizer, clip_tokenizer, gemma_tokenizer
from sd3.encoders.vae import LatentVAE
from sd3.sample.checks import check_size
from sd3.sample.pipeline import Pipeline, build_in_dtype, drop_vae_encoder
from sd3.sample.samplers import SAMPLERS, make_timesteps

# The FLUX.1 VAE's published config (16 latent channels, /8): the decoder the real pipeline loads.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help="the config preset whose model size to measure, e.g. sd3-1b-256")
    parser.add_argument("--width", type=int, default=512, help="pixels, a multiple of 16")
    parser.add_argument("--height", type=int, default=512, help="pixels, a multiple of 16")
    parser.add_argument("--steps", type=int, default=2,
                        help="sampler steps (memory does not grow with steps: each reuses the same activations)")
    parser.add_argument("--cfg", type=float, default=5.0, help="CFG scale (> 0 batches cond and uncond: 2B)")
    parser.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    parser.add_argument("--prompt", default="a red circle in the center of a white background",
                        help="the prompt, with --with-text-encoders")
    parser.add_argument("--with-text-encoders", action="store_true",
                        help="also build real-size Gemma-2-2B, ModernBERT-large and Meta-CLIP text encoders (random "
                             "weights) and encode the prompt with them first")


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def real_size_text_encoders(cfg: Config, device: torch.device, dtype: torch.dtype) -> TextEncoders:
    """TextEncoders of the published sizes of the three encoders, random weights, in `dtype` (no fp32 copy)."""
    gemma_2_2b = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=256)
    modernbert_large = ModernBertConfig(vocab_size=50368, hidden_size=1024, intermediate_size=2624,
                                        num_hidden_layers=28, num_attention_heads=16)
    metaclip_l14_text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            models = [CLIPTextModelWithProjection(metaclip_l14_text), Gemma2Model(gemma_2_2b),
                      ModernBertModel(modernbert_large)]
    finally:
        torch.set_default_dtype(previous)
    clip, gemma, bert = [m.eval().requires_grad_(False) for m in models]
    return TextEncoders(clip, clip_tokenizer(), gemma, gemma_tokenizer(), bert, bert_tokenizer(),
                        cfg.model.text_tokens, device)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset)
    check_size(args.width, args.height)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    baseline = peak_rss_mb()

    torch.manual_seed(0)
    model = build_in_dtype(cfg, device, dtype)  # as Pipeline.from_checkpoint, minus the weights file
    after_model = peak_rss_mb()
    vae = LatentVAE(AutoencoderKL(**FLUX_VAE_CONFIG).to(dtype).eval(), device)
    drop_vae_encoder(vae)  # as Pipeline.from_checkpoint for text-to-image: sampling needs the decoder only
    after_vae = peak_rss_mb()

    text = real_size_text_encoders(cfg, device, dtype) if args.with_text_encoders else None
    after_text_load = peak_rss_mb()
    pipe = Pipeline(model, cfg, text, vae, device, dtype, offload=False)
    T, D, P = cfg.model.text_tokens, cfg.model.context_dim, cfg.model.pooled_dim
    if text is not None:
        context, pooled = pipe.encode([args.prompt])  # (1, 2T, D), (1, P)
    else:
        context = torch.randn(1, 2 * T, D, dtype=dtype, device=device)  # (1, 2T, D)
        pooled = torch.randn(1, P, dtype=dtype, device=device)  # (1, P)
    after_text = peak_rss_mb()
    uncond = (torch.zeros_like(context), torch.zeros_like(pooled))
    noise = torch.randn(1, cfg.model.in_channels, args.height // 8, args.width // 8, device=device)  # (1, C, h, w)
    start = time.perf_counter()
    latents = pipe.denoise(noise, context, pooled, uncond, args.cfg, make_timesteps(args.steps), args.sampler)
    after_denoise = peak_rss_mb()
    image = pipe.decode(latents)[0]
    seconds = time.perf_counter() - start
    figures = {
        "preset": args.preset, "width": args.width, "height": args.height,
        "dtype": str(dtype).removeprefix("torch."), "device": str(device), "steps": args.steps,
        "cfg_batched": args.cfg != 0, "sampler": args.sampler,
        "parameters_mmdit": sum(p.numel() for p in model.parameters()),
        "parameters_vae_decoder": sum(p.numel() for p in vae.vae.parameters()),
        "rss_mb_after_imports": round(baseline), "peak_rss_mb_after_model": round(after_model),
        "peak_rss_mb_after_vae": round(after_vae), "peak_rss_mb_after_denoise": round(after_denoise),
        "peak_rss_mb": round(peak_rss_mb()),
        "text_encoders": ("included: real-size configs, random weights, resident all along"
                          if text is not None else "excluded (random embeddings of their shapes)"),
        "peak_rss_mb_after_text_load": round(after_text_load), "peak_rss_mb_after_text_encode": round(after_text),
        "image_size": list(image.size), "seconds": round(seconds, 1), "source_gpu_gb": 15,
    }
    if device.type == "cuda":
        figures["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print_result(figures)
    return 0
