"""`sd3 bench model`: forward+backward time of our MMDiT vs diffusers' SD3Transformer2DModel.

Both models get the same batch (latents, timesteps, 154 text tokens, pooled text), both train in fp32 weights
under bf16 autocast and in plain fp32. diffusers gets our width and head count and the depth whose parameter count
is closest to ours (its blocks have a GELU MLP and separate Q/K/V linears: 36·D² weights against our 45·D²), with the
same per-head QK RMSNorm (`qk_norm="rms_norm"`, as in SD3.5). Runs alternate A B A B ... in one process after a
warm-up, and the medians are compared, so load from other processes on the machine hits both alike. Wall time and
process CPU time are both reported: on a shared machine the CPU-time ratio is the steadier of the two.

The matrix-product FLOPs of one forward+backward of each model (torch's FlopCounterMode: mm/addmm/bmm, which is
every linear layer; torch does not count its CPU attention kernel) are reported too, as `linear_flops_ratio`: the
products run at the same rate in both models, so this ratio is about as low as the time ratio can go while the
products dominate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sd3.bench import print_result
from sd3.config import ModelConfig
from sd3.devices import cpu_description, native_bf16, resolve_dtype, resolve_precision_name
from sd3.errors import UserError
from sd3.model import build_model
from sd3.model.flops import count_parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=768, help="our model width (64 per head)")
    parser.add_argument("--blocks", type=int, default=4,
                        help="our number of blocks (diffusers gets the depth that matches)")
    parser.add_argument("--mlp-type", default="swiglu", choices=["swiglu", "gelu"])
    parser.add_argument("--height", type=int, default=256, help="pixels; latents are height/8")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=77, help="per text part; 77 + 77 = 154 tokens")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and dtype")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model and dtype first")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    # One thread by default: on a machine shared by several jobs, two OpenMP threads spin-wait for each other whenever
    # one is descheduled, and the timings then measure the scheduler more than the models.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")


def our_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        num_blocks=args.blocks, dim=args.dim, num_heads=args.dim // 64, mlp_type=args.mlp_type,
        text_tokens=args.text_tokens, max_res=max(args.height, args.width), max_res_orig=max(args.height, args.width),
    )


def diffusers_model(layers: int, heads: int, cfg: ModelConfig, latent: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=layers,
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=64 * heads, pooled_projection_dim=cfg.pooled_dim, out_channels=cfg.in_channels,
        pos_embed_max_size=max(96, latent // cfg.patch_size), qk_norm="rms_norm",
    )


def match_diffusers(cfg: ModelConfig, target: int, latent: int) -> tuple[int, int]:
    """(layers, parameters) of the diffusers model of our width closest to `target` parameters.

    Same width and head count as ours; only the depth moves. Its blocks hold 36·D² weights against our 45·D²
    (SwiGLU ×4 has three full matrices), so it needs about 5 layers for our 4."""
    best = None
    for layers in range(1, 3 * cfg.num_blocks + 1):
        with torch.device("meta"):
            count = count_parameters(diffusers_model(layers, cfg.num_heads, cfg, latent))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (layers, count)
    return best


def train_step(model: torch.nn.Module, forward, dtype: torch.dtype) -> tuple[float, float]:
    """One forward + backward of `forward()`: (wall seconds, process CPU seconds). Gradients are dropped first,
    as an optimizer step would. CPU time is reported too because on a shared machine wall time includes waiting."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = forward()
    out.float().square().mean().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def linear_flops(model: torch.nn.Module, forward) -> int:
    """Matrix-product FLOPs of one forward + backward (the same loss as `train_step`)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        forward().float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = our_config(args)
    if args.height % 16 or args.width % 16:
        raise UserError(f"--height and --width must be multiples of 16 px, got {args.height}x{args.width}")
    h, w = args.height // cfg.vae_downsample, args.width // cfg.vae_downsample
    ours = build_model(cfg)
    ours_params = count_parameters(ours)
    layers, theirs_params = match_diffusers(cfg, ours_params, max(h, w))
    heads = cfg.num_heads
    theirs = diffusers_model(layers, heads, cfg, max(h, w))
    B, T = args.batch, cfg.text_tokens
    x = torch.randn(B, cfg.in_channels, h, w)
    t = torch.rand(B)
    context = torch.randn(B, 2 * T, cfg.context_dim)
    context[:, T:, cfg.text_dims[1] :] = 0  # the BERT part is zero-padded, as the encoders send it
    pooled = torch.randn(B, cfg.pooled_dim)
    # diffusers takes timesteps in [0, 1000] (it scales by a fixed 1000; ours learns that scale) and returns a tuple.
    runners = {
        "ours": (ours, lambda: ours(x, t, context, pooled)),
        "theirs": (theirs, lambda: theirs(x, context, pooled, t * 1000, return_dict=False)[0]),
    }

    print(f"sizes: batch {B}, {args.height}x{args.width} px = latents {cfg.in_channels}x{h}x{w}, "
          f"{(h // 2) * (w // 2)} image tokens + {2 * T} text tokens, threads {torch.get_num_threads()}")
    print(f"ours:   MMDiT dim {cfg.dim}, {cfg.num_blocks} blocks, {cfg.num_heads} heads, "
          f"{cfg.mlp_type} MLP x{cfg.hidden_scale}: "
          f"{ours_params:,} parameters, attention {ours.attention_backend}")
    print(f"theirs: diffusers SD3Transformer2DModel dim {64 * heads}, {layers} layers, {heads} heads, GELU MLP x4, "
          f"qk_norm rms_norm: {theirs_params:,} parameters ({100 * (theirs_params / ours_params - 1):+.1f}%)")
    figures: dict = {
        "benchmark": "model", "batch": B, "height": args.height, "width": args.width, "text_tokens": 2 * T,
        "ours_params": ours_params, "theirs_params": theirs_params, "ours_dim": cfg.dim, "ours_blocks": cfg.num_blocks,
        "theirs_dim": 64 * heads, "theirs_layers": layers, "repeats": args.repeats, "threads": torch.get_num_threads(),
    }
    flops = {who: linear_flops(*runners[who]) for who in runners}
    print(f"matrix-product FLOPs per forward+backward: ours {flops['ours'] / 1e9:.1f} G, "
          f"theirs {flops['theirs'] / 1e9:.1f} G, "
          f"ratio {flops['ours'] / flops['theirs']:.3f} (attention kernels not counted)")
    figures["linear_flops_ratio"] = round(flops["ours"] / flops["theirs"], 3)
    # Which dtype train.precision=auto picks here: bf16 only where the CPU computes it in hardware.
    native = native_bf16("cpu")
    figures.update(cpu=cpu_description(), native_bf16=native, auto_precision=resolve_precision_name("auto", "cpu"))
    print(f"this CPU: {figures['cpu']}: bf16 is {'native' if native else 'emulated (expect it slower than fp32)'}; "
          f"train.precision=auto runs {figures['auto_precision']}")
    for name in args.dtypes.split(","):
        dtype = resolve_dtype(name)
        times: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
        for i in range(args.warmup + args.repeats):
            for who in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):  # alternate who goes first
                seconds = train_step(*runners[who], dtype)
                if i >= args.warmup:
                    times[who].append(seconds)
        wall = {who: statistics.median(s[0] for s in runs) for who, runs in times.items()}
        cpu = {who: statistics.median(s[1] for s in runs) for who, runs in times.items()}
        autocast = "bf16 autocast, fp32 weights" if dtype == torch.bfloat16 else "fp32"
        print(f"{name} ({autocast}), median of {args.repeats} forward+backward: "
              f"wall ours {wall['ours']:.3f} s, theirs {wall['theirs']:.3f} s, "
              f"ratio ours/theirs {wall['ours'] / wall['theirs']:.3f}; "
              f"CPU time ours {cpu['ours']:.3f} s, theirs {cpu['theirs']:.3f} s, "
              f"ratio {cpu['ours'] / cpu['theirs']:.3f}")
        figures[f"{name}_ours_s"] = round(wall["ours"], 4)
        figures[f"{name}_theirs_s"] = round(wall["theirs"], 4)
        figures[f"{name}_ratio"] = round(wall["ours"] / wall["theirs"], 3)
        figures[f"{name}_cpu_ratio"] = round(cpu["ours"] / cpu["theirs"], 3)
        figures[f"{name}_ours_linear_gflops"] = round(flops["ours"] / wall["ours"] / 1e9, 1)
    if "bf16_ours_s" in figures and "fp32_ours_s" in figures:
        figures["ours_bf16_over_fp32_time"] = round(figures["bf16_ours_s"] / figures["fp32_ours_s"], 3)
        print(f"ours bf16 / fp32 time: {figures['ours_bf16_over_fp32_time']:.3f} "
              f"({'bf16' if figures['ours_bf16_over_fp32_time'] < 1 else 'fp32'} is faster on this CPU)")
    print_result(figures)
    return 0

