"""`sd3 sample --checkpoint DIR --prompt "..."`: images from a checkpoint, named by seed and prompt.

Writes one PNG per image (`<seed>_<prompt-slug>.png`), a grid when there are several, and with `--gif` one GIF of
the denoising per image; prints every path. Unset options take the checkpoint's [sample] settings. With
`--init-image PATH --strength S` it samples image-to-image; `--shift S` shifts the timestep grid (SD3's t').
Every argument, the checkpoint's config.json and weights header, and the init image are checked before any model
loads: a bad one is one line naming it (exit 2). The memory measurement is `sd3 bench sample_memory`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from sd3.devices import resolve_device, resolve_dtype
from sd3.errors import ConfigError
from sd3.sample.checks import Settings, check_settings, open_checkpoint, open_image
from sd3.sample.images import image_name, make_grid, save_gif
from sd3.sample.pipeline import Pipeline
from sd3.sample.samplers import SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="a step-XXXXXXXX checkpoint dir, or a save_dir with a 'latest' file")
    parser.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    parser.add_argument("--negative-prompt", default=None,
                        help="CFG's negative prompt (default: empty = null condition)")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale; 0 = conditional only, no guidance")
    parser.add_argument("--sampler", default=None, help=" | ".join(SAMPLERS) + " (sd3/sample/samplers.py)")
    parser.add_argument("--shift", type=float, default=None,
                        help="timestep shift s: t' = s·t / (1 + (s-1)·t); 1 = unshifted, SD3 uses 3 at 1024 px")
    parser.add_argument("--init-image", default=None, metavar="PATH",
                        help="image-to-image: start from this image (resized to --width x --height, default its size)")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --init-image: noise it to t = S in [0, 1] first (0 = unchanged, 1 = pure noise)")
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


def validate(args: argparse.Namespace) -> None:
    """Every argument, in the order given on the command line's help; the first bad one raises a ConfigError."""
    if not args.checkpoint or not args.prompt:
        raise ConfigError("--checkpoint and at least one --prompt are required")
    if args.strength is not None and args.init_image is None:
        raise ConfigError("--strength needs --init-image (it says how far that image is noised)")
    check_settings(Settings(num_steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, shift=args.shift,
                            strength=args.strength, width=args.width, height=args.height,
                            batch_size=args.batch_size))
    try:
        resolve_dtype(args.dtype, key="--dtype")
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:  # torch.device("nope") is a RuntimeError
        raise ConfigError(str(e).splitlines()[0]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine")
    if args.init_image is not None:
        open_image(args.init_image)
    open_checkpoint(args.checkpoint, use_ema=not args.raw_weights, overrides=args.set)


def main(args: argparse.Namespace) -> int:
    validate(args)
    pipe = Pipeline.from_checkpoint(args.checkpoint, args.device, args.dtype, use_ema=not args.raw_weights,
                                    overrides=args.set, keep_vae_encoder=args.init_image is not None)
    bar = tqdm(total=1, desc="sampling", unit="step")

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg, num_steps=args.steps,
                      sampler=args.sampler, width=args.width, height=args.height, batch_size=args.batch_size,
                      seed=args.seed, shift=args.shift, init_image=args.init_image, strength=args.strength,
                      return_intermediates=args.gif, progress=progress)
    finally:
        bar.close()
    write(result, Path(args.out), args.gif)
    return 0


def write(result, out: Path, gif: bool) -> None:
    """The images (and GIFs), named by seed and prompt, and a grid when there are several; every path printed."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {result.seeds[0]} ({len(result.images)} images, {json.dumps(result.settings)})")
    for i, (image, seed, prompt) in enumerate(zip(result.images, result.seeds, result.prompts, strict=True)):
        path = out / image_name(seed, prompt)
        image.save(path)
        print(path)
        if gif:
            print(save_gif(result.intermediates[i], path.with_suffix(".gif")))
    if len(result.images) > 1:
        grid = out / f"grid_{result.seeds[0]}.png"
        make_grid(result.images).save(grid)
        print(grid)
