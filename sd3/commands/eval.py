"""`sd3 eval --checkpoint DIR --reference SHARDS_OR_FOLDER [--n N]`: FID and CLIP score of a checkpoint.

N reference rows (held-out shards, or an image folder with a metadata file) give the real images and, as prompts,
their captions; the checkpoint draws one image per caption (image k from seed + k, [sample] settings unless given).
Reported, as one JSON line:

- `fid`: FID on the standard 2048-d Inception-v3 pool3 features (torchmetrics + torch-fidelity), with the Inception
  weights from `--inception FILE` (never downloaded here); null without that file;
- `fid_clip`: FID on the CLIP model's image embeddings (no Inception needed);
- `clip_score`: 100 · max(cos, 0) of generated image and its prompt, mean over N (sd3/eval/clip.py);
  `clip_score_reference`: the same for the real images and their captions, the ceiling to read it against.

FID from few images is biased upwards (Chong & Forsyth 2020): compare runs at the same N only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sd3.devices import resolve_device
from sd3.eval.clip import Clip, ClipImageFeatures
from sd3.eval.fid import INCEPTION_FEATURES, EvalError, feature_fid, inception_fid
from sd3.eval.reference import load_reference
from sd3.sample.checks import find_checkpoint
from sd3.sample.pipeline import Pipeline

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the CLIP most T2I papers report CLIP score with


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a step-XXXXXXXX checkpoint dir, or a save_dir")
    parser.add_argument("--reference", required=True, help="held-out shards, or an image folder with metadata.jsonl")
    parser.add_argument("--n", type=int, default=1000, help="reference rows = generated images (default 1000)")
    parser.add_argument("--inception", default=os.environ.get("SD3_INCEPTION_WEIGHTS"),
                        help="torch-fidelity's pt_inception-2015-12-05 weights file (env SD3_INCEPTION_WEIGHTS)")
    parser.add_argument("--clip", default=DEFAULT_CLIP,
                        help=f"CLIP folder or hub id in the local cache (default {DEFAULT_CLIP})")
    parser.add_argument("--seed", type=int, default=0, help="reference draw and image seeds (image k: seed + k)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's [sample])")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's [sample])")
    parser.add_argument("--sampler", default=None, help="euler | euler_stochastic | heun")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="bf16", help="sampling dtype: fp32 | bf16 | fp16")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the checkpoint's config, e.g. --set encoders.vae=PATH when it moved")
    parser.add_argument("--save-images", default=None, metavar="DIR", help="also write the generated images here")


def main(args: argparse.Namespace) -> int:
    try:
        result = evaluate(args)
    except (EvalError, FileNotFoundError) as e:
        print(f"sd3 eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


def uint8_batches(images: list[Image.Image], batch: int):
    """RGB images -> uint8 tensors (b, 3, H, W), one size per tensor (reference buckets differ in size)."""
    by_size: dict[tuple[int, int], list[Image.Image]] = defaultdict(list)
    for image in images:
        by_size[image.size].append(image)
    for group in by_size.values():
        for lo in range(0, len(group), batch):
            arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in group[lo:lo + batch]])  # (b, H, W, 3)
            yield torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()  # (b, 3, H, W)


def evaluate(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    checkpoint = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    fid = inception_fid(args.inception) if args.inception else None  # fail on a bad file before any sampling
    ref = load_reference(args.reference, args.n, args.seed)
    if not ref.images:
        raise EvalError(f"--reference {args.reference}: no usable rows ({dict(ref.skipped)})")
    try:
        clip = Clip(args.clip, device)
    except OSError as e:
        raise EvalError(f"--clip {args.clip}: cannot load a CLIPModel + CLIPProcessor offline ({e})") from None

    pipe = Pipeline.from_checkpoint(checkpoint, device, args.dtype, overrides=args.set)
    generated: list[Image.Image] = []
    with tqdm(total=len(ref.captions), desc="generating", unit="image") as bar:
        for lo in range(0, len(ref.captions), args.batch_size):
            prompts = ref.captions[lo:lo + args.batch_size]
            out = pipe(prompts, seed=args.seed + lo, num_steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                       batch_size=1, max_batch=args.batch_size)
            generated += out.images
            bar.update(len(prompts))
    settings = out.settings
    if args.save_images:
        folder = Path(args.save_images)
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(generated):
            image.save(folder / f"{args.seed + k:06d}.png")

    fid_clip = feature_fid(ClipImageFeatures(clip))
    for metric in [m for m in (fid, fid_clip) if m is not None]:
        for images, real in ((ref.images, True), (generated, False)):
            for batch in uint8_batches(images, args.batch_size):
                metric.update(batch, real=real)
    scores = torch.cat([clip.scores(generated[lo:lo + 64], ref.captions[lo:lo + 64])
                        for lo in range(0, len(generated), 64)])  # (N,)
    reference_scores = torch.cat([clip.scores(ref.images[lo:lo + 64], ref.captions[lo:lo + 64])
                                  for lo in range(0, len(ref.images), 64)])  # (N,)
    return {
        "checkpoint": str(checkpoint), "reference": str(args.reference), "n": len(generated),
        "skipped_reference_rows": dict(ref.skipped),
        "fid": float(fid.compute()) if fid is not None else None,
        "fid_features": INCEPTION_FEATURES if fid is not None else "none: no --inception weights file given",
        "fid_clip": float(fid_clip.compute()), "clip_model": clip.name,
        "clip_score": float(scores.mean()), "clip_score_reference": float(reference_scores.mean()),
        "sample": settings, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1),
    }
