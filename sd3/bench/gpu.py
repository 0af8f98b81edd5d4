"""`sd3 bench gpu`: one command for a CUDA machine (issue 12), ending in one JSON line.

- MMDiT (the preset's size) forward+backward, bf16 autocast, checkpointing as in the preset, at 256 and 512 px:
  seconds per step, images/s and MFU (model FLOPs / peak), torch.compile off and on; the attention backend used
  (flash-attn when importable, else SDPA);
- each real-size loader part with random weights (sd3/plan/configs): Gemma-2-2B, ModernBERT-large, Meta-CLIP-L
  text at the preset's token count, the FLUX VAE encoder at 256 and 512 px: images/s;
- peak memory of a loader step (all parts at the loader's batch) and of a model step (the preset's batch, or the
  largest power-of-two share of it that fits, said so);
- the measured achieved FLOP/s per part, i.e. what `sd3 plan --measure` uses, and the loader:model work ratio.

Needs only torch, transformers, pyarrow, safetensors and tqdm: the VAE needs diffusers and is skipped (and said so)
without it; wandb and python-dotenv are never imported. `--tiny` runs the same code path on a CPU at tiny sizes
(what the test does).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from sd3.bench import print_result
from sd3.config_loader import load_config
from sd3.model.attention import resolve_backend
from sd3.plan.encoders import PARTS, build_part, run_part, text_config
from sd3.plan.measure import measure_mmdit, measure_part
from sd3.train.metrics import peak_flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="sd3-1b-256", help="preset whose model, batch and tokens are used")
    parser.add_argument("--resolutions", default="256,512", help="px, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--tiny", action="store_true", help="CPU code-path check: 1 layer / block, small shapes")


def peak_memory(fn, device: torch.device) -> float | None:
    """Peak bytes allocated while fn() runs (CUDA only)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def largest_fitting(batch: int, fn) -> tuple[int, float | None]:
    """Run fn(b) for b = batch, batch/2, ... until it fits in memory; (b, its peak bytes)."""
    b = batch
    while True:
        try:
            return b, fn(b)
        except torch.OutOfMemoryError:
            if b == 1:
                raise
            b = max(1, b // 2)


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(args.config, args.overrides)
    layers = 1 if args.tiny else None
    resolutions = [int(r) for r in args.resolutions.split(",")] if not args.tiny else [64]
    batch = 2 if args.tiny else cfg.data.batch_size
    bf16 = torch.bfloat16
    peak = peak_flops(device)
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    parts = [p for p in PARTS if p != "vae" or has_diffusers]
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "config": args.config, "peak_bf16_flops": peak, "diffusers": has_diffusers,
                 "attention_backend": resolve_backend(cfg.model.attention_backend, torch.empty(0, device=device,
                                                                                            dtype=bf16))}
    if not has_diffusers:
        out["vae_skipped"] = "diffusers is not importable"

    model_cfg = cfg.model
    if args.tiny:
        model_cfg = load_config("tiny-cpu").model
    for res in resolutions:
        for compile in (False, True) if not (args.no_compile or args.tiny) else (False,):
            tag = f"{res}_{'compile' if compile else 'eager'}"
            mb = 2 if args.tiny else max(1, min(batch, 16))  # timing batch: large enough to saturate the GPU
            m = measure_mmdit(model_cfg, device, bf16, mb, res, res, layers, compile=compile, repeats=args.repeats)
            out[f"mmdit_step_s_{tag}"] = m.seconds
            out[f"mmdit_images_per_s_{tag}"] = m.images_per_s
            out[f"mmdit_executed_flops_per_s_{tag}"] = m.flops_per_s
            out[f"mmdit_mfu_pct_{tag}"] = None if peak is None else 100.0 * m.flops_per_s / peak

    clip_tokens = text_config("clip").max_position_embeddings
    tokens = {"gemma": cfg.model.text_tokens, "bert": cfg.model.text_tokens, "clip": clip_tokens}
    for part in parts:
        for res in (resolutions if part == "vae" else resolutions[:1]):
            tag = f"{part}_{res}" if part == "vae" else part
            m = measure_part(part, device, bf16, batch if not args.tiny else 2, tokens.get(part, 0), res, res,
                             None if part == "vae" and not args.tiny else layers, repeats=args.repeats)
            out[f"{tag}_images_per_s"] = m.images_per_s
            out[f"{tag}_flops_per_s"] = m.flops_per_s

    # Peak memory at the preset's batch: a loader step encodes batch x consumers images, a model step trains batch.
    res = resolutions[0]
    loader_batch = batch * cfg.topology.models_per_loader

    def loader_step(b: int) -> float | None:
        models = {p: build_part(p, device, bf16, None if p == "vae" and not args.tiny else layers) for p in parts}

        def run() -> None:
            with torch.inference_mode():
                for p, model in models.items():
                    run_part(p, model, b, tokens.get(p, 0), res, res)

        return peak_memory(run, device)

    def model_step(b: int) -> float | None:
        return peak_memory(lambda: measure_mmdit(model_cfg, device, bf16, b, res, res, layers, repeats=1), device)

    out["loader_peak_batch"], out["loader_peak_bytes"] = largest_fitting(loader_batch, loader_step)
    out["model_peak_batch"], out["model_peak_bytes"] = largest_fitting(batch, model_step)
    out["peak_batches_reduced"] = out["loader_peak_batch"] < loader_batch or out["model_peak_batch"] < batch

    # What `sd3 plan --measure` would use: achieved FLOP/s per part at the first resolution, eager.
    eager = f"{res}_eager"
    achieved = {p: out[f"{p}_{res}_flops_per_s" if p == "vae" else f"{p}_flops_per_s"] for p in parts}
    achieved["mmdit"] = out[f"mmdit_executed_flops_per_s_{eager}"]
    out["plan_measure_achieved_flops_per_s"] = achieved
    print_result(out)
    return 0
