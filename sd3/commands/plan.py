"""`sd3 plan --config NAME [--gpu h100|h200|a100|l40s|...] [--measure | --measured FILE] [--plan.KEY=VALUE] ...`.

Before a launch: is the configured loader:model layout balanced, and which layout per node trains the most images
per second per GPU? FLOPs per image of each loader part (Gemma-2, ModernBERT, Meta-CLIP text at the configured token
count, the FLUX VAE encoder at the stage's resolution) and of the MMDiT forward+backward (with the recompute of
activation checkpointing as configured) are counted on the real architectures on the meta device: offline, no
weights, seconds. Times come from the GPU's bf16 peak × per-part efficiencies (--plan.*_efficiency), or with
--measure from timing each part on this machine (a GPU when there is one; on a CPU at reduced depth and small
shapes), or with --measured FILE from what `sd3 bench gpu` measured on a GPU machine (its JSON line, in FILE).
Prints a table and ends with one JSON line (predicted_stall_pct, recommended_stall_pct, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sd3.config_loader import load_config
from sd3.devices import resolve_dtype
from sd3.errors import ConfigError
from sd3.plan.encoders import PARTS, text_config
from sd3.plan.measure import measure_mmdit, measure_part
from sd3.plan.planner import Plan, count_costs, make_plan, plan_summary
from sd3.plan.settings import PlanSettings, apply_plan_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sd3/configs) or path to a TOML file")
    parser.add_argument("--gpu", default=None, help="GPU whose bf16 peak sets the times (default: plan.gpu, h100)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the preset's model.max_res)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the preset's model.max_res)")
    parser.add_argument("--measure", action="store_true", help="time each part on this machine instead of assuming")
    parser.add_argument("--measure-layers", type=int, default=None,
                        help="depth of the timed copies (default: the real depth on a GPU, 2 on a CPU)")
    parser.add_argument("--measure-res", type=int, default=None,
                        help="px of the timed VAE/MMDiT (default 256 on a GPU, 64 on a CPU)")
    parser.add_argument("--measure-batch", type=int, default=None, help="images per timed call (default 8 GPU, 2 CPU)")
    parser.add_argument("--measured", default=None, metavar="FILE",
                        help="the output of `sd3 bench gpu` (its last JSON line) from the machine to plan for: its "
                             "achieved FLOP/s per part instead of assumed efficiencies")


def bench_gpu_achieved(path: str) -> tuple[dict[str, float], str]:
    """The per-part FLOP/s of a `sd3 bench gpu` output file (its last JSON line with them), and where they came from."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--measured {path}: {e.strerror or e}") from None
    for line in reversed(lines):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and "plan_measure_achieved_flops_per_s" in result:
            break
    else:
        raise ConfigError(f"--measured {path}: no `sd3 bench gpu` JSON line (with plan_measure_achieved_flops_per_s)")
    achieved = result["plan_measure_achieved_flops_per_s"]
    missing = [p for p in (*PARTS, "mmdit") if not isinstance(achieved.get(p), int | float) or achieved[p] <= 0]
    if missing:
        # e.g. the VAE, which bench gpu skips where diffusers is missing
        raise ConfigError(f"--measured {path}: no achieved FLOP/s for {', '.join(missing)}")
    return {p: float(achieved[p]) for p in (*PARTS, "mmdit")}, f"measured by sd3 bench gpu on {result.get('device')}"


def measure_achieved(cfg, args: argparse.Namespace) -> tuple[dict[str, float], str]:
    """FLOP/s each part reaches on this machine's device (see sd3/plan/measure.py)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    layers = args.measure_layers if args.measure_layers is not None else (None if gpu else 2)
    res = args.measure_res or (256 if gpu else 64)
    batch = args.measure_batch or (8 if gpu else 2)
    text_dtype, vae_dtype = resolve_dtype(cfg.encoders.text_dtype), resolve_dtype(cfg.encoders.vae_dtype)
    # The real architectures are timed (their achieved FLOP/s is what scales), at the configured token count.
    clip_tokens = text_config("clip").max_position_embeddings
    tokens = {"gemma": cfg.model.text_tokens, "bert": cfg.model.text_tokens, "clip": clip_tokens}
    achieved = {}
    for part in PARTS:
        dtype = vae_dtype if part == "vae" else text_dtype
        # The VAE keeps its real depth: layers_per_block is 2, and 1 would change its mix of convolutions.
        depth = None if part == "vae" else layers
        achieved[part] = measure_part(part, device, dtype, batch, tokens.get(part, 0), res, res, depth).flops_per_s
    precision = resolve_dtype(cfg.train.precision)
    achieved["mmdit"] = measure_mmdit(cfg.model, device, precision, batch, res, res, layers).flops_per_s
    shape = f"{'real depth' if layers is None else f'{layers} layers'}, {res} px, batch {batch}"
    return achieved, f"measured on {torch.cuda.get_device_name(device) if gpu else 'cpu'} ({shape})"


def print_plan(name: str, plan: Plan, settings: PlanSettings, how: str) -> None:
    print(f"sd3 plan {name}: {plan.height}x{plan.width} px, batch {plan.batch} per model rank, {how}")
    if plan.work is not None:
        tokens = ", ".join(f"{part} {t:.1f}" for part, t in plan.work.tokens.items())
        vae = f"VAE posteriors read from the cache ({plan.work.cache_bytes / 1024:.0f} KiB/image)"
        print(f"text tokens per caption: {tokens}; {vae if plan.work.hybrid else 'VAE online'}")
        if settings.text_forward_overhead_s > 0:
            print(f"text encoders: {1e3 * settings.text_forward_overhead_s:.2f} ms per forward besides the FLOPs, "
                  f"one forward per {1 / plan.work.forwards_per_caption:.1f} captions (in ms/image below)")
    print(f"{'part':<22}{'GFLOP/image':>13}{'TFLOP/s':>10}{'ms/image':>10}")
    for p in plan.parts:
        print(f"{'loader ' + p.name:<22}{p.flops_per_image / 1e9:>13.1f}{p.flops_per_s / 1e12:>10.3f}"
              f"{1e3 * p.seconds_per_image:>10.3f}")
    print(f"{'loader total':<22}{sum(p.flops_per_image for p in plan.parts) / 1e9:>13.1f}{'':>10}"
          f"{1e3 * plan.loader_s_per_image:>10.3f}")
    print(f"{'mmdit fwd+bwd':<22}{plan.mmdit.model / 1e9:>13.1f}{'':>10}{'':>10}  (model FLOPs, as MFU counts them)")
    print(f"{'mmdit executed':<22}{plan.mmdit.executed / 1e9:>13.1f}{plan.mmdit_flops_per_s / 1e12:>10.3f}"
          f"{1e3 * plan.model_s_per_image:>10.3f}  (with the recompute of activation checkpointing)")
    print(f"loader:model work per image = {plan.loader_s_per_image / plan.model_s_per_image:.3f}")
    print()
    print(f"layouts per node of {settings.gpus_per_node} GPUs:")
    print(f"  {'layout':<22}{'loader s/step':>14}{'model s/step':>14}{'stall %':>9}{'loader idle %':>15}"
          f"{'img/s/GPU':>11}")
    rows = list(plan.layouts)
    if all(p.layout != plan.configured.layout for p in rows):
        rows.insert(0, plan.configured)
    for p in rows:
        mark = ("*" if p.layout == plan.configured.layout else " ") + (">" if p is plan.recommended else " ")
        note = "  (reference: every GPU encodes its own batch)" if p.layout.colocated_gpus else ""
        print(f"{mark}{p.layout.name:<22}{p.loader_step_s:>14.3f}{p.model_step_s:>14.3f}{p.stall_pct:>9.1f}"
              f"{p.loader_idle_pct:>15.1f}{p.images_per_s_per_gpu:>11.2f}{note}")
    print(f"  (* configured, > recommended: the most img/s/GPU at stall <= {settings.max_stall_pct:g} %; "
          f"select it with {' '.join(plan.recommended.layout.overrides())})")


def main(args: argparse.Namespace) -> int:
    settings = PlanSettings()
    overrides = apply_plan_overrides(settings, list(args.overrides))
    if args.gpu is not None:
        settings.gpu = args.gpu
    settings.peak_flops  # noqa: B018 - an unknown --gpu is a one-line error before anything is counted
    if settings.gpus_per_node < 2:
        raise ConfigError(f"plan.gpus_per_node must be >= 2 (a loader and a model GPU), got {settings.gpus_per_node}")
    cfg = load_config(args.config, overrides)
    height, width = args.height or cfg.model.max_res, args.width or cfg.model.max_res
    multiple = cfg.model.patch_size * cfg.model.vae_downsample
    if height % multiple or width % multiple:
        raise ConfigError(f"--height/--width {height}x{width} must be multiples of {multiple} px")
    achieved, how = None, f"assumed efficiencies on {settings.gpu}"
    if args.measure and args.measured:
        raise ConfigError("--measure and --measured are alternatives: time here, or read another machine's timings")
    if args.measured:  # read (and refused) before anything is counted
        achieved, how = bench_gpu_achieved(args.measured)
    counted = count_costs(cfg, settings, height, width)
    if args.measure:
        achieved, how = measure_achieved(cfg, args)
    plan = make_plan(cfg, settings, height, width, achieved, counted)
    print_plan(args.config, plan, settings, how)
    print(json.dumps({"config": args.config, "gpu": settings.gpu, **plan_summary(plan)}, sort_keys=True))
    return 0
