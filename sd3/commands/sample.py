"""`sd3 sample --checkpoint DIR --prompt "..."`: images from a checkpoint, named by seed and prompt.

Writes one PNG per image (`<seed>_<prompt-slug>.png`), a grid when there are several, and with `--gif` one GIF of
the denoising per image; prints every path. Unset options take the checkpoint's [sample] settings.

`--measure-memory` instead samples one image with a model of a preset's size and random weights (no checkpoint
needed) and prints this process's peak resident memory; see `measure_memory`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from tqdm import tqdm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a step-XXXXXXXX checkpoint dir, or a save_dir with a 'latest' file")
    parser.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default=None, help="CFG's negative prompt (default: empty = null condition)")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale; 0 = conditional only, no guidance")
    parser.add_argument("--sampler", default=None, help="euler | euler_stochastic | heun")
    parser.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16")
    parser.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16")
    parser.add_argument("--seed", type=int, default=None, help="-1 = random (the seed used is printed)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per prompt")
    parser.add_argument("--gif", action="store_true", help="also write a GIF of the denoising per image")
    parser.add_argument("--raw-weights", action="store_true", help="the raw weights instead of the EMA weights")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the checkpoint's config, e.g. --set encoders.vae=PATH when it moved")
    parser.add_argument("--measure-memory", metavar="PRESET", default=None,
                        help="no checkpoint: sample one image with PRESET's model size and random weights, "
                             "print peak RSS (JSON)")
    parser.add_argument("--with-text-encoders", action="store_true",
                        help="with --measure-memory: also build real-size Gemma-2-2B, ModernBERT-large and Meta-CLIP "
                             "text encoders (random weights) and encode the prompt with them first")


def main(args: argparse.Namespace) -> int | None:
    if args.measure_memory:
        return measure_memory(args)
    if not args.checkpoint or not args.prompt:
        print("sd3 sample: error: --checkpoint and at least one --prompt are required", file=sys.stderr)
        return 2

    from sd3.sample.images import image_name, make_grid, save_gif
    from sd3.sample.pipeline import Pipeline, check_size

    if args.width is not None or args.height is not None:  # fail before loading anything
        try:
            check_size(16 if args.width is None else args.width, 16 if args.height is None else args.height)
        except ValueError as e:
            print(f"sd3 sample: error: {e}", file=sys.stderr)
            return 2
    pipe = Pipeline.from_checkpoint(args.checkpoint, args.device, args.dtype, use_ema=not args.raw_weights,
                                    overrides=args.set)
    bar = tqdm(total=1, desc="sampling", unit="step")

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg, num_steps=args.steps,
                      sampler=args.sampler, width=args.width, height=args.height, batch_size=args.batch_size,
                      seed=args.seed, return_intermediates=args.gif, progress=progress)
    except ValueError as e:
        bar.close()
        print(f"sd3 sample: error: {e}", file=sys.stderr)
        return 2
    bar.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {result.seeds[0]} ({len(result.images)} images, {json.dumps(result.settings)})")
    for i, (image, seed, prompt) in enumerate(zip(result.images, result.seeds, result.prompts)):
        path = out / image_name(seed, prompt)
        image.save(path)
        print(path)
        if args.gif:
            print(save_gif(result.intermediates[i], path.with_suffix(".gif")))
    if len(result.images) > 1:
        grid = out / f"grid_{result.seeds[0]}.png"
        make_grid(result.images).save(grid)
        print(grid)
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_memory(args: argparse.Namespace) -> int:
    """Peak RSS of sampling one image with a preset's MMDiT and a FLUX-size VAE decoder, random weights.

    Measured in this process, so run it as its own command. The real text encoders (Gemma-2-2B, ModernBERT-large,
    Meta-CLIP) cannot be fetched offline: by default they are excluded and the prompt embeddings are random
    tensors of their shapes, which is what the MMDiT sees once the encoders have left the device. With
    --with-text-encoders, models of their published sizes are built with random weights (tiny offline tokenizers)
    and encode the prompt first; on the CPU they stay resident, so the figure is the sum of all stages.
    Prints a JSON line.
    """
    import torch
    from diffusers import AutoencoderKL

    from sd3.config_loader import load_config
    from sd3.devices import resolve_device, resolve_dtype
    from sd3.encoders.vae import LatentVAE
    from sd3.sample.pipeline import Pipeline, build_in_dtype, check_size, drop_vae_encoder

    cfg = load_config(args.measure_memory)
    width, height = args.width or 512, args.height or 512
    check_size(width, height)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    steps = args.steps or 2  # memory does not grow with steps: each step reuses the same activations
    baseline = peak_rss_mb()

    torch.manual_seed(0)
    model = build_in_dtype(cfg, device, dtype)  # as Pipeline.from_checkpoint, minus the weights file
    after_model = peak_rss_mb()
    vae = LatentVAE(AutoencoderKL(**FLUX_VAE_CONFIG).to(dtype).eval(), device)
    drop_vae_encoder(vae)  # as Pipeline.from_checkpoint: sampling needs the decoder only
    after_vae = peak_rss_mb()

    text = real_size_text_encoders(cfg, device, dtype) if args.with_text_encoders else None
    after_text_load = peak_rss_mb()
    pipe = Pipeline(model, cfg, text, vae, device, dtype, offload=False)
    T, D, P = cfg.model.text_tokens, cfg.model.context_dim, cfg.model.pooled_dim
    if text is not None:
        prompt = args.prompt[0] if args.prompt else "a red circle in the center of a white background"
        context, pooled = pipe.encode([prompt])  # (1, 2T, D), (1, P)
    else:
        context = torch.randn(1, 2 * T, D, dtype=dtype, device=device)  # (1, 2T, D)
        pooled = torch.randn(1, P, dtype=dtype, device=device)  # (1, P)
    after_text = peak_rss_mb()
    uncond = (torch.zeros_like(context), torch.zeros_like(pooled))
    noise = torch.randn(1, cfg.model.in_channels, height // 8, width // 8, device=device)
    start = time.perf_counter()
    latents = pipe.denoise(noise, context, pooled, uncond, args.cfg if args.cfg is not None else 5.0, steps,
                           args.sampler or "euler")
    after_denoise = peak_rss_mb()
    image = pipe.decode(latents)[0]
    seconds = time.perf_counter() - start
    figures = {
        "preset": args.measure_memory, "width": width, "height": height, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device), "steps": steps, "cfg_batched": True,
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
    print(json.dumps(figures, sort_keys=True), flush=True)
    return 0


# The FLUX.1 VAE's published config (16 latent channels, /8): the decoder the real pipeline loads.
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)


def real_size_text_encoders(cfg, device, dtype):
    """TextEncoders of the published sizes of the three encoders, random weights, in `dtype` (no fp32 copy)."""
    import torch
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        Gemma2Config,
        Gemma2Model,
        ModernBertConfig,
        ModernBertModel,
    )

    from sd3.encoders.text import TextEncoders
    from sd3.encoders.tiny import bert_tokenizer, clip_tokenizer, gemma_tokenizer

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
